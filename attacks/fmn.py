"""Fast Minimum-Norm attacks (Pintor et al., NeurIPS 2021) in L-inf, L2 and L1, over foolbox.

Minimisation attacks like CW: one run per sample finds its smallest adversarial, which
:class:`bench.attacks.base.Attack` thresholds per epsilon, so one run gives the whole
accuracy-vs-epsilon curve and the median minimal perturbation of the configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.attacks.adapters import foolbox_model
from bench.attacks.base import Attack
from bench.errors import BenchError
from bench.registry import ATTACKS
from bench.types import Norm


@dataclass
class FMNParams:
    """``--attack-param`` keys of the FMN attacks; defaults are foolbox's (the paper's)."""

    steps: int = 100
    max_stepsize: float = 1.0  # initial step, cosine-annealed to min_stepsize
    min_stepsize: float | None = None  # None: max_stepsize / 100
    gamma: float = 0.05  # initial rate at which the norm constraint shrinks or grows

    def check(self) -> None:
        if self.steps < 1:
            raise BenchError(f"fmn steps must be at least 1, got {self.steps}")
        if self.max_stepsize <= 0 or (self.min_stepsize is not None and not 0 < self.min_stepsize <= self.max_stepsize):
            raise BenchError("fmn needs max_stepsize > 0 and 0 < min_stepsize <= max_stepsize")
        if not 0 < self.gamma < 1:
            raise BenchError(f"fmn gamma must be in (0, 1), got {self.gamma}")


class FMN(Attack):
    """Fast Minimum-Norm attack, minimal perturbation thresholded per epsilon (foolbox ``*FMNAttack``).

    Distance Measure: the subclass's norm. Arguments: ``FMNParams``. Shape: images (N, C, H, W)
    in [0,1], labels (N,). Example::

        from bench.attacks.fmn import L2FMN
        adversarials = L2FMN().run(model, x, y, [0.5, 1.0])
    """

    minimization = True
    backends = ("foolbox",)  # ART 1.20 has no FMN
    Params = FMNParams
    foolbox_class: ClassVar[str] = ""

    def minimize_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import foolbox

        p = self.params
        attack = getattr(foolbox.attacks, self.foolbox_class)(
            steps=p.steps, max_stepsize=p.max_stepsize, min_stepsize=p.min_stepsize, gamma=p.gamma
        )
        # Points FMN fails on come back unchanged (its best perturbation starts at zero).
        return attack.run(foolbox_model(model, x.device), x, foolbox.criteria.Misclassification(y))


@ATTACKS.register("fmn-linf")
class LinfFMN(FMN):
    """FMN in L-inf (foolbox LInfFMNAttack)."""

    norm = Norm.LINF
    foolbox_class = "LInfFMNAttack"


@ATTACKS.register("fmn-l2")
class L2FMN(FMN):
    """FMN in L2 (foolbox L2FMNAttack)."""

    norm = Norm.L2
    foolbox_class = "L2FMNAttack"


@ATTACKS.register("fmn-l1")
class L1FMN(FMN):
    """FMN in L1 (foolbox L1FMNAttack)."""

    norm = Norm.L1
    foolbox_class = "L1FMNAttack"
