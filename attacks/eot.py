"""Expectation over Transformation: how every attack sees a randomized defense."""
from __future__ import annotations

import math

import torch
from torch import nn


class EOT(nn.Module):
    """Expectation over Transformation for a randomized model (Athalye et al. 2018).

    Each forward pass evaluates ``draws`` independent noise draws of ``model`` on every input and
    returns the log of the mean softmax: the logits of the expected prediction, so gradients are
    averaged over the noise and success is judged by the expected scores, as PixelDP predicts.

    The draws run in sub-batches of at most ``max_batch`` rows (``draws`` copies of a 64-image
    chunk would be one batch of 1,280, several times slower per image on CPU); the mean is taken
    in log space (logsumexp), so a class with tiny probability still gets a gradient.
    """

    def __init__(self, model: nn.Module, draws: int, max_batch: int = 128):
        super().__init__()
        if draws < 1:
            raise ValueError("EOT needs at least one draw")
        self.model = model
        self.draws = draws
        self.max_batch = max_batch
        # Only the wrapper's own flag (not the wrapped model's): foolbox warns about modules in
        # training mode, and the wrapper has no layers whose behaviour depends on it.
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_call = max(1, min(self.draws, self.max_batch // max(1, len(x))))
        log_probabilities = []
        done = 0
        while done < self.draws:
            k = min(per_call, self.draws - done)
            repeated = x.repeat((k,) + (1,) * (x.dim() - 1))  # draw-major: rows [d*n:(d+1)*n] are draw d
            log_probabilities.append(torch.log_softmax(self.model(repeated), dim=1).view(k, len(x), -1))
            done += k
        stacked = torch.cat(log_probabilities)  # draws x n x classes
        return torch.logsumexp(stacked, dim=0) - math.log(self.draws)


def is_randomized(model: nn.Module) -> bool:
    """Whether an attack is facing a randomized defense (the harness always wraps those in EOT)."""
    return isinstance(model, EOT)
