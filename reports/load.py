"""Loading runs and records from one or several results stores, and selecting runs (``--where``,
parsed by :func:`bench.spec.parse_assignments`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.metrics import Records
from bench.reports.labels import configuration_labels
from bench.store import RUN_FIELDS, Store



@dataclass
class Selection:
    """The selected runs (one row each, ``params``/``spec``/... as Python objects, plus
    ``config`` and ``store``) and where their per-sample records are (``bench.metrics.Records``:
    the tables aggregate them there; ``with_run_keys(records.frame(), runs)`` loads them all)."""

    runs: pd.DataFrame
    records: Records


def run_keys(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run the keys that tables and records carry: ``run_id``, ``dataset``, ``defense``,
    ``label`` and ``params`` (JSON text, keys sorted)."""
    return runs[["run_id", "dataset", "defense", "label"]].assign(
        params=runs.params.map(lambda p: json.dumps(p, sort_keys=True)))


def with_run_keys(records: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Records as one frame with their run's keys (``run_keys``); ``true_label`` is the class."""
    return records.rename(columns={"label": "true_label"}).merge(run_keys(runs), on="run_id")


def _same(stored: Any, wanted: str) -> bool:
    if isinstance(stored, (dict, list)):
        return json.dumps(stored, sort_keys=True) == wanted
    if str(stored) == wanted:
        return True
    try:
        return math.isclose(float(stored), float(wanted))
    except (TypeError, ValueError):
        return False


def _lookup(run: pd.Series, key: str) -> tuple[bool, Any]:
    """A run's value for a ``--where`` key: a run column, a spec field or a defense parameter."""
    if key in run.index and key not in ("params", "spec", "info", "versions", "warnings"):
        return True, run[key]
    for source in (run["spec"], run["params"]):
        if key in source:
            return True, source[key]
    return False, None


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return f"{value:g}" if isinstance(value, float) else str(value)


def select_runs(runs: pd.DataFrame, where: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Runs matching every key; a key given several times matches any of its values.

    Keys: run columns (``dataset``, ``defense``, ``label``, ``run_id``, ``seed``, ``host``), spec
    fields (``epochs``, ``model``, ``test_size``, ...) and defense parameters (``L``, ...).
    """
    if runs.empty:
        return runs
    wanted: dict[str, list[str]] = {}
    for key, value in where:
        wanted.setdefault(key, []).append(value)
    keep = np.ones(len(runs), dtype=bool)
    chosen: list[str] = []
    for key, values in wanted.items():
        found = [_lookup(run, key) for _, run in runs.iterrows()]
        if not any(present for present, _ in found):
            raise BenchError(f"--where {key}: no run has a field {key!r}; try dataset, defense, label, run_id, "
                             "seed, a spec field (epochs, model, ...) or a defense parameter")
        matches = np.array([present and any(_same(value, v) for v in values) for present, value in found], dtype=bool)
        if keep.any() and not (keep & matches).any():
            there = sorted({_shown(value) for (present, value), kept in zip(found, keep) if present and kept})
            among = f"the runs with {', '.join(chosen)}" if chosen else "the stores"
            asked = " or ".join(f"{key}={v}" for v in values)
            raise BenchError(f"--where {asked} matches no run; {among} have {key}: "
                             f"{', '.join(there[:12]) + (', ...' if len(there) > 12 else '') or 'no value'}")
        keep &= matches
        chosen.append(" or ".join(f"{key}={v}" for v in values))
    return runs[keep]


def _as_stores(stores: Store | Sequence[Store]) -> list[Store]:
    return [stores] if isinstance(stores, Store) else list(stores)


def load_results(stores: Store | Sequence[Store], where: Sequence[tuple[str, str]] = (), latest: bool = True) -> Selection:
    """Runs and records of one or several stores, filtered by ``where``.

    With ``latest``, a re-run of the same spec replaces the earlier one (across stores too).
    """
    frames = []
    for store in _as_stores(stores):
        runs = pd.DataFrame([vars(run) for run in store.runs()], columns=RUN_FIELDS)
        frames.append(runs.assign(store=str(store.directory)))
    runs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_FIELDS + ["store"])
    runs = runs.sort_values(["created"], kind="stable")
    runs["model_train_seconds"] = _training_seconds(runs)
    if latest:
        runs = runs.drop_duplicates("spec_hash", keep="last")
    runs = select_runs(runs, where).reset_index(drop=True)
    runs["config"] = configuration_labels(runs)
    parts = []
    for store in _as_stores(stores):
        ids = tuple(runs.run_id[runs.store == str(store.directory)])
        if ids:
            parts.append((store.reading, ids))
    return Selection(runs, Records(tuple(parts)))


def result_stores(directories: Sequence[Path | str] | Path | str | None) -> list[Store]:
    """The stores of results folders: a folder with ``results.sqlite``, or else every immediate
    subfolder that has one (e.g. ``runs/`` holding ``runs/mnist-pixeldp/results.sqlite``)."""
    if isinstance(directories, (str, Path)):
        directories = [directories]
    stores = []
    for directory in directories or [Path("results")]:
        directory = Path(directory)
        nested = sorted(p.parent for p in directory.glob("*/results.sqlite")) if directory.is_dir() else []
        if (directory / "results.sqlite").is_file() or not nested:
            stores.append(Store(directory))
        else:
            stores.extend(Store(p) for p in nested)
    return stores


def _training_seconds(runs: pd.DataFrame) -> pd.Series:
    """Seconds the run's model took to train: its own training, or for a run that reused a
    checkpoint the training of the (possibly superseded) run with the same training hash."""
    trained = {}
    for _, run in runs.iterrows():
        if run["info"].get("reused_checkpoint") is False and "train_seconds" in run["info"]:
            trained.setdefault(run.training_hash, float(run["info"]["train_seconds"]))

    def seconds(run: pd.Series) -> float | None:
        own = run["info"].get("model_train_seconds")  # stored by the runner, from every run's work in its store
        return own if own is not None else trained.get(run.training_hash)

    return runs.apply(seconds, axis=1) if not runs.empty else pd.Series(dtype=float)


def latest_runs(store: Store) -> pd.DataFrame:
    """One row per distinct spec: a re-run of the same spec replaces the earlier one in tables."""
    return load_results(store).runs

