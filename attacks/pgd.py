"""Projected gradient descent (Madry et al. 2018) in L-inf and L2, over foolbox or ART."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from bench.attacks.adapters import art_classifier, foolbox_model, num_classes, to_numpy
from bench.attacks.base import Attack, DEFAULT_EPSILONS, Predict
from bench.errors import BenchError
from bench.registry import ATTACKS


@dataclass
class PGDParams:
    """``--attack-param`` keys of both PGD attacks.

    The step is ``abs_stepsize`` when given, else ``rel_stepsize * epsilon``, else
    ``2.5 * epsilon / steps`` (Madry et al.'s rule: the walk can cross the ball 1.25 times).
    """

    # 20 steps x 1 walk keep quick runs quick (the README example, the default digits command).
    # Not a strength standard: on the digits madry model at L-inf 0.2 (500 images) 20 x 1 left
    # 7.2%, 100 x 1 6.8%, 50 x 5 5.0%, the same as autoattack-linf (docs/attacks.md). For figures
    # to quote use autoattack-*, or --attack-param steps=50 --attack-param restarts=5 (12.5x the cost).
    steps: int = 20
    rel_stepsize: float | None = None
    abs_stepsize: float | None = None
    random_start: bool = True
    restarts: int = 1

    def check(self) -> None:
        if self.steps < 1:
            raise BenchError(f"pgd steps must be at least 1, got {self.steps}")
        if self.restarts < 1:
            raise BenchError(f"pgd restarts must be at least 1, got {self.restarts}")
        if self.restarts > 1 and not self.random_start:
            raise BenchError("pgd restarts > 1 need random_start=true (without it every restart is the same walk)")
        for key in ("rel_stepsize", "abs_stepsize"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise BenchError(f"pgd {key} must be positive, got {value}")

    def relative_step(self) -> float:
        return self.rel_stepsize if self.rel_stepsize is not None else 2.5 / self.steps


class PGD(Attack):
    """Base of the PGD attacks: the subclasses only name their norm and library classes.

    Restarts: a sample counts as broken if any restart breaks it, and keeps the adversarial of a
    successful restart (foolbox ``Attack.repeat``, ART ``num_random_init`` do exactly this).
    """

    Params = PGDParams
    foolbox_class: ClassVar[str] = ""
    art_norm: ClassVar[float] = np.inf

    def perturb_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> list[torch.Tensor]:
        if self.backend == "art":
            return self._art(model, x, y, epsilons)
        return self._foolbox(model, x, y, epsilons)

    def _foolbox(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float]) -> list[torch.Tensor]:
        import foolbox

        p = self.params
        attack = getattr(foolbox.attacks, self.foolbox_class)(
            rel_stepsize=p.relative_step(), abs_stepsize=p.abs_stepsize, steps=p.steps, random_start=p.random_start
        )
        fmodel = foolbox_model(model, x.device)
        if p.restarts > 1:
            _, clipped, _ = attack.repeat(p.restarts)(fmodel, x, y, epsilons=epsilons)
            return list(clipped)
        # One walk: ``run`` is ``__call__`` without its final success check, an extra forward
        # pass per epsilon (5% of a 20-step PGD) whose verdict the runner recomputes anyway.
        criterion = foolbox.criteria.Misclassification(y)
        return [attack.run(fmodel, x, criterion, epsilon=eps) for eps in epsilons]

    def _art(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float]) -> list[torch.Tensor]:
        from art.attacks.evasion import ProjectedGradientDescentPyTorch

        p = self.params
        classifier = art_classifier(model, x, num_classes(model, x))
        x_np, y_np = to_numpy(x), y.cpu().numpy()
        results = []
        for eps in epsilons:
            attack = ProjectedGradientDescentPyTorch(
                classifier,
                norm=self.art_norm,
                eps=eps,
                eps_step=p.abs_stepsize if p.abs_stepsize is not None else p.relative_step() * eps,
                max_iter=p.steps,
                num_random_init=p.restarts if p.random_start else 0,
                batch_size=len(x),
                verbose=False,
            )
            with warnings.catch_warnings():
                # ART 1.20 with num_random_init > 1 hands torch tensors to compute_success_array,
                # which calls np.array(tensor): harmless, but numpy 2 warns (DeprecationWarning).
                warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
                results.append(torch.from_numpy(attack.generate(x_np, y_np)))
        return results


@ATTACKS.register("pgd-linf")
class LinfPGD(PGD):
    """L-inf projected gradient descent (foolbox LinfPGD / ART ProjectedGradientDescentPyTorch)."""

    name = "pgd-linf"
    norm = "linf"
    foolbox_class = "LinfPGD"
    art_norm = np.inf
    # 0.3 is the MNIST standard; digits 8x8 break between 0.02 and 0.1.
    default_epsilons = DEFAULT_EPSILONS["linf"]


@ATTACKS.register("pgd-l2")
class L2PGD(PGD):
    """L2 projected gradient descent (foolbox L2PGD / ART ProjectedGradientDescentPyTorch)."""

    name = "pgd-l2"
    norm = "l2"
    foolbox_class = "L2PGD"
    art_norm = 2
    # Pixel-space L2: digits (64 values) break around 0.5-1, MNIST (784 values) around 1-2.
    default_epsilons = DEFAULT_EPSILONS["l2"]
