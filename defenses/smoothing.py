"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): Gaussian data augmentation, a Monte
Carlo prediction with a binomial test, and an L2 certificate sigma * Phi^-1(lower bound on p_A)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError
from bench.progress import progress
from bench.registry import DEFENSES
from bench.defenses.base import ABSTAIN, Certificate, Defense
from bench.confidence import clopper_pearson_bounds


class GaussianNoise(nn.Module):
    """``model(x + N(0, sigma^2 I))`` with a fresh draw on every call (pixel space, no clipping,
    as in Cohen et al.)."""

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        self.model = model
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


def smoothing_radius(count: int, draws: int, sigma: float, alpha: float) -> float:
    """Cohen et al.'s CERTIFY radius from ``count`` of ``draws`` votes for the selected class:
    sigma * Phi^-1(p_lower) with the one-sided Clopper-Pearson bound at ``alpha``; 0 (abstain)
    when p_lower <= 0.5."""
    from scipy.stats import norm  # here, not at import: bad input fails before scipy.stats loads

    lower = float(clopper_pearson_bounds(count, draws, alpha)[0])
    return sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0


@DEFENSES.register("smoothing")
class Smoothing(Defense):
    """Gaussian randomized smoothing: certified L2 radius sigma * Phi^-1(p_A lower bound)."""

    randomized = True
    certifies = True

    @dataclass
    class Params:
        sigma: float = 0.25
        n0: int = 100  # selection draws (Cohen et al.: 100)
        n: int = 1000  # estimation draws (Cohen et al.: 100,000; 1,000 caps the radius at 2.4 sigma)
        alpha: float = 0.001
        draw_batch: int = 256  # noisy copies per forward pass; larger batches are slower per image on CPU

        def check(self) -> None:
            if not (self.sigma > 0 and self.n0 >= 1 and self.n >= 1 and 0 < self.alpha < 1 and self.draw_batch >= 1):
                raise BenchError(f"smoothing parameters need sigma > 0, n0 >= 1, n >= 1, 0 < alpha < 1, draw_batch >= 1; got {self}")

    params: Params  # this defense's parameters (``Defense.params``)

    def __init__(self, model: nn.Module, params: Params | None = None, device: str = "cpu"):
        super().__init__(model, params, device)
        self.params.check()

    def attack_model(self) -> nn.Module:
        # Training through this module is Cohen et al.'s Gaussian data augmentation.
        return GaussianNoise(self.model, self.params.sigma)

    @torch.no_grad()
    def counts(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        """Per input, how many of ``draws`` noisy copies the base classifier puts in each class."""
        self.model.eval()
        if len(x) == 0:
            return torch.zeros(0, 0, dtype=torch.long)
        noisy = self.attack_model()
        per_pass = min(draws, self.params.draw_batch)  # copies of one image per pass
        group = max(1, self.params.draw_batch // per_pass)  # images per pass
        parts = []
        for start in progress(range(0, len(x), group), f"smoothing {draws} draws per image", unit="group"):
            xs = x[start:start + group].to(self.device)
            total = None
            remaining = draws
            while remaining > 0:
                k = min(remaining, per_pass)
                labels = noisy(xs.repeat_interleave(k, dim=0)).argmax(1).view(len(xs), k)
                votes = F.one_hot(labels, self._num_classes(xs)).sum(1)
                total = votes if total is None else total + votes
                remaining -= k
            parts.append(total.cpu())
        return torch.cat(parts)

    def _num_classes(self, x: torch.Tensor) -> int:
        if not hasattr(self, "_classes"):
            with torch.no_grad():
                self._classes = int(self.model(x[:1]).shape[1])
        return self._classes

    def predict_from_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Cohen et al.'s PREDICT: the top class if a two-sided binomial test says it beats the
        runner-up at level alpha, else ``ABSTAIN``."""
        from scipy.stats import binomtest  # here, not at import: bad input fails before scipy.stats loads

        top2 = counts.topk(2, dim=1)
        labels = []
        for (first, second), label in zip(top2.values.tolist(), top2.indices[:, 0].tolist()):
            significant = binomtest(first, first + second, 0.5).pvalue <= self.params.alpha
            labels.append(label if significant else ABSTAIN)
        return torch.tensor(labels, dtype=torch.long)

    def certify_from_counts(self, selection: torch.Tensor, estimation: torch.Tensor) -> Certificate:
        """Cohen et al.'s CERTIFY: class from the selection draws, radius from the estimation draws;
        the guarantee holds with probability at least 1 - alpha; an abstention is not certified."""
        guess = selection.argmax(1)
        labels, radii = [], []
        for label, count in zip(guess.tolist(), estimation.gather(1, guess[:, None])[:, 0].tolist()):
            radius = smoothing_radius(count, self.params.n, self.params.sigma, self.params.alpha)
            labels.append(label if radius > 0 else ABSTAIN)
            radii.append(radius)
        return Certificate(torch.tensor(labels, dtype=torch.long), torch.tensor(radii), "l2",
                           confidence=1 - self.params.alpha)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_counts(self.counts(x, self.params.n))

    def certify(self, x: torch.Tensor) -> Certificate:
        return self.certify_from_counts(self.counts(x, self.params.n0), self.counts(x, self.params.n))

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, Certificate]:
        # PREDICT runs its test on CERTIFY's estimation draws: each procedure keeps its own
        # guarantee, and the draws are the cost.
        selection, estimation = self.counts(x, self.params.n0), self.counts(x, self.params.n)
        return self.predict_from_counts(estimation), self.certify_from_counts(selection, estimation)
