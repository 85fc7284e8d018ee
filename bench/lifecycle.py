"""A run's life, the one place that decides it: registered or resumed, held, committed step by
step, and finished with a typed summary.

``bench.evaluate`` (a whole run in this process) and the grid (``bench.jobs``: runs whose steps
come back from workers) both go through :class:`RunRecorder`; they differ only in who calls it.
With a store, a run is registered as ``running`` (or an unfinished run of the same spec that no
live process owns is resumed, its stored samples skipped), this process holds a lease on it
while it works, every step commits in one transaction with the seconds it took, and the run ends
``complete`` (assessed by ``bench.diagnostics``), ``failed`` (with its errors) or, when the
process is stopped, ``interrupted`` (the same command resumes it). Without a store the same
happens in memory, so a notebook's run and a stored run carry the same summary.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pandas as pd

from bench.diagnostics import Assessment, Diagnostic, assess
from bench.evaluation import Log, Step, quiet
from bench.store import Run, RunLease, RunStatus, Store, work_costs
from bench.types import CLEAN, Record


@dataclass(frozen=True)
class RunFacts:
    """What a run's summary says about how it ran, known before it starts."""

    steps: tuple[Step, ...]  # the attack steps (the clean step is always there)
    randomized: bool
    certifies: bool
    eot_draws: int
    input_dim: int
    num_test: int
    num_train: int | None  # None: the model came trained (``bench.evaluate``)
    data_official: Any
    device: str
    worker_threads: int | None = None


@dataclass
class RunInfo:
    """A finished run's summary, stored as ``Run.info``: how it ran, what it cost (seconds summed
    over every process that worked on it, a resumed run's earlier ones too) and its diagnostics."""

    num_test: int
    num_train: int | None
    device: str
    randomized: bool
    certifies: bool
    data_official: Any
    resumed: bool
    argv: list[str]
    worker_threads: int | None
    train_seconds: float
    eval_seconds: float
    model_train_seconds: float | None  # the training of its model, by whichever run did it
    reused_checkpoint: bool
    processes: int
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    diagnostics_complete: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if not values["errors"]:
            del values["errors"]
        return values


def assess_run(records: list[Record], diagnostics: list[Diagnostic], steps: Sequence[Step], randomized: bool,
               eot_draws: int, input_dim: int | None) -> Assessment:
    """``bench.diagnostics.assess`` for a run with these attack steps."""
    kinds = {step.name: step.attack.kind for step in steps if step.attack is not None}
    audited = tuple(sorted({step.attack.norm for step in steps if step.attack.kind in ("gradient-free", "transfer")}))
    return assess(records, diagnostics, kinds=kinds, declared_randomized=randomized,
                  eot_draws=eot_draws if steps else None, input_dim=input_dim, audited_norms=audited)


class RunRecorder:
    """One run's records, in memory or in a store, from its start to its finish.

    ``done`` maps each step to the sample indices already stored (a resumed run skips them);
    ``resumed`` says whether an unfinished run was taken over. With ``skip_complete``, a complete
    run of the same spec is taken as it is: ``complete`` is then true and nothing is written.
    Another live process writing the same spec is waited for first, so two identical commands do
    the work once. ``resume=False`` always starts a new run.
    """

    def __init__(self, store: Store | None, run: Run, facts: RunFacts, *, log: Log = quiet, resume: bool = True,
                 skip_complete: bool = False):
        self.store, self.run, self.facts, self.log = store, run, facts, log
        self.done: dict[str, set[int]] = {}
        self.resumed = False
        self._records: list[Record] = []
        self._diagnostics: list[Diagnostic] = []
        self._work: list[tuple[str, float]] = []
        self._since = time.perf_counter()
        self._lease: RunLease | None = None
        if store is None:
            return
        if resume or skip_complete:
            store.wait_for_writer(run.spec_hash, self.say)
        finished = store.complete_run(run.spec_hash) if skip_complete else None
        if finished is not None:
            self.run = finished
            self.say(f"already complete: run {finished.run_id}; --force starts a new one")
            return
        previous = store.resumable(run.spec_hash) if resume else None
        if previous is not None:
            stored_run, self.done = previous
            self.run = dataclasses.replace(run, run_id=stored_run.run_id, created=stored_run.created)
            self.resumed = True
            stored = ", ".join(f"{step} ({len(samples)} samples)" for step, samples in sorted(self.done.items()))
            self.say(f"resuming unfinished run {self.run.run_id}: {stored or 'nothing'} already stored")
        else:
            store.begin_run(run)
        self._lease = store.hold(self.run.run_id)  # a heartbeat: other processes see the run is worked on

    @property
    def complete(self) -> bool:
        """The run is complete: found so (``skip_complete``), or finished here."""
        return self.run.status == RunStatus.COMPLETE

    def say(self, text: str) -> None:
        self.log(f"[{self.run.label}] {text}")

    def _seconds(self, seconds: float | None) -> float:
        """``seconds`` as given (a worker timed its job), else the time since the last commit."""
        spent = time.perf_counter() - self._since if seconds is None else seconds
        self._since = time.perf_counter()
        return spent

    def commit(self, step: str, records: list[Record], diagnostics: Iterable[Diagnostic] = (),
               seconds: float | None = None) -> None:
        """Store one step's (or one shard's) records and diagnostics atomically, with its seconds."""
        diagnostics = list(diagnostics)
        spent = self._seconds(seconds)
        if self.store is not None:
            self.store.add_records(self.run.run_id, records, step=step, seconds=spent, diagnostics=diagnostics)
        else:
            self._records += records
            self._diagnostics += diagnostics
            self._work.append((step, spent))
        self.done.setdefault(step, set()).update(record.sample_index for record in records)

    def work(self, step: str, seconds: float | None = None) -> None:
        """Charge a step that writes no records (``train``, or ``load`` for a checkpoint) to the run."""
        spent = self._seconds(seconds)
        if self.store is not None:
            self.store.add_work(self.run.run_id, step, spent)
        else:
            self._work.append((step, spent))

    def records(self) -> list[Record]:
        return self.store.run_records(self.run.run_id) if self.store is not None else list(self._records)

    def diagnostics(self) -> list[Diagnostic]:
        if self.store is None:
            return list(self._diagnostics)
        return [Diagnostic(*row) for row in self.store.diagnostics(self.run.run_id)]

    def _costs(self) -> dict[str, Any]:
        if self.store is not None:
            return self.store.costs(self.run.run_id, self.run.training_hash)
        work = pd.DataFrame(self._work, columns=["step", "seconds"]).assign(host="", pid=0)
        trained = work.seconds[work.step == "train"]
        return work_costs(work, float(trained.sum()) if len(trained) else None)

    def finish(self, errors: Sequence[str] = ()) -> Run:
        """End the run: ``failed`` with ``errors`` when there are any, else assessed and
        ``complete``. Returns the finished run (its ``info`` is ``RunInfo.as_dict()``)."""
        facts = self.facts
        info = RunInfo(num_test=facts.num_test, num_train=facts.num_train, device=facts.device,
                       randomized=facts.randomized, certifies=facts.certifies, data_official=facts.data_official,
                       resumed=self.resumed, argv=list(sys.argv), worker_threads=facts.worker_threads,
                       errors=list(errors), **self._costs())
        warnings: list[str] = []
        status = RunStatus.FAILED if errors else RunStatus.COMPLETE
        if not errors:
            records = self.records()
            assessment = assess_run(records, self.diagnostics(), facts.steps, facts.randomized, facts.eot_draws,
                                    facts.input_dim)
            info.diagnostics, info.diagnostics_complete = assessment.info()["diagnostics"], assessment.complete
            warnings = assessment.warnings
            for warning in warnings:
                self.say(f"warning: {warning}")
            clean = [record.correct for record in records if record.attack == CLEAN]
            if clean:
                self.say(f"complete: clean accuracy {sum(clean) / len(clean):.4f} on {len(clean)} test images")
        self.run = dataclasses.replace(self.run, info=info.as_dict(), warnings=warnings, status=status)
        if self.store is not None:
            try:
                self.store.finish_run(self.run.run_id, self.run.info, warnings, status)
            finally:
                self._stop()
        return self.run

    def interrupt(self) -> None:
        """Hand the unfinished run back: its stored steps stay, and the same command resumes it.
        Nothing happens to a run that has finished (or that was found complete)."""
        if self.run.status in (RunStatus.COMPLETE, RunStatus.FAILED):
            return
        self.run = dataclasses.replace(self.run, status=RunStatus.INTERRUPTED)
        if self.store is not None:
            self.store.release(self.run.run_id)
            self._stop()

    def _stop(self) -> None:
        if self._lease is not None:
            self._lease.stop()
            self._lease = None

