"""The results store: one SQLite database of runs and per-sample records, plus checkpoints.

A run is registered as ``running`` when it starts; each evaluation step (clean, then one per
attack) commits its records in one transaction, and the run turns ``complete`` at the end. A
crash or ``kill -9`` therefore leaves whole steps only, tables read complete runs only, and the
next run of the same spec resumes from the stored steps. WAL journaling keeps earlier runs
readable throughout. Checkpoints are
written to a temporary file and renamed into place, so a half-written one never exists.

Ownership: the process writing a run holds a lease on it (``owner_host``, ``owner_pid``,
``lease_until``). It renews the lease with every committed step and from a heartbeat thread
every HEARTBEAT_SECONDS during long steps (``Store.hold``); a run is taken over only when
its owner is gone: on this host, its pid has ended or its lease expired; on another host (a
shared results folder), its lease expired, so hosts sharing a folder need clocks that agree
to well within LEASE_SECONDS. Claiming is one ``BEGIN IMMEDIATE`` transaction that checks and
sets the owner, and every step's insert checks that this process still owns the run; a unique
key on (run, sample, attack, epsilon) makes a duplicate record impossible whatever happens.

Cost: each step also commits a ``work`` row (step, seconds, host, pid), so a run's training
and evaluation seconds are summed over every process that worked on it.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd

from bench.errors import BenchError
from bench.provenance import library_versions, now
from bench.types import HAS_CERTIFICATE_SQL, RECORD_COLUMNS, Record

# A run's owner renews its lease every HEARTBEAT_SECONDS; one whose lease is LEASE_SECONDS
# old is gone (killed, hung or disconnected) and its run may be taken over. Five minutes
# outlasts a stalled shared file system; a crashed run on this host is resumed at once (pid).
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 60.0

# The per-sample records (``bench.types.Record`` with its run_id); the metrics query this table, in
# a store or in an in-memory database (``bench.metrics.Records``).
RECORDS_TABLE = """
CREATE TABLE IF NOT EXISTS records (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    sample_index INTEGER NOT NULL,
    attack TEXT NOT NULL,
    norm TEXT,
    epsilon REAL NOT NULL,
    prediction INTEGER NOT NULL,
    label INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    distance REAL,
    certified_label INTEGER,
    certified_radius REAL,
    certified_norm TEXT,
    certified INTEGER
);
CREATE INDEX IF NOT EXISTS records_by_run ON records(run_id);
"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    dataset TEXT NOT NULL,
    defense TEXT NOT NULL,
    label TEXT NOT NULL,
    params TEXT NOT NULL,
    spec TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    training_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    versions TEXT NOT NULL,
    host TEXT NOT NULL,
    info TEXT NOT NULL,
    warnings TEXT NOT NULL,
    status TEXT NOT NULL
);
{RECORDS_TABLE}"""
# Added to stores written before them (see Store._migrate).
OWNER_COLUMNS = {"owner_host": "TEXT", "owner_pid": "INTEGER", "lease_until": "REAL"}
WORK_TABLE = """
CREATE TABLE IF NOT EXISTS work (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step TEXT NOT NULL,
    seconds REAL NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
)"""
# Diagnostics' counts (bench.diagnostics.Diagnostic), committed with the records of their step.
DIAGNOSTICS_TABLE = """
CREATE TABLE IF NOT EXISTS diagnostics (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step TEXT NOT NULL,
    name TEXT NOT NULL,
    epsilon REAL NOT NULL,
    count INTEGER NOT NULL,
    n INTEGER NOT NULL
)"""
UNIQUE_RECORDS = "CREATE UNIQUE INDEX IF NOT EXISTS records_unique ON records(run_id, sample_index, attack, epsilon)"
# Steps of the work table that are not evaluation: training the model, or loading its checkpoint.
MODEL_STEPS = ("train", "load")
JSON_COLUMNS = {"params": dict, "spec": dict, "versions": dict, "info": dict, "warnings": list}

# Evaluation steps and checkpoints this process has committed: after a failure the CLI says
# whether completed steps are stored (and the same command resumes) or nothing was.
_committed = 0


def committed_steps() -> int:
    """How many evaluation steps (record batches) and checkpoints this process has committed."""
    return _committed


def _kept() -> str:
    """The end of a failed write's message: what this process committed before stays stored."""
    return f"; the {_committed} step(s) or checkpoint(s) this process committed before are kept" if _committed else ""


def _count_commit() -> None:
    global _committed
    _committed += 1


class RunStatus(enum.StrEnum):
    """Where a run is in its life: ``running`` while a process holds it, ``complete`` when every
    step is stored and assessed (only complete runs reach tables), ``interrupted`` when its
    process stopped before the end (the same command resumes it), ``failed`` when a training or
    step failed (its errors are in ``info``)."""

    RUNNING = "running"
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass
class Run:
    run_id: str
    created: str
    dataset: str
    defense: str
    label: str
    params: dict[str, Any]
    spec: dict[str, Any]
    spec_hash: str
    training_hash: str
    seed: int
    versions: dict[str, str]
    host: str
    info: dict[str, Any]
    warnings: list[str]
    status: RunStatus = RunStatus.RUNNING

    @classmethod
    def start(cls, spec: Any, label: str, params: dict[str, Any]) -> "Run":
        """A new run of ``spec`` (a ``bench.spec.RunSpec``): a fresh id, the time, this host and
        the library versions; ``label`` names it in tables, ``params`` are its defense's."""
        return cls(
            run_id=uuid.uuid4().hex[:12], created=now(), dataset=spec.dataset, defense=spec.defense, label=label,
            params=params, spec=dataclasses.asdict(spec), spec_hash=spec.hash(), training_hash=spec.training_hash(),
            seed=spec.seed, versions=library_versions(), host=socket.gethostname(), info={}, warnings=[],
        )


RUN_FIELDS = [f.name for f in dataclasses.fields(Run)]


class RunLease:
    """A run this process owns: a background thread renews its lease every ``every`` seconds, so
    that long training or attack steps do not look like a dead owner. A failed renewal is retried
    at the next beat; a run lost meanwhile is caught by the next commit's ownership check."""

    def __init__(self, store: "Store", run_id: str, every: float = HEARTBEAT_SECONDS):
        self.store, self.run_id = store, run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every,), name=f"lease-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.store.renew(self.run_id)
            except Exception:  # noqa: BLE001 - reported by the next commit
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def claim_hook(run_id: str) -> None:
    """Called inside the claim transaction, between reading a run and claiming it (tests widen
    that gap here to check that a concurrent claim waits)."""


class Store:
    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.path = self.directory / "results.sqlite"

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise BenchError(f"no results store at {self.path}; run 'bench run --out {self.directory}' first")
        try:
            if create:
                self.directory.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: every write is an explicit BEGIN IMMEDIATE ... COMMIT (_writing).
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise self._error(error, "opening it") from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # One transaction: a store is either new (no tables, e.g. left by a full disk) or whole.
            if create or not _tables(connection):
                connection.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
            self._migrate(connection)
        except sqlite3.Error as error:
            connection.close()
            if not create:
                return self._read_only(error)
            raise self._error(error, "opening it") from None
        except BaseException:
            connection.close()
            raise
        return connection

    def _read_only(self, error: sqlite3.Error) -> sqlite3.Connection:
        """The store of a folder this process cannot write (published results, a read-only mount),
        opened for reading only; ``error`` is why the usual opening failed."""
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise BenchError(f"results store {self.path} cannot be opened for writing ({error}) and its {wal.name} "
                             "holds steps not yet merged into it; open it once where it can be written") from None
        try:
            connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True, isolation_level=None)
            tables = _tables(connection)
        except sqlite3.Error:
            raise self._error(error, "opening it") from None
        if not {"runs", "records", "work", "diagnostics"} <= tables:
            connection.close()
            raise BenchError(f"results store {self.path} cannot be opened for writing ({error}), and it needs to be: "
                             "it has no runs yet or was written by an earlier version") from None
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        """Bring a store written by an earlier version up to this schema."""

        def missing() -> tuple[set[str], set[str], bool]:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(runs)")}
            record_columns = {row[1] for row in connection.execute("PRAGMA table_info(records)")}
            present = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            up_to_date = not columns or (columns >= {"status", *OWNER_COLUMNS} and "certified" in record_columns
                                         and present >= {"work", "records_unique", "diagnostics"})
            return columns, record_columns, up_to_date

        if missing()[2]:
            return
        with _writing(connection):
            columns, record_columns, up_to_date = missing()  # again under the lock: another process may have migrated it
            if up_to_date:
                return
            if record_columns and "certified" not in record_columns:
                # Stores written before records had ``certified``: derive it by the one rule,
                # ``bench.types.has_certificate`` (abstention, a failed test and radius 0 are not certified).
                connection.execute("ALTER TABLE records ADD COLUMN certified INTEGER")
                connection.execute(
                    f"UPDATE records SET certified = {HAS_CERTIFICATE_SQL} WHERE certified_radius IS NOT NULL"
                )
            if "status" not in columns:
                # Stores written before runs had a status held complete runs only.
                connection.execute("ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'complete'")
            for name, kind in OWNER_COLUMNS.items():
                if name not in columns:
                    connection.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            connection.execute(WORK_TABLE)
            connection.execute(DIAGNOSTICS_TABLE)
            try:
                connection.execute(UNIQUE_RECORDS)
            except sqlite3.IntegrityError:
                duplicated = connection.execute(
                    "SELECT run_id, SUM(n - 1) FROM (SELECT run_id, COUNT(*) AS n FROM records "
                    "GROUP BY run_id, sample_index, attack, epsilon HAVING n > 1) GROUP BY run_id ORDER BY run_id"
                ).fetchall()
                raise BenchError(
                    f"results store {self.path} holds {sum(n for _, n in duplicated)} duplicate records (same run, sample, "
                    f"attack and epsilon) in run(s) {', '.join(r for r, _ in duplicated)}, written by two processes that "
                    "resumed one run (an earlier version allowed it); tables would count them twice. Keep the first copy of each: "
                    f"sqlite3 {self.path} \"DELETE FROM records WHERE rowid NOT IN (SELECT MIN(rowid) FROM records "
                    "GROUP BY run_id, sample_index, attack, epsilon)\""
                ) from None

    def _error(self, error: Exception, doing: str) -> BenchError:
        """One line naming what failed: a damaged file, or a write the disk or permissions refused."""
        if getattr(error, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            return BenchError(f"results store {self.path} is not readable: {error}")
        return BenchError(f"results store {self.path}: {doing} failed: {error}{_kept()}")

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; a refused write (disk full, read-only) is one BenchError."""
        with closing(self._connect(create=True)) as connection:
            try:
                with _writing(connection):
                    yield connection
            except sqlite3.Error as error:
                raise self._error(error, doing) from None

    def begin_run(self, run: Run) -> None:
        """Register a run, owned by this process."""
        with self._write(f"registering run {run.run_id}") as connection:
            _insert_run(connection, run)
            _set_owner(connection, run.run_id)

    def add_records(self, run_id: str, records: Iterable[Record], step: str | None = None, seconds: float | None = None,
                    diagnostics: Iterable[tuple] = ()) -> None:
        """Append one evaluation step's records, its diagnostics (``bench.diagnostics.Diagnostic``)
        and the seconds this process spent on it, atomically; only the process that owns the run
        may, and never twice."""
        records = list(records)
        step = step or (records[0].attack if records else "?")
        with self._write(f"writing step {step} of run {run_id}") as connection:
            _renew(connection, run_id, f"step {step}")
            try:
                _insert_records(connection, run_id, records)
            except sqlite3.IntegrityError:
                raise BenchError(
                    f"run {run_id}: step {step} already has records for some of these samples and epsilons; "
                    "not written twice (did another process write this run?)"
                ) from None
            connection.executemany("INSERT INTO diagnostics VALUES (?, ?, ?, ?, ?, ?)",
                                   ((run_id,) + tuple(d) for d in diagnostics))
            if seconds is not None:
                _insert_work(connection, run_id, step, seconds)
        _count_commit()

    def add_work(self, run_id: str, step: str, seconds: float) -> None:
        """Record seconds this process spent on a step that writes no records (training)."""
        with self._write(f"writing step {step} of run {run_id}") as connection:
            _renew(connection, run_id, f"step {step}")
            _insert_work(connection, run_id, step, seconds)

    def save_run(self, run: Run, records: Iterable[Record]) -> None:
        """Write a finished run and all its records in one transaction (imports, tests)."""
        with self._write(f"writing run {run.run_id}") as connection:
            _insert_run(connection, dataclasses.replace(run, status=RunStatus.COMPLETE))
            try:
                _insert_records(connection, run.run_id, records)
            except sqlite3.IntegrityError:
                raise BenchError(f"run {run.run_id}: two records share a sample, attack and epsilon") from None
        _count_commit()

    def finish_run(self, run_id: str, info: dict[str, Any], warnings: list[str],
                   status: RunStatus = RunStatus.COMPLETE) -> None:
        """Store the run's summary and status and give up its ownership."""
        with self._write(f"finishing run {run_id}") as connection:
            _renew(connection, run_id, "finishing")
            connection.execute(
                "UPDATE runs SET info = ?, warnings = ?, status = ?, owner_host = NULL, owner_pid = NULL, "
                "lease_until = NULL WHERE run_id = ?",
                (json.dumps(info), json.dumps(warnings), RunStatus(status).value, run_id),
            )

    def release(self, run_id: str) -> None:
        """Hand an unfinished run back (stored steps stay; the next run of its spec resumes it).
        Best effort: a process that cannot write leaves a dead pid or an expiring lease instead."""
        try:
            with closing(self._connect(create=False)) as connection, _writing(connection):
                connection.execute(
                    "UPDATE runs SET status = ?, owner_host = NULL, owner_pid = NULL, lease_until = NULL "
                    "WHERE run_id = ? AND status != ? AND owner_host = ? AND owner_pid = ?",
                    (RunStatus.INTERRUPTED.value, run_id, RunStatus.COMPLETE.value, socket.gethostname(), os.getpid()),
                )
        except (BenchError, sqlite3.Error):
            pass

    def renew(self, run_id: str) -> None:
        with self._write(f"renewing the lease on run {run_id}") as connection:
            _renew(connection, run_id, "renewing its lease")

    def hold(self, run_id: str, every: float = HEARTBEAT_SECONDS) -> "RunLease":
        """This process's hold on a run it owns (``begin_run`` or ``resumable``), until ``stop``."""
        return RunLease(self, run_id, every)

    def resumable(self, spec_hash: str) -> tuple[Run, dict[str, set[int]]] | None:
        """The latest unfinished run of this spec whose owner is gone, claimed for this process
        in the same transaction that checked it, and the sample indices it already stored per step."""
        if not self.path.is_file():
            return None
        with self._write("claiming an unfinished run") as connection:
            rows = connection.execute(
                f"SELECT {', '.join(RUN_FIELDS)}, owner_host, owner_pid, lease_until FROM runs "
                "WHERE spec_hash = ? AND status != ? ORDER BY rowid DESC",
                (spec_hash, RunStatus.COMPLETE.value),
            ).fetchall()
            for row in rows:
                run = self._run(row[: len(RUN_FIELDS)])
                claim_hook(run.run_id)
                if not _owner_alive(*row[len(RUN_FIELDS):]):
                    _set_owner(connection, run.run_id)
                    connection.execute("UPDATE runs SET status = ? WHERE run_id = ?", (RunStatus.RUNNING.value, run.run_id))
                    stored: dict[str, set[int]] = {}
                    for step, index in connection.execute("SELECT attack, sample_index FROM records WHERE run_id = ?",
                                                          (run.run_id,)):
                        stored.setdefault(step, set()).add(int(index))
                    return run, stored
        return None

    def writer(self, spec_hash: str) -> tuple[str, str, int] | None:
        """(run id, host, pid) of another live process writing an unfinished run of this spec."""
        if not self.path.is_file():
            return None
        with closing(self._connect(create=False)) as connection:
            rows = connection.execute(
                "SELECT run_id, owner_host, owner_pid, lease_until FROM runs WHERE spec_hash = ? AND status != ?",
                (spec_hash, RunStatus.COMPLETE.value)).fetchall()
        for run_id, host, pid, lease_until in rows:
            if (host, pid) != (socket.gethostname(), os.getpid()) and _owner_alive(host, pid, lease_until):
                return run_id, host, pid
        return None

    def wait_for_writer(self, spec_hash: str, log: Callable[[str], None], poll: float = 0.5) -> None:
        """Return once no other live process writes an unfinished run of this spec: two identical
        commands on one folder then do the work once (the second resumes or finds it complete)."""
        held = self.writer(spec_hash)
        if held is not None:
            log(f"run {held[0]} of this spec is being written by process {held[2]} on {held[1]}: waiting for it")
        while held is not None:
            time.sleep(poll)
            held = self.writer(spec_hash)

    def complete_run(self, spec_hash: str) -> Run | None:
        """The latest complete run of this spec, if any."""
        if not self.path.is_file():
            return None
        runs = [run for run in self.runs() if run.spec_hash == spec_hash]
        return runs[-1] if runs else None

    def costs(self, run_id: str, training_hash: str) -> dict[str, Any]:
        """Seconds summed over every process that worked on the run (a resumed run's earlier ones
        too): ``train_seconds`` (training, or loading the checkpoint), ``eval_seconds`` (clean and
        attack steps), and ``model_train_seconds``, the training of its model by whichever run did it."""
        return work_costs(self.work(run_id), self.training_seconds(training_hash))

    def diagnostics(self, run_id: str) -> list[tuple]:
        """The diagnostics' counts stored for a run: (step, name, epsilon, count, n) rows."""
        with closing(self._connect(create=False)) as connection:
            rows = connection.execute("SELECT step, name, epsilon, count, n FROM diagnostics WHERE run_id = ? ORDER BY rowid",
                                      (run_id,)).fetchall()
        return [tuple(row) for row in rows]

    def work(self, run_id: str) -> pd.DataFrame:
        """Seconds spent on each step of a run, one row per step and process that did it."""
        with closing(self._connect(create=False)) as connection:
            return pd.read_sql_query("SELECT step, seconds, host, pid FROM work WHERE run_id = ? ORDER BY rowid",
                                     connection, params=(run_id,))

    def training_seconds(self, training_hash: str) -> float | None:
        """Seconds the latest training of this model took (whichever run did it), if known."""
        with closing(self._connect(create=False)) as connection:
            row = connection.execute(
                "SELECT work.seconds FROM work JOIN runs ON runs.run_id = work.run_id "
                "WHERE runs.training_hash = ? AND work.step = 'train' ORDER BY work.rowid DESC LIMIT 1",
                (training_hash,),
            ).fetchone()
        return None if row is None else float(row[0])

    def runs(self, complete_only: bool = True) -> list[Run]:
        """Stored runs in the order they started; unfinished ones only when asked."""
        with closing(self._connect(create=False)) as connection:
            try:
                rows = connection.execute(f"SELECT {', '.join(RUN_FIELDS)} FROM runs ORDER BY rowid").fetchall()
            except sqlite3.Error as error:
                raise self._error(error, "reading its runs") from None
        runs = [self._run(row) for row in rows]
        return [run for run in runs if run.status == RunStatus.COMPLETE or not complete_only]

    def _run(self, row: tuple) -> Run:
        values = dict(zip(RUN_FIELDS, row))
        for name, kind in JSON_COLUMNS.items():
            try:
                values[name] = json.loads(values[name])
            except (TypeError, ValueError, RecursionError) as error:
                raise BenchError(f"results store {self.path}: run {values['run_id']} has malformed JSON in column "
                                 f"{name} ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
            if not isinstance(values[name], kind):
                raise BenchError(f"results store {self.path}: run {values['run_id']} column {name} holds "
                                 f"{type(values[name]).__name__}, expected a JSON {'object' if kind is dict else 'array'}")
        try:
            values["status"] = RunStatus(values["status"])
        except ValueError:
            raise BenchError(f"results store {self.path}: run {values['run_id']} has status {values['status']!r}; "
                             f"expected one of {', '.join(RunStatus)}") from None
        return Run(**values)

    def run_records(self, run_id: str) -> list[Record]:
        """A run's records (``Record``s, built by field name)."""
        frame = self.records([run_id])
        return [Record(**{name: getattr(row, name) for name in Record._fields})._replace(correct=bool(row.correct))
                for row in frame.itertuples(index=False)]

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for queries (the reports' aggregations over the records), closed after; a
        failed query is one BenchError line, as ``records`` gives."""
        with closing(self._connect(create=False)) as connection:
            try:
                yield connection
            except sqlite3.Error as error:
                raise self._error(error, "reading its records") from None

    def records(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        with closing(self._connect(create=False)) as connection:
            query = "SELECT * FROM records"
            args: tuple = ()
            if run_ids is not None:
                query += f" WHERE run_id IN ({','.join('?' * len(run_ids))})"
                args = tuple(run_ids)
            try:
                return pd.read_sql_query(query, connection, params=args)
            except (sqlite3.Error, pd.errors.DatabaseError) as error:
                raise self._error(error.__cause__ or error, "reading its records") from None

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, training_hash: str) -> Path:
        return self.directory / "checkpoints" / f"{training_hash}.pt"

    def load_checkpoint(self, training_hash: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(training_hash)
        if not path.is_file():
            return None
        from bench.checkpoint import load_weights  # torch: imported only where a checkpoint is read

        return load_weights(path, "cpu", "checkpoint", "; delete it to retrain")

    def save_checkpoint(self, training_hash: str, state: dict[str, Any]) -> Path:
        import torch  # here, not at the top: reports open stores and need no torch (a second of imports)

        path = self.checkpoint_path(training_hash)
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with open(descriptor, "wb") as handle:
                # Through a Python file, a refused write surfaces as the OSError that says why
                # (torch's own writer only reports "unexpected pos").
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _count_commit()
        except (OSError, RuntimeError) as error:
            cause = error if isinstance(error, OSError) else error.__context__ or error
            reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise BenchError(f"could not write checkpoint {path}: {reason}; the trained model is not kept{_kept()}") from None
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
        return path


def work_costs(work: pd.DataFrame, model_train_seconds: float | None) -> dict[str, Any]:
    """A run's costs from its work rows (step, seconds, host, pid): ``train_seconds`` (training,
    or loading the checkpoint), ``eval_seconds`` (clean and attack steps), whether it reused a
    checkpoint, how many processes worked on it, and ``model_train_seconds`` as given."""
    model = work.step.isin(MODEL_STEPS)
    return {
        "train_seconds": float(work.seconds[model].sum()),
        "eval_seconds": float(work.seconds[~model].sum()),
        "model_train_seconds": model_train_seconds,
        "reused_checkpoint": not bool((work.step == "train").any()),
        "processes": len(work[["host", "pid"]].drop_duplicates()),
    }


def _tables(connection: sqlite3.Connection) -> set[str]:
    return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@contextmanager
def _writing(connection: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an autocommit connection: ``BEGIN IMMEDIATE`` takes the write
    lock before the first read, so what a transaction checks still holds when it writes."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if connection.in_transaction:  # SQLite ends the transaction itself on some errors (disk full)
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _insert_run(connection: sqlite3.Connection, run: Run) -> None:
    values = dataclasses.asdict(run)
    for name in JSON_COLUMNS:
        values[name] = json.dumps(values[name], sort_keys=name in ("params", "spec"))
    connection.execute(
        f"INSERT INTO runs ({', '.join(RUN_FIELDS)}) VALUES ({','.join('?' * len(RUN_FIELDS))})",
        tuple(values[name] for name in RUN_FIELDS),
    )


def _insert_records(connection: sqlite3.Connection, run_id: str, records: Iterable[Record]) -> None:
    connection.executemany(
        f"INSERT INTO records VALUES ({','.join('?' * len(RECORD_COLUMNS))})",
        ((run_id,) + tuple(r) for r in records),
    )


def _insert_work(connection: sqlite3.Connection, run_id: str, step: str, seconds: float) -> None:
    connection.execute("INSERT INTO work VALUES (?, ?, ?, ?, ?)", (run_id, step, float(seconds), socket.gethostname(), os.getpid()))


def _set_owner(connection: sqlite3.Connection, run_id: str) -> None:
    connection.execute(
        "UPDATE runs SET owner_host = ?, owner_pid = ?, lease_until = ? WHERE run_id = ?",
        (socket.gethostname(), os.getpid(), time.time() + LEASE_SECONDS, run_id),
    )


def _renew(connection: sqlite3.Connection, run_id: str, doing: str) -> None:
    """Extend this process's lease on the run; a run another process has taken over is an error."""
    renewed = connection.execute(
        "UPDATE runs SET lease_until = ? WHERE run_id = ? AND owner_host = ? AND owner_pid = ?",
        (time.time() + LEASE_SECONDS, run_id, socket.gethostname(), os.getpid()),
    ).rowcount
    if not renewed:
        owner = connection.execute("SELECT owner_host, owner_pid FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        held = f"by process {owner[1]} on {owner[0]}" if owner and owner[0] else "by no process"
        raise BenchError(f"run {run_id} is now held {held}, not this one (its lease expired?); {doing} not written")


def _owner_alive(host: str | None, pid: int | None, lease_until: float | None) -> bool:
    """Whether a run's owner may still be writing it: its lease is current and, on this host,
    its process still exists (a crashed run here is resumed at once, without waiting)."""
    if host is None or lease_until is None or lease_until < time.time():
        return False
    if host != socket.gethostname():
        return True
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's process
    except (ProcessLookupError, OverflowError):
        return False
    return True
