"""The Attack interface: a template ``run`` that no subclass overrides, and two hooks.

An attack is a thin subclass of :class:`Attack` that says which norm it works in and how to call
foolbox, ART or the AutoAttack reference on one chunk of images; the base class does the rest
(chunking, zero budgets, keeping results in [0,1] and inside the budget, re-judging success by
the defense's prediction rule, thresholding minimisation attacks). Library adapters live in
``attacks/adapters.py``, the EOT wrapper for randomized defenses in ``attacks/eot.py``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from bench.attacks.eot import is_randomized
from bench.errors import BenchError
from bench.progress import progress
from bench.types import Norm

BACKENDS = ("foolbox", "art")

# 64 images per batch: faster on 2 CPU cores than larger batches.
DEFAULT_CHUNK = 64


def project(x: torch.Tensor, x_adv: torch.Tensor, epsilon: float, norm: Norm) -> torch.Tensor:
    """``x_adv`` moved into [0,1] and into the ``norm`` ball of radius ``epsilon`` around ``x``.

    The libraries already do both; this only removes float round-off (e.g. a linf step landing at
    eps + 1e-7), so that every stored adversarial provably respects its budget.
    """
    delta = x_adv - x
    if norm == Norm.LINF:
        delta = delta.clamp(-epsilon, epsilon)
    elif norm == Norm.L2:
        norms = Norm.L2.size(delta).clamp_min(1e-12)
        factor = (epsilon / norms).clamp(max=1.0)
        delta = delta * factor.view((-1,) + (1,) * (x.dim() - 1))
    else:
        raise ValueError(f"cannot project onto a {norm} ball")
    return (x + delta).clamp(0.0, 1.0)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients while an attack runs, then get their flags back.

    foolbox (through eagerpy) and ART take input gradients with ``loss.backward()``, which also
    computes and accumulates every weight gradient (docs/attacks.md has the cost). Attacks only
    need the gradient wrt the input.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


Predict = Callable[[torch.Tensor], torch.Tensor]  # images in [0,1] -> labels


class Connected(nn.Module):
    """``model`` whose output autograd always connects to its input: where the model computes
    outside autograd (numpy, ``torch.no_grad``, ``detach``), the input gradient is 0 instead of an
    error in the attack library, so the attack runs, fails, and the diagnostics say why."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper's own flag: it has no layers of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if x.requires_grad and not out.requires_grad and torch.is_grad_enabled():
            out = out + 0.0 * x.flatten(1)[:, :1]
        return out


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


class Attack:
    """Base of every attack: ``run(model, x, y, epsilons)`` -> one adversarial batch per epsilon.

    ``model`` maps images in [0,1] (NCHW) to logits; for a randomized defense it is wrapped in
    :class:`bench.attacks.eot.EOT`. Epsilons are in [0,1] pixel units of ``norm``.

    Subclasses implement one of two hooks, each on one chunk of at most ``chunk_size`` images:

    - fixed-budget attacks (PGD, AutoAttack): ``perturb_chunk(model, x, y, epsilons, predict)``,
      one adversarial chunk per positive epsilon;
    - minimisation attacks (``minimization = True``: CW, FMN): ``minimize_chunk(model, x, y)``,
      the library's smallest adversarial per sample. ``run`` calls it once, re-judges success,
      and thresholds per epsilon: a sample keeps its smallest successful perturbation where that
      has norm <= epsilon and stays clean otherwise.

    ``predict`` is the defense's own prediction rule (``defense.predict``); without it the
    model's argmax judges. ``run`` is the template every caller uses; subclasses never override it.
    """

    name: ClassVar[str] = ""  # the registry key, set when it registers (``ATTACKS.register``)
    norm: ClassVar[Norm] = Norm.LINF
    minimization: ClassVar[bool] = False
    # The norm's (``Norm.default_epsilons``) unless a subclass sets its own.
    default_epsilons: ClassVar[tuple[float, ...]] = Norm.LINF.default_epsilons
    backends: ClassVar[tuple[str, ...]] = BACKENDS
    default_chunk: ClassVar[int] = DEFAULT_CHUNK
    # What the attack uses of the defense: "gradient" (its attack model's gradients),
    # "gradient-free" (its scores only), "transfer" (nothing: a surrogate's gradients) or
    # "adaptive" (an approximation the defense offers). Audits compare the first with the others.
    kind: ClassVar[str] = "gradient"
    # The model ``run`` is given: the defense's "defense" (attack model), an undefended
    # "surrogate", or the defense's "bpda" approximation.
    target: ClassVar[str] = "defense"
    # At most this many EOT draws per forward pass on randomized defenses (None: the run's
    # --eot-draws); for attacks that query far more often than they step.
    max_eot_draws: ClassVar[int | None] = None

    @dataclass
    class Params:
        pass

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.norm not in tuple(Norm):  # a plug-in may declare its norm as text
            raise BenchError(f"attack {cls.__name__}: norm {cls.norm!r} is not one of {', '.join(Norm)}")
        cls.norm = Norm(cls.norm)
        if "default_epsilons" not in vars(cls):
            cls.default_epsilons = cls.norm.default_epsilons

    def __init__(self, params: object = None, backend: str = "foolbox", chunk_size: int | None = None):
        self.params = params if params is not None else self.Params()
        if backend not in self.backends:
            raise BenchError(
                f"attack {self.name or type(self).__name__} has no {backend!r} backend; "
                f"use --attack-backend {' or '.join(self.backends)}"
            )
        self.backend = backend
        self.chunk_size = chunk_size or self.default_chunk

    # -- what callers use -----------------------------------------------------------------------
    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float],
        *, predict: Predict | None = None,
    ) -> list[torch.Tensor]:
        """Adversarial inputs for every epsilon, each in [0,1] and within epsilon of ``x``."""
        epsilons = [float(eps) for eps in epsilons]
        if self.minimization:
            return self.threshold(x, self.smallest_adversarials(model, x, y, predict=predict), epsilons)
        with frozen_parameters(model):
            return self._fixed_budget(model, x, y, epsilons, predict or (lambda inputs: predict_labels(model, inputs)))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Every point attacked at one budget, with no verdicts and no carrying (adversarial
        training wants an adversarial for each example, right or wrong unattacked)."""
        predict = lambda inputs: predict_labels(model, inputs)  # noqa: E731 (only restarts consult it)
        with frozen_parameters(model):
            parts = [project(x[s:s + self.chunk_size], self.perturb_chunk(
                model, x[s:s + self.chunk_size], y[s:s + self.chunk_size], [epsilon], predict)[0].detach().to(x),
                epsilon, self.norm) for s in range(0, len(x), self.chunk_size)]
        return torch.cat(parts) if parts else x.clone()

    def smallest_adversarials(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, predict: Predict | None = None
    ) -> torch.Tensor:
        """Minimisation attacks: per sample, the smallest successful adversarial found, or ``x``
        itself where the attack failed (so a failure never counts as broken). Success is judged
        by ``predict`` (else the model's argmax)."""
        predict = predict or (lambda inputs: predict_labels(model, inputs))
        parts = []
        with frozen_parameters(model):
            for start in progress(range(0, len(x), self.chunk_size), f"{self.name or type(self).__name__} chunks", unit="chunk"):
                xc, yc = x[start:start + self.chunk_size], y[start:start + self.chunk_size]
                x_adv = self.minimize_chunk(model, xc, yc).detach().to(xc).clamp(0.0, 1.0)
                # Libraries differ in what they return for a failed point (foolbox's CW: an all-zero
                # image; ART: the input), so success is re-judged here and failures become x.
                success = predict(x_adv).to(yc.device) != yc
                if is_randomized(model):
                    x_adv, success = self._confirm_outward(xc, yc, x_adv, success, predict)
                parts.append(torch.where(success.view((-1,) + (1,) * (x.dim() - 1)), x_adv, xc))
        return torch.cat(parts) if parts else x.clone()

    # Scales tried along a minimal adversarial's direction when a randomized defense's own rule
    # does not confirm it: the minimal point sits on the boundary of the expected prediction, and
    # fresh draws flip it back about half the time.
    OUTWARD_SCALES: ClassVar[tuple[float, ...]] = (1.05, 1.1, 1.25, 1.5, 2.0)

    def _confirm_outward(
        self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, success: torch.Tensor, predict: Predict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points the defense's rule does not confirm: the first of ``x + s * (x_adv - x)`` over
        ``OUTWARD_SCALES`` that it does (kept only if the attack moved the point at all)."""
        x_adv, success = x_adv.clone(), success.clone()
        moved = Norm.LINF.size(x_adv - x) > 0
        for scale in self.OUTWARD_SCALES:
            index = (~success & moved).nonzero().flatten()
            if len(index) == 0:
                break
            candidate = (x[index] + scale * (x_adv[index] - x[index])).clamp(0.0, 1.0)
            confirmed = predict(candidate).to(y.device) != y[index]
            x_adv[index[confirmed]] = candidate[confirmed]
            success[index[confirmed]] = True
        return x_adv, success

    def threshold(self, x: torch.Tensor, smallest: torch.Tensor, epsilons: Sequence[float]) -> list[torch.Tensor]:
        """Per epsilon: ``smallest`` where its perturbation has norm <= epsilon, else ``x``."""
        distance = self.norm.size(smallest - x)
        view = (-1,) + (1,) * (x.dim() - 1)
        return [torch.where((distance <= eps).view(view), smallest, x) for eps in epsilons]

    def _fixed_budget(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> list[torch.Tensor]:
        results: list[list[torch.Tensor]] = [[] for _ in epsilons]
        for start in progress(range(0, len(x), self.chunk_size), f"{self.name or type(self).__name__} chunks", unit="chunk"):
            xc, yc = x[start:start + self.chunk_size], y[start:start + self.chunk_size]
            for i, x_adv in self._sweep(model, xc, yc, epsilons, predict).items():
                results[i].append(x_adv)
        return [torch.cat(parts) if parts else x[:0].clone() for parts in results]

    def _sweep(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> dict[int, torch.Tensor]:
        """One chunk at every epsilon, smallest first, attacking only the points that no smaller
        budget broke: an adversarial inside a small ball lies inside every larger one, so it is
        carried up instead of searched for again (the attack's cost follows the points left
        robust, not the number of epsilons). Points the defense gets wrong unattacked are not
        attacked at all. A randomized rule re-judges carried points at each epsilon, and those it
        now gets right are attacked like the others."""
        randomized = is_randomized(model)
        current = x.clone()
        broken = predict(x).to(y.device) != y
        out: dict[int, torch.Tensor] = {}
        for i in sorted(range(len(epsilons)), key=lambda k: epsilons[k]):
            eps = epsilons[i]
            if eps <= 0:  # a zero budget is the clean input; ART refuses eps = 0
                out[i] = x.clone()
                continue
            if randomized and broken.any():
                carried = broken.nonzero().flatten()
                broken[carried] = predict(current[carried]).to(y.device) != y[carried]
            todo = (~broken).nonzero().flatten()
            if len(todo):
                current[todo], broken[todo] = self.judged_chunk(model, x[todo], y[todo], eps, predict)
            out[i] = current.clone()
        return out

    def judged_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, predict: Predict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk at one budget: the adversarials (inside the budget) and whether the defense's
        rule gets each wrong. This default judges ``perturb_chunk``'s result with ``predict``;
        attacks that judge as they go (AutoAttack's cascade, PGD's restarts) return their own
        verdicts instead of asking the rule twice."""
        x_adv = project(x, self.perturb_chunk(model, x, y, [epsilon], predict)[0].detach().to(x), epsilon, self.norm)
        return x_adv, predict(x_adv).to(y.device) != y

    # -- what subclasses implement ------------------------------------------------------------
    def perturb_chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float], predict: Predict
    ) -> list[torch.Tensor]:
        """Fixed-budget attacks: one adversarial chunk per (positive) epsilon."""
        raise NotImplementedError

    def minimize_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Minimisation attacks: the library's smallest adversarial per sample of one chunk."""
        raise NotImplementedError
