"""The Attack interface and the EOT wrapper for randomized defenses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a perturbation batch, in pixel units."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "l1":
        return flat.abs().sum(1)
    raise ValueError(f"unknown norm {norm!r}")


class Attack:
    """Base of every attack: ``run(model, x, y, epsilons)`` -> one adversarial batch per epsilon.

    ``model`` maps images in [0,1] to logits. Fixed-budget attacks (PGD) run once per epsilon;
    minimisation attacks (``minimization = True``, e.g. Carlini-Wagner) implement
    ``minimal(model, x, y)`` and are thresholded per epsilon: a sample keeps its smallest
    successful perturbation where that has norm <= epsilon and stays clean otherwise.
    """

    name: ClassVar[str] = ""
    norm: ClassVar[str] = "linf"
    minimization: ClassVar[bool] = False
    default_epsilons: ClassVar[tuple[float, ...]] = ()

    @dataclass
    class Params:
        pass

    def __init__(self, params: object = None, backend: str = "foolbox"):
        self.params = params if params is not None else self.Params()
        self.backend = backend

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]) -> list[torch.Tensor]:
        if not self.minimization:
            raise NotImplementedError
        smallest = self.minimal(model, x, y)
        distance = perturbation_norm(smallest - x, self.norm)
        view = (-1,) + (1,) * (x.dim() - 1)
        return [torch.where((distance <= eps).view(view), smallest, x) for eps in epsilons]

    def minimal(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EOT(nn.Module):
    """Expectation over Transformation for a randomized model (Athalye et al. 2018).

    Each forward pass evaluates ``draws`` independent noise draws of ``model`` on every input and
    returns the log of the mean softmax: the logits of the expected prediction, so gradients are
    averaged over the noise and success is judged by the expected scores, as PixelDP predicts.
    """

    def __init__(self, model: nn.Module, draws: int):
        super().__init__()
        if draws < 1:
            raise ValueError("EOT needs at least one draw")
        self.model = model
        self.draws = draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeated = x.repeat_interleave(self.draws, dim=0)
        probabilities = torch.softmax(self.model(repeated), dim=1)
        expected = probabilities.view(len(x), self.draws, -1).mean(1)
        return torch.log(expected.clamp_min(1e-12))
