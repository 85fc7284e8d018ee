"""Projected gradient descent (Madry et al. 2018) in L-inf and L2, over foolbox or ART."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from bench.attacks.adapters import art_classifier, foolbox_model, num_classes, to_numpy
from bench.attacks.base import Attack, Predict, project
from bench.errors import BenchError
from bench.registry import ATTACKS
from bench.types import Norm

# One PGD walk from a fresh random start: (images, labels, epsilon) -> adversarials.
Walk = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class PGDParams:
    """``--attack-param`` keys of both PGD attacks.

    The step is ``abs_stepsize`` when given, else ``rel_stepsize * epsilon``, else
    ``2.5 * epsilon / steps`` (Madry et al.'s rule: the walk can cross the ball 1.25 times).
    """

    # 20 steps x 10 walks, each walk after the first only on the points still robust (so the cost
    # follows the points left robust, up to 10x PGD-20): the cheapest setting within 1 point of
    # autoattack-linf on the digits madry model (docs/attacks.md has the runs). For quick looks
    # pass restarts=1.
    steps: int = 20
    rel_stepsize: float | None = None
    abs_stepsize: float | None = None
    random_start: bool = True
    restarts: int = 10

    def check(self) -> None:
        if self.steps < 1:
            raise BenchError(f"pgd steps must be at least 1, got {self.steps}")
        if self.restarts < 1:
            raise BenchError(f"pgd restarts must be at least 1, got {self.restarts}")
        if self.restarts > 1 and not self.random_start:
            raise BenchError(f"pgd random_start=false needs restarts=1 (got {self.restarts}; default 10): "
                             "without random starts every restart is the same walk")
        for key in ("rel_stepsize", "abs_stepsize"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise BenchError(f"pgd {key} must be positive, got {value}")

    def relative_step(self) -> float:
        return self.rel_stepsize if self.rel_stepsize is not None else 2.5 / self.steps


class PGD(Attack):
    """Base of the PGD attacks: the subclasses only name their norm and library classes.

    Restarts: each walk after the first runs only on the samples still robust (``_restarted``).
    """

    Params = PGDParams
    foolbox_class: ClassVar[str] = ""
    art_norm: ClassVar[float] = np.inf

    def perturb_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> list[torch.Tensor]:
        walk = self._art_walk(model, x) if self.backend == "art" else self._foolbox_walk(model, x)
        return [self._restarted(walk, x, y, eps, predict)[0] for eps in epsilons]

    def judged_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, predict: Predict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.params.restarts == 1:
            return super().judged_chunk(model, x, y, epsilon, predict)
        walk = self._art_walk(model, x) if self.backend == "art" else self._foolbox_walk(model, x)
        best, robust = self._restarted(walk, x, y, epsilon, predict)
        return best, ~robust

    def _restarted(self, walk: Walk, x: torch.Tensor, y: torch.Tensor, eps: float,
                   predict: Predict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``restarts`` walks at one epsilon, each after the first only on the samples that no
        earlier walk broke (as AutoAttack's APGD restarts): a sample is broken if any walk breaks
        it, by ``predict`` (the defense's own rule in a run: on a randomized defense a walk that
        only looked successful to the 20-draw EOT mean gets its restarts), and keeps the first
        successful walk's adversarial; the others keep the first walk's. Points that break
        easily cost one walk, not ``restarts``."""
        best = project(x, walk(x, y, eps).to(x), eps, self.norm)
        if self.params.restarts == 1:
            return best, None  # no verdict needed: the sweep judges with the defense's rule
        robust = predict(best).to(y.device) == y
        for _ in range(self.params.restarts - 1):
            index = robust.nonzero().flatten()
            if len(index) == 0:
                break
            x_adv = project(x[index], walk(x[index], y[index], eps).to(x), eps, self.norm)
            broken = predict(x_adv).to(y.device) != y[index]
            best[index[broken]] = x_adv[broken]
            robust[index[broken]] = False
        return best, robust

    def _foolbox_walk(self, model: nn.Module, x: torch.Tensor) -> Walk:
        import foolbox

        p = self.params
        attack = getattr(foolbox.attacks, self.foolbox_class)(
            rel_stepsize=p.relative_step(), abs_stepsize=p.abs_stepsize, steps=p.steps, random_start=p.random_start
        )
        fmodel = foolbox_model(model, x.device)

        def walk(xs: torch.Tensor, ys: torch.Tensor, eps: float) -> torch.Tensor:
            # ``run`` is ``__call__`` without its final success check, an extra forward pass per
            # epsilon (5% of a 20-step PGD); ``_restarted`` judges only where restarts need it.
            return attack.run(fmodel, xs, foolbox.criteria.Misclassification(ys), epsilon=eps)

        return walk

    def _art_walk(self, model: nn.Module, x: torch.Tensor) -> Walk:
        from art.attacks.evasion import ProjectedGradientDescentPyTorch

        p = self.params
        classifier = art_classifier(model, x, num_classes(model, x))

        def walk(xs: torch.Tensor, ys: torch.Tensor, eps: float) -> torch.Tensor:
            # One random start per walk (ART's num_random_init=1); restarts are ``_restarted``'s,
            # since ART's own num_random_init re-runs every restart on every sample.
            attack = ProjectedGradientDescentPyTorch(
                classifier,
                norm=self.art_norm,
                eps=eps,
                eps_step=p.abs_stepsize if p.abs_stepsize is not None else p.relative_step() * eps,
                max_iter=p.steps,
                num_random_init=1 if p.random_start else 0,
                batch_size=len(xs),
                verbose=False,
            )
            return torch.from_numpy(attack.generate(to_numpy(xs), ys.cpu().numpy()))

        return walk


@ATTACKS.register("pgd-linf")
class LinfPGD(PGD):
    """L-inf projected gradient descent (foolbox LinfPGD / ART ProjectedGradientDescentPyTorch)."""

    norm = Norm.LINF
    foolbox_class = "LinfPGD"
    art_norm = np.inf


@ATTACKS.register("pgd-l2")
class L2PGD(PGD):
    """L2 projected gradient descent (foolbox L2PGD / ART ProjectedGradientDescentPyTorch)."""

    norm = Norm.L2
    foolbox_class = "L2PGD"
    art_norm = 2
