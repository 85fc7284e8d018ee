"""``bench perf``: the harness's costs against the floor each one could reach, side by side in one run.

Each row times one of our code paths and a reference doing the same work on the same model and
batch, interleaved (ABBA...) so that a shared machine slows both alike, best of ``repeats``; the
ratio column is best against best, and the next one the median and range of the ratio within
each round (how much the machine's load moved it). Rows of in-process code first make one untimed call of
each side: imports and torch's first-call set-up are paid once per process, not per attack or
step. Attacks run in chunks of ``--attack-batch-size``'s default, as ``bench run`` does.

- PGD-Linf-20 (``pgd-linf``, foolbox backend) against a hand-written torch PGD loop;
- CW-L2 (``cw-l2``) against foolbox's ``L2CarliniWagnerAttack`` called directly;
- PixelDP prediction and certification with 300 draws against its floor: the layers before the
  noise once per image, the layers after it 300 times, at the best batch size of a sweep, and
  nothing else (no bounds, no bookkeeping);
- PixelDP and Madry training steps against the undefended baseline's step;
- a 4-run digits grid (``GRID_ARGS``) run as ``bench run --jobs 2`` against ``--jobs 1``, each a
  new process as a user starts it (imports, data, worker start-up included).

Peak memory is the largest rise of this process's resident set during the first timed call (n/a
for the grid row, whose work runs in other processes),
sampled every millisecond after returning freed memory to the system (Linux; "n/a" elsewhere).
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.log import LOGGER
from bench.spec import DEFAULT_ATTACK_BATCH_SIZE

PGD_STEPS = 20
PIXELDP_DRAWS = 300
TARGETS = {"pgd": 1.05, "cw": 1.05, "pixeldp-predict": 1.10, "pixeldp-train": 1.10, "grid": 1 / 1.6}


# -- references ------------------------------------------------------------------------------------
def torch_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, chunk: int, steps: int = PGD_STEPS) -> torch.Tensor:
    """The reference: L-inf PGD with a uniform random start, written directly in torch."""
    step = 2.5 * eps / steps
    out = []
    for start in range(0, len(x), chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        x_adv = (xc + torch.empty_like(xc).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), yc)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, xc - eps), xc + eps).clamp(0, 1)
        out.append(x_adv)
    return torch.cat(out)


def foolbox_cw_direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params, chunk: int) -> torch.Tensor:
    """foolbox's CW-L2 called as its documentation shows, on the same chunks."""
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    attack = foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=params.binary_search_steps, steps=params.steps, stepsize=params.learning_rate,
        confidence=params.margin(model), initial_const=params.initial_const, abort_early=params.abort_early,
    )
    out = []
    for start in range(0, len(x), chunk):
        _, clipped, _ = attack(fmodel, x[start:start + chunk], y[start:start + chunk], epsilons=None)
        out.append(clipped)
    return torch.cat(out)


@torch.no_grad()
def pixeldp_floor(net, x: torch.Tensor, draws: int, rows: int) -> torch.Tensor:
    """The least work PixelDP prediction needs: ``net.pre`` once per image, then ``draws`` noisy
    passes through ``net.post`` in batches of ``rows``; returns the mean softmax."""
    h = net.pre(x)
    repeated = h.repeat_interleave(draws, dim=0)
    total = torch.zeros(len(x), net.post(h[:1]).shape[1])
    for start in range(0, len(repeated), rows):
        part = repeated[start:start + rows]
        probs = F.softmax(net.post(net.add_noise(part)), dim=1)
        total.index_add_(0, torch.arange(start, start + len(part)) // draws, probs)
    return total / draws


def make_step(defense, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One optimiser step of ``defense``'s training loss, as the shared training loop takes it."""
    optimizer = torch.optim.SGD(defense.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        loss = defense.training_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        defense.after_step()

    return step


def repeated(function: Callable[[], object], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            function()

    return run


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


def interleaved(functions: dict[str, Callable[[], object]], repeats: int, warm_up: bool = False,
                memory: bool = True) -> dict[str, tuple[list[float], float | None]]:
    """Wall times of each function over ``repeats`` interleaved rounds (one per round), and its
    peak memory (first timed call; ``memory=False``: not sampled, for work in other processes,
    where the sampling thread would only take CPU from it). Every call starts from the same torch
    seed. ``warm_up``: one untimed call of each first, for costs a process pays once (imports,
    torch's first-call set-up)."""
    if warm_up:
        for function in functions.values():
            torch.manual_seed(0)
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    peaks: dict[str, float | None] = {}
    for round_index in range(repeats):
        order = list(functions) if round_index % 2 == 0 else list(functions)[::-1]  # ABBA: no order bias
        for name in order:
            torch.manual_seed(0)
            with PeakMemory(memory) as peak:
                started = time.perf_counter()
                functions[name]()
                elapsed = time.perf_counter() - started
            times[name].append(elapsed)
            peaks.setdefault(name, peak.megabytes)
    return {name: (times[name], peaks[name]) for name in functions}


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

    @property
    def seconds(self) -> float:
        return min(self.times)

    @property
    def reference_seconds(self) -> float:
        return min(self.reference_times)

    @property
    def ratio(self) -> float:
        """Best against best: the least disturbed call of each on a shared machine."""
        return self.seconds / self.reference_seconds

    @property
    def round_ratios(self) -> list[float]:
        """The ratio within each round: their spread shows how much the machine's load moved it."""
        return [ours / reference for ours, reference in zip(self.times, self.reference_times)]

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "ok" if self.ratio <= self.target else "ABOVE TARGET"


def _row(what: str, ours: str, reference: str, times: dict, target: float | None) -> Row:
    return Row(what, ours, reference, times[ours][0], times[reference][0], times[ours][1], times[reference][1], target)


# -- the comparisons -------------------------------------------------------------------------------
def attack_rows(images: int, repeats: int, chunk: int) -> list[Row]:
    from bench.attacks.cw import CarliniWagnerL2
    from bench.attacks.pgd import LinfPGD
    from bench.datasets.digits import load_digits
    from bench.defenses.baseline import Baseline
    from bench.models import build_model
    from bench.training import TrainConfig

    rows = []
    torch.manual_seed(0)
    mnist = build_model("mnist-cnn", (1, 28, 28), 10, (0.1307,), (0.3081,)).eval()
    x = torch.rand(images, 1, 28, 28)
    y = mnist(x).argmax(1).detach()  # PGD's cost does not depend on the weights or the inputs
    pgd = LinfPGD(LinfPGD.Params(steps=PGD_STEPS, restarts=1), chunk_size=chunk)  # one walk, as the loop
    eps = 0.1
    times = interleaved({
        "hand-written torch loop": lambda: torch_pgd(mnist, x, y, eps, chunk),
        "pgd-linf (foolbox)": lambda: pgd.run(mnist, x, y, [eps]),
    }, repeats, warm_up=True)
    rows.append(_row(f"PGD-Linf-{PGD_STEPS}, MNIST CNN, {images} images", "pgd-linf (foolbox)",
                     "hand-written torch loop", times, TARGETS["pgd"]))

    # CW stops early once it has converged, so it needs a trained model to do representative work.
    digits = load_digits()
    torch.manual_seed(0)
    defense = Baseline(build_model("digits-cnn", digits.shape, 10, digits.mean, digits.std))
    defense.fit(digits.x_train, digits.y_train, TrainConfig(epochs=5))
    model = defense.attack_model().eval()
    xd, yd = digits.x_test[:images], digits.y_test[:images]
    cw = CarliniWagnerL2(CarliniWagnerL2.Params(), chunk_size=chunk)
    times = interleaved({
        "foolbox direct": lambda: foolbox_cw_direct(model, xd, yd, cw.params, chunk),
        "cw-l2 (foolbox)": lambda: cw.smallest_adversarials(model, xd, yd),
    }, repeats, warm_up=True)
    rows.append(_row(f"CW-L2, digits CNN, {len(xd)} images", "cw-l2 (foolbox)", "foolbox direct", times, TARGETS["cw"]))
    return rows


def pixeldp_prediction_rows(images: int, repeats: int) -> list[Row]:
    from bench.defenses.pixeldp import PixelDP
    from bench.models import build_model

    shape = (1, 28, 28)
    torch.manual_seed(0)
    defense = PixelDP(build_model("mnist-cnn", shape, 10, (0.1307,), (0.3081,)), PixelDP.Params(draws=PIXELDP_DRAWS))
    net = defense._build(shape).eval()
    defense.measure_sensitivity()
    x = torch.rand(images, *shape)
    # The floor at its best batch size: a quick sweep first.
    sweep = interleaved({str(rows): (lambda rows=rows: pixeldp_floor(net, x[:16], PIXELDP_DRAWS, rows))
                         for rows in (64, 128, 256, 512)}, repeats)
    best_rows = int(min(sweep, key=lambda k: min(sweep[k][0])))
    floor = f"floor ({best_rows} rows per pass)"
    times = interleaved({
        floor: lambda: pixeldp_floor(net, x, PIXELDP_DRAWS, best_rows),
        "pixeldp evaluate": lambda: defense.evaluate(x),
    }, repeats, warm_up=True)
    return [_row(f"PixelDP predict+certify, {PIXELDP_DRAWS} draws, MNIST CNN, {images} images",
                 "pixeldp evaluate", floor, times, TARGETS["pixeldp-predict"])]


def training_rows(batch_size: int, steps: int, repeats: int) -> list[Row]:
    from bench.defenses.baseline import Baseline
    from bench.defenses.madry import Madry
    from bench.defenses.pixeldp import PixelDP
    from bench.models import build_model

    shape, mean, std = (1, 28, 28), (0.1307,), (0.3081,)
    torch.manual_seed(0)
    x = torch.rand(batch_size, *shape)
    y = torch.randint(0, 10, (batch_size,))
    baseline = Baseline(build_model("mnist-cnn", shape, 10, mean, std))
    pixeldp = PixelDP(build_model("mnist-cnn", shape, 10, mean, std), PixelDP.Params())
    pixeldp._build(shape)
    madry = Madry(build_model("mnist-cnn", shape, 10, mean, std), Madry.Params(epsilon=0.1))
    for defense in (baseline, pixeldp, madry):
        defense.model.train()
    functions = {
        "baseline step": repeated(make_step(baseline, x, y), steps),
        "pixeldp step": repeated(make_step(pixeldp, x, y), steps),
        "madry step (PGD-7)": repeated(make_step(madry, x, y), max(1, steps // 8)),
    }
    times = interleaved(functions, repeats, warm_up=True)
    # Madry runs fewer steps (each costs about 8 baseline steps); compare per step.
    madry_times, madry_memory = times["madry step (PGD-7)"]
    times["madry step (PGD-7)"] = ([t * steps / max(1, steps // 8) for t in madry_times], madry_memory)
    what = f"training step, MNIST CNN, batch {batch_size} (time per {steps} steps)"
    return [
        _row(what, "pixeldp step", "baseline step", times, TARGETS["pixeldp-train"]),
        _row(what, "madry step (PGD-7)", "baseline step", times, None),
    ]


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


def grid_rows(repeats: int) -> list[Row]:
    """The same 4-run digits grid with ``bench run --jobs 2`` against ``--jobs 1``. The row also
    gives the CPU seconds of each (median over rounds): on a machine that other work keeps busy, a
    second worker gets no core of its own, but the CPU each side used is still a measurement."""
    import tempfile

    cpu: dict[int, list[float]] = {2: [], 1: []}

    def run(scratch: str, jobs: int) -> None:
        cpu[jobs].append(bench_run(Path(scratch) / f"jobs{jobs}-{len(cpu[jobs])}", jobs))

    with tempfile.TemporaryDirectory() as scratch:
        times = interleaved({"--jobs 2": lambda: run(scratch, 2), "--jobs 1": lambda: run(scratch, 1)}, repeats,
                            memory=False)  # the work is in other processes
    return [_row("bench run: 4-run digits grid (baseline, pixeldp draws=100 x seeds 0, 1; clean, pgd-linf 0.1 "
                 f"one walk; default epochs and sizes); CPU s: --jobs 2 {statistics.median(cpu[2]):.1f}, "
                 f"--jobs 1 {statistics.median(cpu[1]):.1f}", "--jobs 2", "--jobs 1", times, TARGETS["grid"])]


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


def _spread(ratios: list[float]) -> str:
    """The median of the per-round ratios and their range."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def render(rows: list[Row]) -> str:
    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    lines = [
        "| what | ours | reference | ours s | reference s | ratio | per round: median (range) | target | ours peak MB | reference peak MB | |",
        "|:--|:--|:--|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for row in rows:
        target = "" if row.target is None else (f"<= {row.target:.2f}" if row.target >= 1 else f"<= {row.target:.3f}")
        lines.append(
            f"| {row.what} | {row.ours} | {row.reference} | {row.seconds:.3f} | {row.reference_seconds:.3f} | "
            f"{row.ratio:.3f} | {_spread(row.round_ratios)} | {target} | {mb(row.memory)} | {mb(row.reference_memory)} | {row.verdict} |"
        )
    return "\n".join(lines)


SECTIONS = ("attacks", "pixeldp", "training", "grid")


def run_perf(sections: tuple[str, ...] = SECTIONS, repeats: int = 3, images: int = 128, chunk: int = DEFAULT_ATTACK_BATCH_SIZE,
             batch_size: int = 64, steps: int = 16) -> tuple[list[Row], str, str]:
    """Measure ``sections``; returns the rows, the machine before and the machine after (load)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # foolbox imports scipy.ndimage.filters
    before = machine()
    rows: list[Row] = []
    if "attacks" in sections:
        LOGGER.info("perf: attacks")
        rows += attack_rows(images, repeats, chunk)
    if "pixeldp" in sections:
        LOGGER.info("perf: pixeldp prediction")
        rows += pixeldp_prediction_rows(min(images, 64), repeats)
    if "training" in sections:
        LOGGER.info("perf: training steps")
        rows += training_rows(batch_size, steps, repeats)
    if "grid" in sections:
        LOGGER.info("perf: grid, 2 workers against 1")
        rows += grid_rows(max(1, repeats - 1))
    return rows, before, machine()
