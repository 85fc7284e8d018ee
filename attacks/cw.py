"""Carlini-Wagner minimisation attacks (Carlini & Wagner 2017): L2 over foolbox or ART, L-inf over ART.

Both run once and are thresholded per epsilon by :class:`bench.attacks.base.Attack`: accuracy at size
t is the fraction of points whose smallest successful perturbation is larger than t (PixelDP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.attacks.base import Attack, art_classifier, foolbox_model, num_classes, to_numpy
from bench.errors import BenchError
from bench.registry import ATTACKS


@dataclass
class CWL2Params:
    """``--attack-param`` keys of cw-l2; defaults are the PixelDP reference's (9 binary-search
    steps of 100 Adam iterations, learning rate 0.01, initial constant 0.001, confidence 0)."""

    binary_search_steps: int = 9
    steps: int = 100
    learning_rate: float = 0.01
    confidence: float = 0.0
    initial_const: float = 0.001
    # foolbox only: stop a binary-search step once the loss stalls (same adversarials, ~9x faster).
    abort_early: bool = True

    def check(self) -> None:
        if self.binary_search_steps < 1 or self.steps < 1:
            raise BenchError("cw-l2 binary_search_steps and steps must be at least 1")
        if self.learning_rate <= 0 or self.initial_const <= 0 or self.confidence < 0:
            raise BenchError("cw-l2 learning_rate and initial_const must be positive, confidence non-negative")


@ATTACKS.register("cw-l2")
class CarliniWagnerL2(Attack):
    """Carlini-Wagner L2, minimal perturbation thresholded per epsilon (foolbox / ART CarliniL2Method)."""

    name = "cw-l2"
    norm = "l2"
    minimization = True
    Params = CWL2Params
    default_epsilons = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)  # the pgd-l2 grid, so curves line up

    def minimize(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.backend == "art":
            from art.attacks.evasion import CarliniL2Method

            attack = CarliniL2Method(
                art_classifier(model, x, num_classes(model, x)),
                confidence=p.confidence,
                learning_rate=p.learning_rate,
                binary_search_steps=p.binary_search_steps,
                max_iter=p.steps,
                initial_const=p.initial_const,
                batch_size=len(x),  # ART's default batch of 1 is several times slower
                verbose=False,
            )
            return torch.from_numpy(attack.generate(to_numpy(x), y.cpu().numpy()))
        import foolbox

        attack = foolbox.attacks.L2CarliniWagnerAttack(
            binary_search_steps=p.binary_search_steps,
            steps=p.steps,
            stepsize=p.learning_rate,
            confidence=p.confidence,
            initial_const=p.initial_const,
            abort_early=p.abort_early,
        )
        # epsilons=None asks for the minimal adversarial; failed points come back as all-zero
        # images (foolbox initialises its best adversarials with zeros), which the base replaces.
        _, clipped, _ = attack(foolbox_model(model, x.device), x, y, epsilons=None)
        return clipped


@dataclass
class CWLinfParams:
    """``--attack-param`` keys of cw-linf (ART CarliniLInfMethod's; its defaults except
    initial_const, raised from 1e-5 to 1e-3 to halve the constant search, which is per sample)."""

    steps: int = 10
    learning_rate: float = 0.01
    confidence: float = 0.0
    initial_const: float = 0.001
    largest_const: float = 20.0
    const_factor: float = 2.0
    decrease_factor: float = 0.9

    def check(self) -> None:
        if self.steps < 1 or self.learning_rate <= 0 or self.initial_const <= 0:
            raise BenchError("cw-linf steps, learning_rate and initial_const must be positive")
        if not 0 < self.decrease_factor < 1 or self.const_factor <= 1:
            raise BenchError("cw-linf needs 0 < decrease_factor < 1 and const_factor > 1")


@ATTACKS.register("cw-linf")
class CarliniWagnerLinf(Attack):
    """Carlini-Wagner L-inf, minimal perturbation thresholded per epsilon (ART only; slow: one image at a time)."""

    name = "cw-linf"
    norm = "linf"
    minimization = True
    Params = CWLinfParams
    backends = ("art",)  # foolbox 3.3.4 has no Carlini-Wagner L-inf
    default_epsilons = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)  # the pgd-linf grid

    def __init__(self, params: object = None, backend: str = "art", chunk_size: int = 64):
        # The runner passes the run's backend (foolbox unless --attack-backend art); cw-linf has
        # only ART, and the base class turns any other request into a one-line error.
        super().__init__(params, backend, chunk_size)

    def minimize(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from art.attacks.evasion import CarliniLInfMethod

        p = self.params
        attack = CarliniLInfMethod(
            art_classifier(model, x, num_classes(model, x)),
            confidence=p.confidence,
            learning_rate=p.learning_rate,
            max_iter=p.steps,
            decrease_factor=p.decrease_factor,
            initial_const=p.initial_const,
            largest_const=p.largest_const,
            const_factor=p.const_factor,
            batch_size=len(x),
            verbose=False,
        )
        return torch.from_numpy(attack.generate(to_numpy(x), y.cpu().numpy()))
