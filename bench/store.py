"""The results store: one SQLite database of runs and per-sample records, plus checkpoints.

A run is registered as ``running`` when it starts; each evaluation step (clean, then one per
attack) commits its records in one transaction, and the run turns ``complete`` at the end. A
crash or ``kill -9`` therefore leaves whole steps only, tables read complete runs only, and the
next run of the same spec resumes from the stored steps. WAL journaling keeps earlier runs
readable throughout. Checkpoints are
written to a temporary file and renamed into place, so a half-written one never exists.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch

from bench.errors import BenchError
from bench.types import RECORD_COLUMNS, Record

SCHEMA = """
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


# Evaluation steps and checkpoints this process has committed: after a failure the CLI says
# whether completed steps are stored (and the same command resumes) or nothing was.
_committed = 0


def committed_steps() -> int:
    """How many evaluation steps (record batches) and checkpoints this process has committed."""
    return _committed


def _count_commit() -> None:
    global _committed
    _committed += 1


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
    status: str = "running"


class Store:
    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.path = self.directory / "results.sqlite"

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise BenchError(f"no results store at {self.path}; run 'bench run --out {self.directory}' first")
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(self.path, timeout=30)
            connection.execute("PRAGMA journal_mode=WAL")
            if create:
                connection.executescript(SCHEMA)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(runs)")}
            if columns and "status" not in columns:
                # Stores written before runs had a status held complete runs only.
                with connection:
                    connection.execute("ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'complete'")
            _add_certified_column(connection)
        except sqlite3.DatabaseError as error:
            raise BenchError(f"results store {self.path} is not readable: {error}") from None
        return connection

    def begin_run(self, run: Run) -> None:
        with closing(self._connect(create=True)) as connection, connection:
            _insert_run(connection, run)

    def add_records(self, run_id: str, records: Iterable[Record]) -> None:
        """Append one evaluation step's records atomically."""
        with closing(self._connect(create=True)) as connection, connection:
            _insert_records(connection, run_id, records)
        _count_commit()

    def save_run(self, run: Run, records: Iterable[Record]) -> None:
        """Write a finished run and all its records in one transaction (imports, tests)."""
        with closing(self._connect(create=True)) as connection, connection:
            _insert_run(connection, dataclasses.replace(run, status="complete"))
            _insert_records(connection, run.run_id, records)
        _count_commit()

    def finish_run(self, run_id: str, info: dict[str, Any], warnings: list[str], status: str = "complete") -> None:
        with closing(self._connect(create=True)) as connection, connection:
            connection.execute(
                "UPDATE runs SET info = ?, warnings = ?, status = ? WHERE run_id = ?",
                (json.dumps(info), json.dumps(warnings), status, run_id),
            )

    def resumable(self, spec_hash: str) -> tuple[Run, set[str]] | None:
        """The latest unfinished run of this spec that no live process is working on, claimed for
        this process, and the evaluation steps it already stored."""
        if not self.path.is_file():
            return None
        unfinished = [
            r for r in self.runs(complete_only=False)
            if r.spec_hash == spec_hash and r.status != "complete" and not _owner_alive(r.info)
        ]
        if not unfinished:
            return None
        run = unfinished[-1]
        with closing(self._connect(create=False)) as connection, connection:
            connection.execute("UPDATE runs SET info = ? WHERE run_id = ?", (json.dumps(owner_info()), run.run_id))
            steps = {row[0] for row in connection.execute("SELECT DISTINCT attack FROM records WHERE run_id = ?", (run.run_id,))}
        return run, steps

    def runs(self, complete_only: bool = True) -> list[Run]:
        """Stored runs in the order they started; unfinished ones only when asked."""
        with closing(self._connect(create=False)) as connection:
            try:
                rows = connection.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
            except sqlite3.DatabaseError as error:
                raise BenchError(f"results store {self.path} is not readable: {error}") from None
        runs = []
        for row in rows:
            values = list(row)
            for i in (5, 6, 10, 12, 13):
                values[i] = json.loads(values[i])
            runs.append(Run(*values))
        return [run for run in runs if run.status == "complete" or not complete_only]

    def records(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        with closing(self._connect(create=False)) as connection:
            query = "SELECT * FROM records"
            args: tuple = ()
            if run_ids is not None:
                query += f" WHERE run_id IN ({','.join('?' * len(run_ids))})"
                args = tuple(run_ids)
            return pd.read_sql_query(query, connection, params=args)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, training_hash: str) -> Path:
        return self.directory / "checkpoints" / f"{training_hash}.pt"

    def load_checkpoint(self, training_hash: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(training_hash)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise BenchError(f"checkpoint {path} is not loadable ({error}); delete it to retrain") from None

    def save_checkpoint(self, training_hash: str, state: dict[str, Any]) -> Path:
        path = self.checkpoint_path(training_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(state, temporary)
            os.replace(temporary, path)
            _count_commit()
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return path


def _insert_run(connection: sqlite3.Connection, run: Run) -> None:
    connection.execute(
        "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            run.run_id, run.created, run.dataset, run.defense, run.label,
            json.dumps(run.params, sort_keys=True), json.dumps(run.spec, sort_keys=True),
            run.spec_hash, run.training_hash, run.seed, json.dumps(run.versions),
            run.host, json.dumps(run.info), json.dumps(run.warnings), run.status,
        ),
    )


def _insert_records(connection: sqlite3.Connection, run_id: str, records: Iterable[Record]) -> None:
    connection.executemany(
        f"INSERT INTO records VALUES ({','.join('?' * len(RECORD_COLUMNS))})",
        ((run_id,) + tuple(r) for r in records),
    )


def _add_certified_column(connection: sqlite3.Connection) -> None:
    """Stores written before records had ``certified``: derive it by the one convention of
    ``bench.types.Certificate`` (abstention, a failed test and radius 0 are not certified)."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(records)")}
    if columns and "certified" not in columns:
        with connection:
            connection.execute("ALTER TABLE records ADD COLUMN certified INTEGER")
            connection.execute(
                "UPDATE records SET certified = (certified_label != -1 AND certified_radius > 0) "
                "WHERE certified_radius IS NOT NULL"
            )


def owner_info() -> dict[str, Any]:
    """Who is writing a run: an unfinished run whose owner still lives is not resumed by another."""
    return {"owner": {"host": socket.gethostname(), "pid": os.getpid()}}


def _owner_alive(info: dict[str, Any]) -> bool:
    owner = info.get("owner")
    if not owner or owner.get("host") != socket.gethostname():
        return False  # another host's liveness cannot be checked; its run is resumable
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
