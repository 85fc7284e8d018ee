"""The Attack interface, the EOT wrapper for randomized defenses and the library adapters they share.

An attack is a thin subclass of :class:`Attack` that says which norm it works in and how to call
foolbox or ART on one chunk of images; the base class does the rest (chunking, zero budgets,
keeping results in [0,1] and inside the budget, thresholding minimisation attacks).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bench.errors import BenchError
from bench.progress import progress

BACKENDS = ("foolbox", "art")

# 64 images per batch is the fastest on 2 CPU cores (DESIGN.md: PGD-20 on 256 images took
# 2.4-2.9 s as one batch and 1.6 s as 4 x 64).
DEFAULT_CHUNK = 64


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


def project(x: torch.Tensor, x_adv: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """``x_adv`` moved into [0,1] and into the ``norm`` ball of radius ``epsilon`` around ``x``.

    The libraries already do both; this only removes float round-off (e.g. a linf step landing at
    eps + 1e-7), so that every stored adversarial provably respects its budget.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-epsilon, epsilon)
    elif norm == "l2":
        norms = perturbation_norm(delta, "l2").clamp_min(1e-12)
        factor = (epsilon / norms).clamp(max=1.0)
        delta = delta * factor.view((-1,) + (1,) * (x.dim() - 1))
    else:
        raise ValueError(f"cannot project onto a {norm} ball")
    return (x + delta).clamp(0.0, 1.0)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients while an attack runs, then get their flags back.

    foolbox (through eagerpy) and ART take input gradients with ``loss.backward()``, which also
    computes and accumulates every weight gradient: 1.4x the cost of a hand-written PGD loop
    (measured on the digits and MNIST CNNs). Attacks only need the gradient wrt the input.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


class Attack:
    """Base of every attack: ``run(model, x, y, epsilons)`` -> one adversarial batch per epsilon.

    ``model`` maps images in [0,1] (NCHW) to logits. Epsilons are in [0,1] pixel units of
    ``norm``. Fixed-budget attacks (PGD) implement ``perturb(model, x, y, epsilons)`` and run
    once per epsilon; minimisation attacks (``minimization = True``, e.g. Carlini-Wagner)
    implement ``minimize(model, x, y)``, run once, and are thresholded per epsilon: a sample keeps
    its smallest successful perturbation where that has norm <= epsilon and stays clean otherwise.
    Both hooks see one chunk of at most ``chunk_size`` images.
    """

    name: ClassVar[str] = ""
    norm: ClassVar[str] = "linf"
    minimization: ClassVar[bool] = False
    default_epsilons: ClassVar[tuple[float, ...]] = ()
    backends: ClassVar[tuple[str, ...]] = BACKENDS

    @dataclass
    class Params:
        pass

    def __init__(self, params: object = None, backend: str = "foolbox", chunk_size: int = DEFAULT_CHUNK):
        self.params = params if params is not None else self.Params()
        if backend not in self.backends:
            raise BenchError(
                f"attack {self.name or type(self).__name__} has no {backend!r} backend; "
                f"use --attack-backend {' or '.join(self.backends)}"
            )
        self.backend = backend
        self.chunk_size = chunk_size

    # -- what the runner calls ----------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]) -> list[torch.Tensor]:
        """Adversarial inputs for every epsilon, each in [0,1] and within epsilon of ``x``."""
        epsilons = [float(eps) for eps in epsilons]
        with frozen_parameters(model):
            if self.minimization:
                return self.threshold(x, self.minimal(model, x, y), epsilons)
            return self._fixed_budget(model, x, y, epsilons)

    def _fixed_budget(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float]) -> list[torch.Tensor]:
        results: list[list[torch.Tensor]] = [[] for _ in epsilons]
        nonzero = [i for i, eps in enumerate(epsilons) if eps > 0]
        for start in progress(range(0, len(x), self.chunk_size), f"{self.name or type(self).__name__} batches"):
            xc, yc = x[start:start + self.chunk_size], y[start:start + self.chunk_size]
            for i, eps in enumerate(epsilons):
                if eps <= 0:  # a zero budget is the clean input; ART refuses eps = 0
                    results[i].append(xc.clone())
            if nonzero:
                chosen = [epsilons[i] for i in nonzero]
                for i, eps, x_adv in zip(nonzero, chosen, self.perturb(model, xc, yc, chosen)):
                    results[i].append(project(xc, x_adv.detach().to(xc), eps, self.norm))
        return [torch.cat(parts) if parts else x[:0].clone() for parts in results]

    def minimal(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sample, the smallest successful adversarial found, or ``x`` itself where the attack
        failed (so a failure never counts as broken). Judged by ``model``'s own argmax."""
        with frozen_parameters(model):
            return self._minimal(model, x, y)

    def _minimal(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in progress(range(0, len(x), self.chunk_size), f"{self.name or type(self).__name__} batches"):
            xc, yc = x[start:start + self.chunk_size], y[start:start + self.chunk_size]
            x_adv = self.minimize(model, xc, yc).detach().to(xc).clamp(0.0, 1.0)
            # Libraries differ in what they return for a failed point (foolbox's CW: an all-zero
            # image; ART: the input), so success is re-judged here and failures become x.
            success = predict_labels(model, x_adv) != yc
            parts.append(torch.where(success.view((-1,) + (1,) * (x.dim() - 1)), x_adv, xc))
        return torch.cat(parts) if parts else x.clone()

    def threshold(self, x: torch.Tensor, smallest: torch.Tensor, epsilons: Sequence[float]) -> list[torch.Tensor]:
        """Per epsilon: ``smallest`` where its perturbation has norm <= epsilon, else ``x``."""
        distance = perturbation_norm(smallest - x, self.norm)
        view = (-1,) + (1,) * (x.dim() - 1)
        return [torch.where((distance <= eps).view(view), smallest, x) for eps in epsilons]

    # -- what subclasses implement ------------------------------------------------------------
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float]) -> list[torch.Tensor]:
        """Fixed-budget attacks: one adversarial chunk per (positive) epsilon."""
        raise NotImplementedError

    def minimize(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Minimisation attacks: the library's smallest adversarial per sample of one chunk."""
        raise NotImplementedError


# -- library adapters -------------------------------------------------------------------------
def foolbox_model(model: nn.Module, device: torch.device) -> Any:
    """foolbox's view of ``model`` over [0,1] images (foolbox 3.3.4 works with numpy 2)."""
    import foolbox

    return foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device=device)


def art_classifier(model: nn.Module, x: torch.Tensor, num_classes: int) -> Any:
    """ART's view of ``model``: cross-entropy on its logits, inputs clipped to [0,1]."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )


def to_numpy(x: torch.Tensor) -> np.ndarray:
    # ART computes in float32 and some of its attacks break on float64 input under numpy 2.
    return x.detach().cpu().numpy().astype(np.float32)


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


# -- EOT ----------------------------------------------------------------------------------------
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
