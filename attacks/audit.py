"""Attacks that do not trust the defense's gradients (Athalye et al. 2018; Carlini et al. 2019).

- ``square-linf`` / ``square-l2``: Square (Andriushchenko et al. 2020), a score-based attack that
  never asks for a gradient, as AutoAttack runs it (Croce & Hein's code, ``pyautoattack``);
- ``transfer-linf`` / ``transfer-l2``: PGD on an undefended surrogate of the same architecture
  trained on the same data, the adversarials replayed against the defense;
- ``bpda-linf`` / ``bpda-l2``: PGD through the differentiable approximation the defense offers
  (``Defense.bpda_model()``, e.g. :class:`StraightThrough` around non-differentiable preprocessing).

A masked, shattered or saturated gradient stops every gradient attack but none of the first two,
so the harness adds them to every evaluation that attacks a norm (``audit``), and the per-point
worst case over all attacks is the headline figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from bench.attacks.autoattack import run_square
from bench.attacks.base import Attack, Predict
from bench.attacks.pgd import PGD, PGDParams, L2PGD, LinfPGD
from bench.errors import BenchError
from bench.registry import ATTACKS
from bench.types import Norm

@dataclass
class SquareParams:
    """``--attack-param`` keys of the Square attacks. 1,000 queries rather than AutoAttack's 5,000:
    the audit only has to show that a gradient-free attack does better than the gradient ones
    (``benchmarks/bench_audit.py`` measures what the extra queries add)."""

    queries: int = 1000
    p_init: float = 0.8
    seed: int = 0

    def check(self) -> None:
        if self.queries < 1:
            raise BenchError(f"square queries must be at least 1, got {self.queries}")
        if not 0 < self.p_init <= 1:
            raise BenchError(f"square p_init must be in (0, 1], got {self.p_init}")


class Square(Attack):
    """Square attack: random square-shaped updates kept when they lower the margin of the true class.

    Distance Measure: the subclass's norm (L-inf or L2). Arguments: ``SquareParams`` (``queries``,
    ``p_init``, ``seed``). Shape: images (N, C, H, W) in [0,1], labels (N,). Example::

        from bench.attacks.audit import LinfSquare
        adversarials = LinfSquare().run(model, x, y, [0.1])

    Needs the model's scores only, so gradient masking does not stop it.
    """

    Params = SquareParams
    kind = "gradient-free"
    # Square queries the model about 50x as often as PGD-20 steps; on randomized defenses it
    # averages 5 draws per query rather than 20 (docs/adaptive.md: 6x cheaper, no weaker there).
    max_eot_draws = 5
    # Square's time goes to per-query Python overhead, not to the model: larger chunks are cheaper per image.
    default_chunk = 256

    def perturb_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> list[torch.Tensor]:
        # The epsilon sweep (Attack.run) calls this with one budget, on the points smaller budgets left robust.
        return [run_square(model, x, y, eps, self.norm, self.params.queries, self.params.seed, self.params.p_init)
                for eps in epsilons]


@ATTACKS.register("square-linf")
class LinfSquare(Square):
    """L-inf Square attack (gradient-free; Croce & Hein's implementation)."""

    norm = Norm.LINF


@ATTACKS.register("square-l2")
class L2Square(Square):
    """L2 Square attack (gradient-free; Croce & Hein's implementation)."""

    norm = Norm.L2


@dataclass
class SurrogatePGDParams:
    """``--attack-param`` keys of the transfer and BPDA attacks: one PGD walk on the other model
    (the defense's rule judges the result; restarts on a model that is not the defense add little)."""

    steps: int = 20
    restarts: int = 1

    def check(self) -> None:
        if self.steps < 1 or self.restarts < 1:
            raise BenchError("steps and restarts must be at least 1")


class SurrogatePGD(Attack):
    """PGD on a model other than the defense's own attack model; ``target`` says which."""

    Params = SurrogatePGDParams
    pgd: ClassVar[type[PGD]] = LinfPGD

    def perturb_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> list[torch.Tensor]:
        pgd = self.pgd(PGDParams(steps=self.params.steps, restarts=self.params.restarts))
        return pgd.perturb_chunk(model, x, y, epsilons, predict)


class Transfer(SurrogatePGD):
    """Transfer attack: PGD on an undefended surrogate (same architecture, same training data,
    standard training), replayed against the defense.

    Distance Measure: the subclass's norm. Arguments: ``SurrogatePGDParams``. The harness gives
    the surrogate as ``model`` (``bench.api.surrogate_model``); called directly, pass your own.
    """

    kind = "transfer"
    target = "surrogate"


@ATTACKS.register("transfer-linf")
class LinfTransfer(Transfer):
    """L-inf PGD on an undefended surrogate, replayed against the defense."""

    norm = Norm.LINF
    pgd = LinfPGD


@ATTACKS.register("transfer-l2")
class L2Transfer(Transfer):
    """L2 PGD on an undefended surrogate, replayed against the defense."""

    norm = Norm.L2
    pgd = L2PGD


class BPDA(SurrogatePGD):
    """BPDA (Athalye et al. 2018): PGD through the defense's differentiable approximation
    (``Defense.bpda_model()``: the same forward pass, gradients through a substitute for the
    non-differentiable parts), judged by the defense's own rule.

    Distance Measure: the subclass's norm. Arguments: ``SurrogatePGDParams``. A randomized
    defense's approximation is attacked through EOT like its attack model.
    """

    kind = "adaptive"
    target = "bpda"


@ATTACKS.register("bpda-linf")
class LinfBPDA(BPDA):
    """L-inf PGD through the differentiable approximation the defense offers (its bpda_model())."""

    norm = Norm.LINF
    pgd = LinfPGD


@ATTACKS.register("bpda-l2")
class L2BPDA(BPDA):
    """L2 PGD through the differentiable approximation the defense offers (its bpda_model())."""

    norm = Norm.L2
    pgd = L2PGD


class StraightThrough(nn.Module):
    """``classifier(preprocess(x))`` forward, with the identity as ``preprocess``'s gradient:
    BPDA's straight-through estimator for preprocessing that is (close to) the identity but not
    differentiable (quantization, JPEG, denoisers run outside autograd)."""

    def __init__(self, preprocess: Callable[[torch.Tensor], torch.Tensor], classifier: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            processed = self.preprocess(x.detach())
        return self.classifier(x + (processed.to(x) - x).detach())
