"""``bench perf``: each of the harness's costs against the least work that does the same, side by side.

Every row times one of our code paths and a reference on the same model, inputs and seed: the
minimal computation of the same work written directly in torch (or, for AutoAttack's stages,
Croce & Hein's stage classes called directly), so that a ratio above 1 is overhead of ours.
Rows that compare two implementations of different work say so and set no target.

- PGD-Linf as ``bench run`` runs it by default (20 steps x 10 walks, each walk after the first
  only on the points still robust, verdicts between them) against the same loop in torch;
- EOT PGD on PixelDP (8 draws per step) against a loop that evaluates all draws of a chunk in
  one forward pass;
- CW-L2 (``cw-l2``'s defaults, on foolbox) against Carlini & Wagner's algorithm written in torch;
- AutoAttack: each stage of the standard version through our cascade against the reference's
  stage class on the same points, and APGD-CE with EOT on PixelDP against the reference's own
  ``eot_iter`` loop;
- PixelDP prediction and certification (300 draws) against a chunked floor: the layers before
  the noise once per image, then (image, draw) rows through the rest in passes of the best size,
  keeping only the sums the certificate needs;
- one training epoch per defense through the harness's training loop, the baseline's against a
  bare SGD loop, the others against the baseline's;
- a 4-run digits grid, ``bench run --jobs 2`` against ``--jobs 1``, each a new process.

Verdicts that a busy machine cannot flip: with torch on one thread (``--threads 1``) each side is
timed by its thread's CPU time, which excludes the time other jobs hold the cores
(``work_clock``); the two sides alternate within each round (ABBA), and
rounds go on until the 95% interval of the median per-round ratio (order statistics of the
rounds, no assumption on the noise) lies on one side of the target, or the row's time budget
ends; a row whose interval still straddles its target says "noisy", never "ok". Each row prints
its interval, its rounds and the machine's load when it ended. Peak memory is the largest rise
of this process's resident set during each side's first timed call (n/a for the grid row, whose
work runs in other processes; Linux only).
"""
from __future__ import annotations

import copy
import ctypes
import functools
import math
import os
import platform
import statistics
import threading
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.log import LOGGER
from bench.spec import DEFAULT_ATTACK_BATCH_SIZE
from bench.types import Norm

PGD_STEPS = 20
PGD_RESTARTS = 10
EOT_DRAWS = 8
PIXELDP_DRAWS = 300
CONFIDENCE = 0.95
# The largest acceptable ratio of ours to the reference, per kind of row.
TARGETS = {"pgd": 1.05, "eot": 1.05, "cw": 1.05, "autoattack": 1.05, "pixeldp-predict": 1.10,
           "epoch": 1.05, "pixeldp-train": 1.10, "grid": 1 / 1.6}


# -- references: the least work that does what our code path does --------------------------------
def _linf_walk(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int, draws: int = 1) -> torch.Tensor:
    """One L-inf PGD walk from a uniform random start, in foolbox's arithmetic (cross-entropy
    summed over the batch, signed gradient steps of 2.5 * eps / steps). ``draws > 1``: the loss
    of the mean softmax over that many noise draws, all of them in one forward pass."""
    step = 2.5 * eps / steps
    x = (x0 + (torch.rand(x0.shape, dtype=x0.dtype) * (eps - (-eps)) + (-eps))).clamp(0, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        if draws == 1:
            loss = F.cross_entropy(model(x), y, reduction="sum")
        else:
            log_probabilities = F.log_softmax(model(x.repeat(draws, 1, 1, 1)), dim=1).view(draws, len(x), -1)
            loss = F.nll_loss(torch.logsumexp(log_probabilities, 0) - math.log(draws), y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
        x = x.detach() + step * gradient.sign()
        x = (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)
    return x


def torch_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, chunk: int,
              steps: int = PGD_STEPS, restarts: int = PGD_RESTARTS) -> torch.Tensor:
    """PGD as ``bench run`` runs it, written directly in torch: per chunk, the points right
    unattacked get a first walk, then each further walk only the points no walk has broken."""
    out = []
    for start in range(0, len(x), chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        with torch.no_grad():
            robust = model(xc).argmax(1) == yc
        best = xc.clone()
        for walk in range(restarts):
            index = robust.nonzero().flatten()
            if len(index) == 0:
                break
            x_adv = _linf_walk(model, xc[index], yc[index], eps, steps)
            with torch.no_grad():
                broken = model(x_adv).argmax(1) != yc[index]
            keep = broken if walk else torch.ones_like(broken)  # the first walk's result stands for the unbroken
            best[index[keep]] = x_adv[keep]
            robust[index[broken]] = False
        out.append(best)
    return torch.cat(out)


def torch_eot_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, chunk: int,
                  steps: int = PGD_STEPS, draws: int = EOT_DRAWS) -> torch.Tensor:
    """One EOT PGD walk per chunk, every point attacked (as adversarial training asks), all
    draws of a chunk in one forward pass."""
    return torch.cat([_linf_walk(model, x[s:s + chunk], y[s:s + chunk], eps, steps, draws)
                      for s in range(0, len(x), chunk)])


def torch_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params, chunk: int) -> torch.Tensor:
    """Carlini & Wagner's L2 attack (tanh box, Adam, a binary search over the constant, an early
    stop when the loss stalls), as foolbox 3 computes it, written in torch; then one forward pass
    to judge the result, as ``cw-l2`` re-judges it. Failed points come back unchanged."""
    out = []
    for start in range(0, len(x), chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        best = _cw_chunk(model, xc, yc, params)
        with torch.no_grad():
            success = model(best).argmax(1) != yc
        out.append(torch.where(success.view(-1, 1, 1, 1), best, xc))
    return torch.cat(out)


def _cw_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p) -> torch.Tensor:
    n, rows = len(x), torch.arange(len(x))
    confidence = p.margin(model)
    x_attack = torch.arctanh((x - 0.5) / 0.5 * 0.999999)
    reconstructed = torch.tanh(x_attack) * 0.5 + 0.5
    consts = p.initial_const * np.ones(n)
    lower, upper = np.zeros(n), np.full(n, np.inf)
    best, best_norms = torch.zeros_like(x), torch.full((n,), float("inf"))
    for search in range(p.binary_search_steps):
        if search == p.binary_search_steps - 1 and p.binary_search_steps >= 10:
            consts = np.minimum(upper, 1e10)
        delta, m, v = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
        found, previous = np.zeros(n, dtype=bool), np.inf
        c = torch.from_numpy(consts.astype(np.float32))
        for step in range(p.steps):
            delta.requires_grad_(True)
            perturbed = torch.tanh(x_attack + delta) * 0.5 + 0.5
            logits = model(perturbed)
            other = logits.detach().scatter(1, y[:, None], -float("inf")).argmax(1)
            margin = ((logits[rows, y] - logits[rows, other] + confidence).clamp(min=0) * c).sum()
            loss = margin + (perturbed - reconstructed).flatten(1).square().sum()
            (gradient,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                m = 0.9 * m + 0.1 * gradient
                v = 0.999 * v + 0.001 * gradient**2
                delta = delta - p.learning_rate * (m / (1 - 0.9 ** (step + 1))) / ((v / (1 - 0.999 ** (step + 1))).sqrt() + 1e-8)
            if p.abort_early and step % math.ceil(p.steps / 10) == 0:
                if not float(loss.detach()) <= 0.9999 * previous:
                    break
                previous = float(loss.detach())
            scores = logits.detach()
            if confidence:
                scores = scores + F.one_hot(y, scores.shape[1]) * confidence
            adversarial = scores.argmax(1) != y
            found |= adversarial.numpy()
            norms = (perturbed.detach() - x).flatten(1).norm(dim=1)
            new = (norms < best_norms) & adversarial
            best[new], best_norms[new] = perturbed.detach()[new], norms[new]
        upper = np.where(found, consts, upper)
        lower = np.where(found, lower, consts)
        consts = np.where(np.isinf(upper), consts * 10, (lower + upper) / 2)
    return best


@torch.no_grad()
def pixeldp_floor(net, x: torch.Tensor, draws: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least work PixelDP's prediction and certificate need: ``net.pre`` once per image, then
    the (image, draw) rows through the noise and ``net.post`` in passes of ``rows``, keeping the
    per-class sums of the softmax, of its square and of the votes."""
    h = net.pre(x)
    total = len(x) * draws
    sums = squares = votes = None
    for start in range(0, total, rows):
        owner = torch.arange(start, min(start + rows, total)) // draws
        probabilities = F.softmax(net.post(net.add_noise(h[owner])), dim=1)
        if sums is None:
            sums, squares, votes = (torch.zeros(len(x), probabilities.shape[1]) for _ in range(3))
        sums.index_add_(0, owner, probabilities)
        squares.index_add_(0, owner, probabilities**2)
        votes.index_add_(0, owner, F.one_hot(probabilities.argmax(1), probabilities.shape[1]).float())
    return sums / draws, squares / draws, votes


def autoattack_stage_reference(stage: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm,
                               params, chunk: int) -> torch.Tensor:
    """One AutoAttack stage with the least protocol around the reference's class (``COMPONENTS``
    only constructs it): per chunk, the stage on the points right unattacked, then one forward
    pass to judge what it returned."""
    from bench.attacks.autoattack import COMPONENTS

    out = []
    for start in range(0, len(x), chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        with torch.no_grad():
            logits = model(xc)
            right = (logits.argmax(1) == yc).nonzero().flatten()
        x_adv = xc.clone()
        if len(right):
            candidate = COMPONENTS[stage](model, xc[right], yc[right], eps, norm, params, logits.shape[1])[0].detach()
            with torch.no_grad():
                broken = model(candidate).argmax(1) != yc[right]
            x_adv[right[broken]] = candidate[broken]
        out.append(x_adv)
    return torch.cat(out)


def reference_apgd_eot(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, draws: int,
                       chunk: int) -> torch.Tensor:
    """APGD-CE with EOT as the reference runs it: its own ``eot_iter`` loop, one forward and
    backward pass of the noisy model per draw."""
    from pyautoattack.autopgd_base import APGDAttack

    apgd = APGDAttack(model, n_iter=steps, norm="Linf", n_restarts=1, eps=eps, seed=0, loss="ce", eot_iter=draws,
                      rho=0.75, device=x.device)
    out = []
    for start in range(0, len(x), chunk):
        apgd.init_hyperparam(x[start:start + chunk])
        torch.random.manual_seed(0)
        out.append(apgd.attack_single_run(x[start:start + chunk], y[start:start + chunk])[0])
    return torch.cat(out)


def hand_written_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float = 0.05) -> None:
    """One epoch of plain SGD (momentum, Nesterov, weight decay, shuffled batches): the training
    loop's floor."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    for index in torch.randperm(len(x)).split(batch_size):
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


# -- measuring -------------------------------------------------------------------------------------
def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _trim() -> None:
    """Hand freed heap memory back to the system, so the next rise of RSS is the next call's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Largest rise of the resident set over its value at entry, sampled every millisecond
    (``sample=False``: nothing measured, ``megabytes`` is None)."""

    def __init__(self, sample: bool = True):
        self.sample = sample

    def __enter__(self) -> "PeakMemory":
        _trim()
        self.start = _resident_bytes() if self.sample else None
        self.peak = self.start
        self.running = self.start is not None
        self.thread = threading.Thread(target=self._sample, daemon=True)
        if self.running:
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            value = _resident_bytes()
            if value is not None and value > self.peak:
                self.peak = value
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.running = False
            self.thread.join()
            value = _resident_bytes()
            self.peak = max(self.peak, value or 0)

    @property
    def megabytes(self) -> float | None:
        return None if self.start is None else (self.peak - self.start) / 2**20


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval of the median: the order statistics
    ``(k, n + 1 - k)`` for the largest k whose binomial coverage reaches it; (0, inf) when there are
    too few values (fewer than 6 at 95%)."""
    from scipy.stats import binom

    ordered, n = sorted(values), len(values)
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * binom.cdf(k, n, 0.5) >= confidence:
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else (0.0, math.inf)


@dataclass
class Row:
    what: str
    ours: str
    reference: str
    times: list[float]  # one per interleaved round
    reference_times: list[float]
    memory: float | None
    reference_memory: float | None
    target: float | None  # the largest acceptable ratio, None where there is no target
    load: float | None = None  # the 1-minute load average when the row ended
    note: str = ""
    clock: str = "wall"  # what timed it (``work_clock``): this thread's "cpu" time, or "wall"

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def reference_seconds(self) -> float:
        return statistics.median(self.reference_times)

    @property
    def round_ratios(self) -> list[float]:
        """The ratio within each round: both sides ran back to back, under the same load."""
        return [ours / reference for ours, reference in zip(self.times, self.reference_times)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.round_ratios)

    @property
    def interval(self) -> tuple[float, float]:
        return median_interval(self.round_ratios)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        low, high = self.interval
        if high <= self.target:
            return "ok"
        if low > self.target:
            return "ABOVE TARGET"
        return "noisy: rerun on an idle machine"


@dataclass
class Budget:
    """How long a row may measure: at least ``rounds`` interleaved rounds, then more until its
    verdict is decided, at most ``max_rounds`` or ``seconds`` (whichever ends first)."""

    rounds: int = 6
    max_rounds: int = 30
    seconds: float = 120.0


def work_clock(in_process: bool = True) -> tuple[str, Callable[[], float]]:
    """The clock a row is timed by, and its name. Work in this process on one torch thread runs
    entirely on the calling thread, so that thread's CPU time measures it, and time the process
    waits for a core that other jobs hold does not count: on a busy machine wall-time ratios
    spread by tens of percent (docs/speed.md), CPU-time ratios much less. Work on several
    threads or in other processes (the grid) is timed by the wall clock."""
    if in_process and torch.get_num_threads() == 1:
        return "cpu", time.thread_time
    return "wall", time.perf_counter


def measure(what: str, ours: tuple[str, Callable[[], object]], reference: tuple[str, Callable[[], object]],
            target: float | None, budget: Budget, *, warm_up: bool = True, in_process: bool = True,
            note: str = "") -> Row:
    """Both sides of a row in interleaved rounds (ABBA: neither always goes first), each call from
    the same torch seed, until the row's verdict is decided or its budget ends (``Budget``).
    ``warm_up``: one untimed call of each first, for costs a process pays once (imports, torch's
    first-call set-up). ``in_process=False``: the work runs in other processes, so peak memory is
    not sampled and the wall clock times it (``work_clock``)."""
    clock_name, clock = work_clock(in_process)
    functions = dict([ours, reference])
    if warm_up:
        for function in functions.values():
            torch.manual_seed(0)
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    peaks: dict[str, float | None] = {}
    started = time.monotonic()
    row = Row(what, ours[0], reference[0], times[ours[0]], times[reference[0]], None, None, target, note=note,
              clock=clock_name)
    while True:
        order = list(functions) if len(row.times) % 2 == 0 else list(functions)[::-1]
        for name in order:
            torch.manual_seed(0)
            with PeakMemory(in_process and name not in peaks) as peak:
                begun = clock()
                functions[name]()
                elapsed = clock() - begun
            times[name].append(elapsed)
            peaks.setdefault(name, peak.megabytes)
        rounds = len(row.times)
        if rounds < budget.rounds:
            continue
        if target is None or not row.verdict.startswith("noisy"):
            break
        if rounds >= budget.max_rounds or time.monotonic() - started > budget.seconds:
            break
    row.memory, row.reference_memory = peaks[ours[0]], peaks[reference[0]]
    row.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return row


# -- the rows ----------------------------------------------------------------------------------------
@functools.cache
def _digits_model(epochs: int = 5) -> tuple[nn.Module, object]:
    """The digits CNN trained a few epochs (once per process): attacks that stop early need a
    model with margins."""
    from bench.datasets.digits import load_digits
    from bench.defenses.baseline import Baseline
    from bench.models import build_model
    from bench.training import TrainConfig

    digits = load_digits()
    torch.manual_seed(0)
    defense = Baseline(build_model("digits-cnn", digits.shape, 10, digits.mean, digits.std))
    defense.fit(digits.x_train, digits.y_train, TrainConfig(epochs=epochs))
    return defense.attack_model().eval(), digits


def _mnist_pixeldp(draws: int = PIXELDP_DRAWS):
    from bench.defenses.pixeldp import PixelDP
    from bench.models import build_model

    shape = (1, 28, 28)
    torch.manual_seed(0)
    defense = PixelDP(build_model("mnist-cnn", shape, 10, (0.1307,), (0.3081,)), PixelDP.Params(draws=draws))
    defense._build(shape)
    defense.measure_sensitivity()
    return defense, shape


def attack_rows(images: int, budget: Budget, chunk: int) -> list[Row]:
    from bench.attacks.cw import CarliniWagnerL2
    from bench.attacks.eot import EOT
    from bench.attacks.pgd import LinfPGD

    model, digits = _digits_model()
    x, y = digits.x_test[:images], digits.y_test[:images]
    pgd = LinfPGD(LinfPGD.Params(steps=PGD_STEPS, restarts=PGD_RESTARTS), chunk_size=chunk)
    eps = 0.05
    rows = [measure(f"PGD-Linf {PGD_STEPS} steps x {PGD_RESTARTS} walks (the default; verdicts between walks), "
                    f"digits CNN, eps {eps}, {len(x)} images",
                    ("pgd-linf (foolbox)", lambda: pgd.run(model, x, y, [eps])),
                    ("the same loop in torch", lambda: torch_pgd(model, x, y, eps, chunk)), TARGETS["pgd"], budget)]

    cw = CarliniWagnerL2(CarliniWagnerL2.Params(), chunk_size=chunk)
    rows.append(measure(f"CW-L2 (5 x 200 steps, early stop), digits CNN, {len(x)} images",
                        ("cw-l2 (foolbox)", lambda: cw.smallest_adversarials(model, x, y)),
                        ("Carlini-Wagner in torch", lambda: torch_cw(model, x, y, cw.params, chunk)), TARGETS["cw"], budget))

    defense, shape = _mnist_pixeldp()
    noisy = defense.attack_model().eval()
    xm = torch.rand(min(images, 64), *shape)
    ym = torch.randint(0, 10, (len(xm),))
    walk = LinfPGD(LinfPGD.Params(steps=PGD_STEPS, restarts=1), chunk_size=chunk)
    rows.append(measure(f"EOT PGD-Linf {PGD_STEPS} steps on PixelDP, {EOT_DRAWS} draws per step, MNIST CNN, {len(xm)} images",
                        ("pgd-linf through EOT", lambda: walk.perturb(EOT(noisy, EOT_DRAWS), xm, ym, 0.1)),
                        ("all draws in one pass", lambda: torch_eot_pgd(noisy, xm, ym, 0.1, chunk)), TARGETS["eot"], budget))
    return rows


def autoattack_rows(images: int, budget: Budget) -> list[Row]:
    """Each stage of the standard version through our cascade, and APGD with EOT on PixelDP."""
    from bench.attacks.autoattack import COMPONENTS, LinfAutoAttack
    from bench.attacks.eot import EOT

    model, digits = _digits_model()
    x, y = digits.x_test[:images], digits.y_test[:images]
    eps, rows = 0.1, []
    settings = {"steps": 100, "target_classes": 9, "square_queries": 1000}
    for stage in ("apgd-ce", "apgd-t", "fab-t", "square"):
        attack = LinfAutoAttack(LinfAutoAttack.Params(attacks=stage, **settings))
        rows.append(measure(f"AutoAttack {stage} (100 steps, 9 targets, Square 1,000 queries), digits CNN, eps {eps}, "
                            f"{len(x)} images", (f"autoattack-linf {stage}", lambda a=attack: a.run(model, x, y, [eps])),
                            ("the reference's stage", lambda s=stage, a=attack: autoattack_stage_reference(
                                s, model, x, y, eps, a.norm, a.params, a.chunk_size)), TARGETS["autoattack"], budget))

    defense, shape = _mnist_pixeldp()
    noisy = defense.attack_model().eval()
    xm = torch.rand(min(images, 64), *shape)
    ym = torch.randint(0, 10, (len(xm),))
    params = LinfAutoAttack.Params(steps=PGD_STEPS)
    ours = lambda: COMPONENTS["apgd-ce"](EOT(noisy, EOT_DRAWS), xm, ym, 0.1, "linf", params, 10)  # noqa: E731
    rows.append(measure(f"APGD-CE {PGD_STEPS} steps on PixelDP, EOT {EOT_DRAWS} draws, MNIST CNN, {len(xm)} images",
                        ("our EOT wrapper", ours),
                        ("the reference's eot_iter", lambda: reference_apgd_eot(noisy, xm, ym, 0.1, PGD_STEPS, EOT_DRAWS, 64)),
                        TARGETS["eot"], budget))
    return rows


def pixeldp_prediction_rows(images: int, budget: Budget) -> list[Row]:
    defense, shape = _mnist_pixeldp()
    net = defense.attack_model().eval()
    x = torch.rand(images, *shape)
    # The floor at its best pass size: a quick sweep first (the fastest of 3 calls each).
    sweep = {rows: min(_seconds(lambda rows=rows: pixeldp_floor(net, x[:16], PIXELDP_DRAWS, rows)) for _ in range(3))
             for rows in (64, 128, 256, 512)}
    best_rows = min(sweep, key=sweep.get)
    return [measure(f"PixelDP predict+certify, {PIXELDP_DRAWS} draws, MNIST CNN, {images} images",
                    ("pixeldp evaluate", lambda: defense.evaluate(x)),
                    (f"chunked floor ({best_rows} rows per pass)", lambda: pixeldp_floor(net, x, PIXELDP_DRAWS, best_rows)),
                    TARGETS["pixeldp-predict"], budget)]


def _seconds(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def training_rows(images: int, batch_size: int, budget: Budget) -> list[Row]:
    """One epoch of ``images`` MNIST-shaped images per defense, through the harness's training loop."""
    from bench.defenses.baseline import Baseline
    from bench.defenses.madry import Madry
    from bench.defenses.pixeldp import PixelDP
    from bench.defenses.robustopt import RobustOpt
    from bench.models import build_model
    from bench.training import TrainConfig

    shape, mean, std = (1, 28, 28), (0.1307,), (0.3081,)
    torch.manual_seed(0)
    x, y = torch.rand(images, *shape), torch.randint(0, 10, (images,))
    config = TrainConfig(epochs=1, batch_size=batch_size)
    plain = build_model("mnist-cnn", shape, 10, mean, std)
    baseline = Baseline(build_model("mnist-cnn", shape, 10, mean, std))
    pixeldp = PixelDP(build_model("mnist-cnn", shape, 10, mean, std))
    pixeldp._build(shape)
    def from_start(model: nn.Module, train: Callable[[], object]) -> Callable[[], None]:
        """Every call trains from the same weights, so every round does the same work (weights
        that drift over rounds change the cost, e.g. through denormal numbers)."""
        start = copy.deepcopy(model.state_dict())

        def call() -> None:
            model.load_state_dict(start)
            train()

        return call

    epoch = lambda defense: from_start(defense.model, lambda: defense.fit(x, y, config))  # noqa: E731
    what = f"one training epoch, {images} MNIST-shaped images, batch {batch_size}"
    rows = [
        measure(what + ", mnist-cnn", ("baseline epoch (training loop)", epoch(baseline)),
                ("bare SGD loop", from_start(plain, lambda: hand_written_epoch(plain, x, y, batch_size))),
                TARGETS["epoch"], budget),
        measure(what + ", mnist-cnn", ("pixeldp epoch", epoch(pixeldp)), ("baseline epoch", epoch(baseline)),
                TARGETS["pixeldp-train"], budget),
    ]
    unit_costs = Budget(rounds=3, max_rounds=3, seconds=budget.seconds)
    for name, defense in (("madry epoch (PGD-7)", Madry(build_model("mnist-cnn", shape, 10, mean, std))),
                          ("robustopt epoch", RobustOpt(build_model("wk-small", shape, 10, mean, std)))):
        model_name = "wk-small" if name.startswith("robustopt") else "mnist-cnn"
        rows.append(measure(f"{what}, {model_name}", (name, epoch(defense)), ("baseline epoch", epoch(baseline)), None,
                            unit_costs, warm_up=False, note="different work: a unit cost, no target"))
    return rows


# The grid row's grid: the README's digits comparison on two seeds, at the training defaults (the
# whole 1,297-image training split, 30 epochs, 200 test images), with PixelDP at the cpu profile's
# 100 draws and one PGD walk (the default 10 would make PGD on PixelDP most of the row's time):
# about 40 CPU-seconds of work, the size of grid --jobs is for. (On a grid of a few seconds the
# workers' start-up, a fresh Python importing torch, dominates.)
GRID_ARGS = ("--dataset", "digits", "--defense", "baseline", "--defense", "pixeldp", "--param", "pixeldp.draws=100",
             "--seed", "0", "--seed", "1", "--attack", "pgd-linf", "--epsilons", "0.1", "--attack-param", "restarts=1")


def bench_run(out: Path, jobs: int, args: tuple[str, ...] = GRID_ARGS) -> float:
    """CPU seconds of ``bench run ARGS --jobs N`` as a user runs it: a new process that imports,
    loads the data, starts its workers (if any) and runs the grid; its workers' CPU included.
    Time it from outside for the wall time."""
    import resource
    import subprocess
    import sys

    # The workers fork from a server process that outlives the command by a moment and is no
    # child of ours: as the subreaper of the command's process tree, this process inherits the
    # server when the command exits, and waits for it (and so for the CPU of all the workers).
    _become_subreaper()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "bench.cli", "run", *args, "--jobs", str(jobs), "--out", str(out), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.05)
        except ChildProcessError:  # none left
            break
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _become_subreaper() -> None:
    """Linux: orphaned descendants come to this process (and count in its children's CPU)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass  # elsewhere the CPU column misses the workers


def grid_rows(budget: Budget) -> list[Row]:
    """The same 4-run digits grid with ``bench run --jobs 2`` against ``--jobs 1``. The row also
    gives the CPU seconds of each (median over rounds): on a machine that other work keeps busy, a
    second worker gets no core of its own, but the CPU each side used is still a measurement."""
    import tempfile

    cpu: dict[int, list[float]] = {2: [], 1: []}

    def run(scratch: str, jobs: int) -> None:
        cpu[jobs].append(bench_run(Path(scratch) / f"jobs{jobs}-{len(cpu[jobs])}", jobs))

    with tempfile.TemporaryDirectory() as scratch:
        row = measure("bench run: 4-run digits grid (baseline, pixeldp draws=100 x seeds 0, 1; clean, pgd-linf 0.1 one walk; "
                      "default epochs and sizes)", ("--jobs 2", lambda: run(scratch, 2)), ("--jobs 1", lambda: run(scratch, 1)),
                      TARGETS["grid"], budget, warm_up=False, in_process=False)
    row.what += f"; CPU s: --jobs 2 {statistics.median(cpu[2]):.1f}, --jobs 1 {statistics.median(cpu[1]):.1f}"
    return [row]


# -- the report --------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s); "
            f"load average {load}")


def render(rows: list[Row]) -> str:
    def number(value: float | None, digits: int = 0) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| what | ours | reference | ours s | reference s | clock | ratio | 95% interval | rounds | target | load | ours peak MB | reference peak MB | verdict |",
        "|:--|:--|:--|--:|--:|:--|--:|:--|--:|--:|--:|--:|--:|:--|",
    ]
    for row in rows:
        target = "" if row.target is None else (f"<= {row.target:.2f}" if row.target >= 1 else f"<= {row.target:.3f}")
        low, high = row.interval
        interval = "too few rounds" if math.isinf(high) else f"{low:.3f}-{high:.3f}"
        lines.append(
            f"| {row.what} | {row.ours} | {row.reference} | {row.seconds:.3f} | {row.reference_seconds:.3f} | {row.clock} | "
            f"{row.ratio:.3f} | {interval} | {len(row.times)} | {target} | {number(row.load, 1)} | {number(row.memory)} | "
            f"{number(row.reference_memory)} | {row.verdict or row.note} |"
        )
    return "\n".join(lines)


SECTIONS = ("attacks", "autoattack", "pixeldp", "training", "grid")


def run_perf(sections: tuple[str, ...] = SECTIONS, budget: Budget | None = None, images: int = 64,
             chunk: int = DEFAULT_ATTACK_BATCH_SIZE, batch_size: int = 64, epoch_images: int = 2048,
             ) -> tuple[list[Row], str, str]:
    """Measure ``sections``; returns the rows, the machine before and the machine after (load)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # foolbox imports scipy.ndimage.filters
    budget = budget or Budget()
    before = machine()
    rows: list[Row] = []
    if "attacks" in sections:
        LOGGER.info("perf: attacks")
        rows += attack_rows(images, budget, chunk)
    if "autoattack" in sections:
        LOGGER.info("perf: autoattack stages")
        rows += autoattack_rows(images, budget)
    if "pixeldp" in sections:
        LOGGER.info("perf: pixeldp prediction")
        rows += pixeldp_prediction_rows(min(images, 64), budget)
    if "training" in sections:
        LOGGER.info("perf: training epochs")
        rows += training_rows(epoch_images, batch_size, budget)
    if "grid" in sections:
        LOGGER.info("perf: grid, 2 workers against 1")
        rows += grid_rows(dataclasses.replace(budget, seconds=max(budget.seconds, 600.0)))
    return rows, before, machine()
