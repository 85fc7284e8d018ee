"""PGD adversarial training (Madry et al. 2018), with the harness's own PGD as the inner attack."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError
from bench.registry import ATTACKS, DEFENSES
from bench.defenses.base import Defense


@DEFENSES.register("madry")
class Madry(Defense):
    """Adversarial training on PGD examples; the defaults are Madry et al.'s CIFAR-10 recipe
    (L-inf 8/255, 7 steps of 2/255, random start, every example adversarial); runs on digits,
    MNIST and Fashion-MNIST train at epsilon 0.1 (bench.training.TRAINING_DEFAULTS, bench list)."""


    @dataclass
    class Params:
        norm: Literal["linf", "l2"] = "linf"
        epsilon: float = 8 / 255
        steps: int = 7
        # 0: epsilon / 4, the recipe's 2/255 for 8/255.
        step_size: float = 0.0
        random_start: bool = True
        # Fraction of each batch replaced by its adversarial examples (Madry et al.: 1).
        adversarial_fraction: float = 1.0

        def check(self) -> None:
            if not (self.epsilon > 0 and self.steps >= 1 and self.step_size >= 0 and 0 <= self.adversarial_fraction <= 1):
                raise BenchError(f"madry parameters need epsilon > 0, steps >= 1, step_size >= 0, 0 <= adversarial_fraction <= 1; got {self}")

    params: Params  # this defense's parameters (``Defense.params``)

    def __init__(self, model: nn.Module, params: Params | None = None, device: str = "cpu"):
        super().__init__(model, params, device)
        p = self.params
        p.check()
        attack_class = ATTACKS.get(f"pgd-{p.norm}")
        self.attack = attack_class(
            attack_class.Params(steps=p.steps, abs_stepsize=p.step_size or p.epsilon / 4, random_start=p.random_start,
                                restarts=1)  # one walk per batch, as Madry et al. train (pgd's evaluation default is 5)
        )

    @classmethod
    def training_cost(cls, params: Params) -> float:
        return 1.0 + params.adversarial_fraction * params.steps  # each PGD step: a forward and backward pass

    def adversarial_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` with its first ``adversarial_fraction`` replaced by PGD examples at ``epsilon``."""
        count = round(self.params.adversarial_fraction * len(x))
        if count == 0:
            return x
        # The attack sees the model as the evaluation will (eval mode: no batch-norm updates from
        # adversarial probes, and foolbox refuses to warn-free attack a module in training mode).
        self.model.eval()
        try:
            x_adv = self.attack.perturb(self.model, x[:count], y[:count], self.params.epsilon)
        finally:
            self.model.train()
        return torch.cat([x_adv.detach(), x[count:]])

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(self.adversarial_batch(x, y)), y)
