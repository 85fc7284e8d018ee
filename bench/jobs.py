"""A grid of runs as jobs, run in this process, on local worker processes or on a Dask cluster.

A grid (defenses x datasets x seeds, each run facing its attacks) becomes two kinds of job:

- one ``TrainJob`` per distinct training spec (runs that share one reuse its checkpoint);
- one ``EvalJob`` per (run, evaluation step, shard): the clean step and each attack, on a shard
  of at most ``SHARD_SIZE`` test samples.

A job is a plain, picklable description that carries its data (tensors, and the trained weights
for an evaluation) and needs no global state: ``run_job`` builds the defense from the spec,
seeds itself from the spec (and the shard), and returns its result. Workers never open the
results store; the driver (``run_grid``) is its one writer: it saves each checkpoint and
commits each evaluation job's records in one transaction as they arrive, so a serial, a
``--jobs N`` and a cluster run write the same records, and a killed driver or worker loses no
committed job and leaves no duplicate (the next run of the same command resumes the missing
jobs).

Where the jobs run (in this process, local worker processes, a Dask cluster) is
:mod:`bench.executors`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from bench import log, progress
from bench.datasets.base import Dataset, balanced_subset
from bench.errors import BenchError
from bench.evaluation import Step, StepResult, describe, evaluate_step
from bench.executors import Serial, start_worker
from bench.lifecycle import RunFacts, RunRecorder
from bench.log import LOGGER
from bench.registry import ATTACKS, DEFENSES
from bench.runner import build_defense, resolved, spec_steps
from bench.spec import RunSpec
from bench.store import Run
from bench.training import TrainConfig, fit_and_check
from bench.types import CLEAN, Record

# Test samples per evaluation job: large test sets split into shards that run in parallel and
# resume one by one. Part of what a record depends on (each shard seeds itself), so fixed.
SHARD_SIZE = 500


@dataclass(frozen=True)
class DataInfo:
    """What a model is built from: the dataset's name, image shape, classes and normalisation."""

    name: str
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, dataset: Dataset) -> "DataInfo":
        return cls(dataset.name, tuple(dataset.shape), tuple(dataset.classes), tuple(dataset.mean), tuple(dataset.std))

    def empty_dataset(self) -> Dataset:
        empty = torch.zeros(0, *self.shape)
        return Dataset(self.name, empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long),
                       list(self.classes), self.mean, self.std)


@dataclass
class TrainJob:
    """Train ``spec``'s defense on ``x, y`` (its training subset); returns the state dict."""

    spec: RunSpec
    data: DataInfo
    x: torch.Tensor
    y: torch.Tensor
    label: str
    device: str = "cpu"
    threads: int | None = None  # torch threads in a worker; None: leave as it is (in-process)
    driver_pid: int | None = None  # local workers: leave when this process is gone
    verbosity: int = field(default_factory=log.verbosity)  # the driver's: a worker's heartbeat follows --quiet

    @property
    def key(self) -> tuple:
        return ("train", self.spec.training_hash())

    def describe(self) -> str:
        return f"train {self.label}"


@dataclass
class EvalJob:
    """Evaluate one step (``clean`` or an attack) of ``spec``'s run on one shard of test samples."""

    spec: RunSpec
    data: DataInfo
    step: str
    shard: int
    shards: int
    sample_index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    state: dict[str, Any]
    label: str
    device: str = "cpu"
    threads: int | None = None
    driver_pid: int | None = None
    verbosity: int = field(default_factory=log.verbosity)
    # Transfer attacks: the undefended surrogate's training spec and, once trained, its weights.
    surrogate: RunSpec | None = None
    surrogate_state: dict[str, Any] | None = None

    @property
    def key(self) -> tuple:
        return ("eval", self.spec.hash(), self.step, self.shard)

    def describe(self) -> str:
        shard = f" shard {self.shard + 1}/{self.shards}" if self.shards > 1 else ""
        return f"{self.label} {self.step}{shard}"


@dataclass
class JobResult:
    key: tuple
    seconds: float
    records: list[Record] | None = None
    diagnostics: list[tuple] = field(default_factory=list)
    state: dict[str, Any] | None = None
    error: str | None = None
    host: str = field(default_factory=socket.gethostname)


def shard_seed(seed: int, shard: int) -> int:
    """Shard 0 keeps the run's seed (a one-shard run equals an unsharded one); others derive theirs."""
    if shard == 0:
        return seed
    return int(hashlib.sha256(f"{seed}/{shard}".encode()).hexdigest()[:15], 16)


def shards_of(count: int) -> list[slice]:
    return [slice(start, min(start + SHARD_SIZE, count)) for start in range(0, count, SHARD_SIZE)] or [slice(0, 0)]


# -- running one job (anywhere) ------------------------------------------------------------------
def run_job(job: TrainJob | EvalJob) -> JobResult:
    """Run one job; exceptions come back as the result's ``error``, so other jobs go on."""
    if job.driver_pid is not None:
        start_worker(job.driver_pid)
    started = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
        # A worker's stderr is not the user's terminal: no bars or loop lines, only the heartbeat's
        # line (one per progress.HEARTBEAT seconds) naming this job, at the driver's verbosity.
        progress.QUIET = True
        log.configure(job.verbosity)
    try:
        with progress.step(job.describe()):
            if isinstance(job, TrainJob):
                state = _train(job)
                return JobResult(job.key, time.perf_counter() - started, state=state)
            result = _evaluate(job)
        return JobResult(job.key, time.perf_counter() - started, records=result.records, diagnostics=result.diagnostics)
    except Exception as error:  # noqa: BLE001 - any failure of one job is recorded, not fatal
        where = traceback.extract_tb(error.__traceback__)[-1]
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return JobResult(job.key, time.perf_counter() - started,
                         error=f"{message} (at {Path(where.filename).name}:{where.lineno})")


def _train(job: TrainJob) -> dict[str, Any]:
    spec = job.spec
    defense, _ = build_defense(spec, job.data.empty_dataset(), job.device)
    config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, device=job.device)
    fit_and_check(defense, job.x, job.y, config)  # raises TrainingFailed: the run fails, no checkpoint is stored
    return defense.state_dict()


def _evaluate(job: EvalJob) -> StepResult:
    """One step of the evaluation loop (``bench.evaluation.evaluate_step``) on one shard."""
    spec = job.spec
    defense, _ = build_defense(spec, job.data.empty_dataset(), job.device)
    defense.load_state_dict(job.state)
    surrogate = None
    if job.surrogate is not None and job.surrogate_state is not None:
        baseline, _ = build_defense(job.surrogate, job.data.empty_dataset(), job.device)
        baseline.load_state_dict(job.surrogate_state)
        surrogate = baseline.attack_model()
    step = Step(CLEAN) if job.step == CLEAN else next(s for s in spec_steps(spec) if s.name == job.step)
    return evaluate_step(defense, step, job.x, job.y, job.sample_index, seed=shard_seed(spec.seed, job.shard),
                             eot_draws=spec.eot_draws, surrogate=surrogate)


# -- the driver -----------------------------------------------------------------------------------
@dataclass
class Planned:
    """One run of the grid as the driver tracks it."""

    spec: RunSpec
    label: str
    params: dict[str, Any]
    dataset: Dataset
    train_index: torch.Tensor
    test_index: torch.Tensor
    jobs_left: int = 0
    errors: list[str] = field(default_factory=list)
    device: str = "cpu"
    surrogate: RunSpec | None = None  # the undefended surrogate's training spec, for transfer attacks
    recorder: RunRecorder | None = None  # its life in the store, from ``open``

    def open(self, store, threads: int | None, force: bool) -> RunRecorder:
        """Register, resume or (unless ``force``) find complete this run in ``store``."""
        defense_class = DEFENSES.get(self.spec.defense)
        facts = RunFacts(steps=tuple(spec_steps(self.spec)), randomized=defense_class.randomized,
                         certifies=defense_class.certifies, eot_draws=self.spec.eot_draws,
                         input_dim=int(math.prod(self.dataset.shape)), num_test=len(self.test_index),
                         num_train=len(self.train_index), data_official=self.dataset.provenance, device=self.device,
                         worker_threads=threads)
        self.recorder = RunRecorder(store, Run.start(self.spec, self.label, self.params), facts, log=LOGGER.info,
                                    skip_complete=not force)
        return self.recorder

    @property
    def run_id(self) -> str:
        return self.recorder.run.run_id

    @property
    def done(self) -> dict[str, set[int]]:
        return self.recorder.done

    def finish(self) -> None:
        self.recorder.finish(self.errors)


@dataclass
class GridOutcome:
    run_ids: list[str]
    skipped: int
    jobs: int
    failures: list[str]


def plan_runs(specs: list[RunSpec], datasets: dict[tuple[str, int], Dataset], device: str) -> list[Planned]:
    """Each spec resolved (model, epochs and every parameter spelled out), with its subsets."""
    planned = []
    for spec in specs:
        dataset = datasets[(spec.dataset, spec.image_size)]
        defense, model_name = build_defense(spec, dataset, device)
        label, params = describe(defense, spec.defense, model_name)
        surrogate = surrogate_spec(dataclasses.replace(spec, model=model_name), dataset, device) if _transfers(spec) else None
        spec = resolved(spec, defense, model_name)
        planned.append(Planned(
            spec, label, params, dataset,
            balanced_subset(dataset.y_train, spec.train_size, spec.seed),
            balanced_subset(dataset.y_test, spec.test_size, spec.seed), device=device, surrogate=surrogate,
        ))
    return planned


def _transfers(spec: RunSpec) -> bool:
    return any(ATTACKS.get(name).target == "surrogate" for name in spec.attacks)


def surrogate_spec(spec: RunSpec, dataset: Dataset, device: str) -> RunSpec:
    """The training spec of ``spec``'s undefended surrogate: the baseline with the same model,
    data, seed, subset and the training settings the user gave (``spec`` as asked for, before
    the defense's defaults fill it in), the baseline's defaults for the rest. A baseline run of
    the same grid is then the surrogate itself: their checkpoint is shared."""
    baseline = dataclasses.replace(spec, defense="baseline", params={}, attacks=[], attack_params={}, epsilons=None)
    defense, model_name = build_defense(baseline, dataset, device)
    return resolved(baseline, defense, model_name)


def run_grid(specs: list[RunSpec], datasets: dict[tuple[str, int], Dataset], store, executor=None,
             device: str = "cpu", force: bool = False) -> GridOutcome:
    """Run every spec of the grid through ``executor`` (default: in this process), skipping
    complete runs (unless ``force``), resuming unfinished ones at job granularity, and storing
    as jobs finish."""
    executor = executor or Serial()
    runs = plan_runs(specs, datasets, device)
    try:
        return _drive(runs, store, executor, device, force)
    except BaseException:
        # Hand unfinished runs back: their stored jobs stay, and the same command resumes them.
        for run in runs:
            if run.recorder is not None:
                run.recorder.interrupt()
        raise


def _drive(runs: list[Planned], store, executor, device: str, force: bool) -> GridOutcome:
    threads = getattr(executor, "threads", None)
    active: list[Planned] = []
    for run in runs:
        if not run.open(store, threads, force).complete:
            active.append(run)
    run_ids = [run.run_id for run in runs]
    for run in [run for run in active if run.recorder.resumed and not _evaluation_jobs(run, device, threads)]:
        # Every step was stored before the process that wrote them stopped (Ctrl-C or a crash
        # after the last commit): nothing to run, only the finish it missed.
        run.recorder.say(f"every step of unfinished run {run.run_id} is stored: completing it")
        run.finish()
        active.remove(run)
    skipped = len(runs) - len(active)
    if not active:
        LOGGER.info(f"nothing to do: all {len(runs)} run(s) of this grid are complete in {store.path}")
        return GridOutcome(run_ids, skipped, 0, [])
    if skipped:
        LOGGER.info(f"{skipped} of {len(runs)} run(s) already complete: skipped")

    # Wave 1: training jobs, one per distinct training spec without a checkpoint; evaluation
    # jobs of runs whose model is already trained go along. Wave 2: the remaining evaluations.
    states: dict[str, dict[str, Any]] = {}
    training: dict[str, TrainJob] = {}

    def obtain_weights(run: Planned, spec: RunSpec, label: str) -> bool:
        """``spec``'s weights: known, read from its checkpoint, or trained by a new job; False
        when none of these can be (no training split)."""
        training_hash = spec.training_hash()
        if training_hash in states or training_hash in training:
            return True
        state = store.load_checkpoint(training_hash)
        if state is not None:
            states[training_hash] = state
            LOGGER.info(f"[{label}] reusing checkpoint {store.checkpoint_path(training_hash)}")
            return True
        if len(run.train_index) == 0:
            return False
        training[training_hash] = TrainJob(spec, DataInfo.of(run.dataset), run.dataset.x_train[run.train_index],
                                           run.dataset.y_train[run.train_index], label, device, threads)
        return True

    for run in active:
        if not obtain_weights(run, run.spec, run.label):
            raise BenchError(f"dataset {run.dataset.name} has no training split here; train elsewhere or pass a checkpoint")
    evaluations = {run.run_id: _evaluation_jobs(run, device, threads) for run in active}
    for run in active:  # the surrogates of transfer attacks still to run: stored, or trained here
        if not any(job.surrogate is not None for job in evaluations[run.run_id]):
            continue
        if not obtain_weights(run, run.surrogate, f"surrogate of {run.label}"):
            LOGGER.warning(f"[{run.label}] transfer attacks skipped: {run.dataset.name} has no training split "
                           "to train the undefended surrogate on")
            evaluations[run.run_id] = [job for job in evaluations[run.run_id] if job.surrogate is None]
    for run in active:
        run.jobs_left = len(evaluations[run.run_id])
    total = len(training) + sum(len(jobs) for jobs in evaluations.values())
    LOGGER.info(f"{total} job(s) for {len(active)} run(s) on {executor.name}: "
                f"{len(training)} training, {total - len(training)} evaluation")

    by_key: dict[tuple, tuple[Planned, EvalJob]] = {}
    failures: list[str] = []
    # A bar in a terminal; elsewhere the "done" lines below say as much.
    bar = progress.Progress(total, "grid", unit="job", every=math.inf, leave=True)
    started = time.monotonic()

    def done_line(text: str) -> str:
        count = bar.done + 1
        left = (time.monotonic() - started) / count * (total - count)
        return f"[{count}/{total}{f', about {left:.0f} s left' if count < total else ''}] {text}"

    def evaluation_wave(runs: Iterable[Planned]) -> list[EvalJob]:
        """The jobs of ``runs`` whose weights (and surrogate's, for transfer attacks) are ready."""
        wave = []
        for run in runs:
            state = states.get(run.spec.training_hash())
            if state is None:
                continue
            waiting = []
            for job in evaluations.pop(run.run_id, []):
                if job.surrogate is not None:
                    job.surrogate_state = states.get(job.surrogate.training_hash())
                    if job.surrogate_state is None:
                        waiting.append(job)
                        continue
                job.state = state
                by_key[job.key] = (run, job)
                wave.append(job)
            if waiting:
                evaluations[run.run_id] = waiting
        return wave

    def drop_transfers(training_hash: str, error: str) -> None:
        """A surrogate's training failed: the transfer jobs waiting for it fail with it."""
        for run in active:
            waiting = evaluations.get(run.run_id, [])
            dropped = [job for job in waiting if job.surrogate is not None and job.surrogate.training_hash() == training_hash]
            if not dropped:
                continue
            evaluations[run.run_id] = [job for job in waiting if job not in dropped]
            run.errors.append(f"surrogate training: {error}")
            bar.update(len(dropped))
            run.jobs_left -= len(dropped)
            if run.jobs_left == 0:
                run.finish()

    try:
        first = sorted(training.values(), key=_longest_first) + sorted(evaluation_wave(active), key=_longest_first)
        second: list[EvalJob] = []
        for wave_number in (1, 2):
            wave = first if wave_number == 1 else sorted(second, key=_longest_first)
            for result in robust(executor, wave):
                if result.key[0] == "train":
                    job = training[result.key[1]]
                    owners = [run for run in active if run.spec.training_hash() == result.key[1]]
                    if result.error:
                        failures.append(f"{job.describe()}: {result.error}")
                        LOGGER.warning(done_line(f"failed: {job.describe()}: {result.error}"))
                        for run in owners:
                            run.errors.append(f"training: {result.error}")
                            skipped_jobs = evaluations.pop(run.run_id, [])
                            bar.update(len(skipped_jobs))
                            run.finish()
                        drop_transfers(result.key[1], result.error)
                    else:
                        path = store.save_checkpoint(result.key[1], result.state)
                        states[result.key[1]] = result.state
                        for run in owners:
                            run.recorder.work("train", result.seconds)
                        LOGGER.info(done_line(f"done: {job.describe()} in {result.seconds:.1f} s (checkpoint {path.name})"))
                        second += evaluation_wave(active)
                    bar.update(1)
                    continue
                run, job = by_key[result.key]
                if result.error:
                    failures.append(f"{job.describe()}: {result.error}")
                    run.errors.append(f"{job.step}: {result.error}")
                    LOGGER.warning(done_line(f"failed: {job.describe()}: {result.error}"))
                else:
                    # One transaction per job, with the seconds its worker spent (costs add up across resumes).
                    run.recorder.commit(job.step, result.records, result.diagnostics, result.seconds)
                    LOGGER.info(done_line(f"done: {job.describe()} in {result.seconds:.1f} s: {_summary(result.records)}"))
                bar.update(1)
                run.jobs_left -= 1
                if run.jobs_left == 0:
                    run.finish()
        for run in active:
            if run.jobs_left > 0 and not run.errors:  # its training job never came back
                run.errors.append("training did not finish")
                run.finish()
    finally:
        bar.close()
    return GridOutcome(run_ids, skipped, total, failures)


def robust(executor, jobs: list) -> Iterator[JobResult]:
    """``executor.run(jobs, run_job)``; when the pool itself breaks (a worker killed), the jobs
    without a result run once more on a fresh pool, and then come back as failed."""
    pending = {id(job): job for job in jobs}
    reason = ""
    for attempt in range(2):
        try:
            for result in executor.run(list(pending.values()), run_job):
                for key, job in list(pending.items()):
                    if job.key == result.key:
                        del pending[key]
                        break
                yield result
            return
        except (KeyboardInterrupt, BenchError):
            raise
        except Exception as error:  # noqa: BLE001 - the pool broke, not a job
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            LOGGER.warning(f"a worker died ({reason}); {len(pending)} job(s) without a result"
                           + (" run again" if attempt == 0 else " fail"))
    for job in pending.values():
        yield JobResult(job.key, 0.0, error=f"its worker died ({reason})")


def _longest_first(job: TrainJob | EvalJob) -> tuple:
    """Costly jobs first, so that no worker is left with a long one at the end while the others
    idle: training by epochs x images x the defense's work per image (``Defense.training_cost``); then evaluations of randomized defenses (every prediction
    averages many noisy draws), attacks before the clean step, bigger shards first."""
    if isinstance(job, TrainJob):
        defense = DEFENSES.get(job.spec.defense)
        fields = {f.name for f in dataclasses.fields(defense.Params)}
        params = defense.Params(**{k: v for k, v in job.spec.params.items() if k in fields})  # resolved: every field
        return (0, -(job.spec.epochs or 1) * len(job.x) * defense.training_cost(params))
    return (1, not DEFENSES.get(job.spec.defense).randomized, job.step == CLEAN, -len(job.x))


def _evaluation_jobs(run: Planned, device: str, threads: int | None) -> list[EvalJob]:
    """The (step, shard) jobs of ``run`` whose records are not stored yet."""
    dataset, index = run.dataset, run.test_index
    steps = [CLEAN, *run.spec.attacks]
    parts = shards_of(len(index))
    jobs = []
    for step in steps:
        stored = run.done.get(step, set())
        for number, part in enumerate(parts):
            samples = index[part]
            if len(samples) and int(samples[0]) in stored:
                continue  # a shard commits in one transaction: one stored sample means all are
            surrogate = run.surrogate if step != CLEAN and ATTACKS.get(step).target == "surrogate" else None
            jobs.append(EvalJob(run.spec, DataInfo.of(dataset), step, number, len(parts), samples,
                                dataset.x_test[samples], dataset.y_test[samples], {}, run.label, device, threads,
                                surrogate=surrogate))
    return jobs


def _summary(records: list[Record]) -> str:
    by_epsilon: dict[float, list[int]] = {}
    for record in records:
        by_epsilon.setdefault(record.epsilon, []).append(record.correct)
    return ", ".join(f"eps {eps:g} accuracy {np.mean(values):.3f}" for eps, values in sorted(by_epsilon.items()))
