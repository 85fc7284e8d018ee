"""Tables from the results store, in Markdown, CSV or the JSON contract for scripts.

JSON contract (``bench report --format json``): one object with lists
``clean`` ({dataset, defense, label, params, accuracy, n}),
``accuracy_under_attack`` ({dataset, defense, label, params, attack, norm, epsilon, accuracy, n};
epsilon 0 is clean; ``attack = "worst-case"`` is the per-sample worst case over the attacks of
that norm) and ``certified`` ({dataset, defense, label, params, attack, epsilon, norm, threshold,
certified_accuracy, robust_precision, robust_recall, n}; ``attack = "clean"`` rows give the
certified accuracy at threshold T). Every row also carries its ``run_id``.
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bench import metrics
from bench.store import Store


def latest_runs(store: Store) -> pd.DataFrame:
    """One row per distinct spec: a re-run of the same spec replaces the earlier one in tables."""
    runs = pd.DataFrame([vars(run) for run in store.runs()])
    if runs.empty:
        return runs
    return runs.drop_duplicates("spec_hash", keep="last").reset_index(drop=True)


def build_tables(store: Store, thresholds: tuple[float, ...] = metrics.DEFAULT_THRESHOLDS) -> dict[str, pd.DataFrame]:
    runs = latest_runs(store)
    if runs.empty:
        empty = pd.DataFrame()
        return {"clean": empty, "accuracy_under_attack": empty, "certified": empty}
    records = store.records(list(runs.run_id)).rename(columns={"label": "true_label"})
    runs = runs.assign(params=runs.params.map(lambda p: json.dumps(p, sort_keys=True)))
    records = records.merge(runs[["run_id", "dataset", "defense", "label", "params"]], on="run_id")
    tables = {
        "clean": metrics.clean_accuracy(records),
        "accuracy_under_attack": metrics.accuracy_under_attack(records),
        "certified": metrics.certified(records, thresholds),
    }
    return {name: table.assign(params=table.params.map(json.loads)) if "params" in table else table
            for name, table in tables.items()}


def _rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records")) if not table.empty else []


def render(tables: dict[str, pd.DataFrame], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({name: _rows(table) for name, table in tables.items()}, indent=2)
    parts = []
    for name, table in tables.items():
        if table.empty:
            continue
        shown = table.drop(columns=["run_id", "params"], errors="ignore")
        if fmt == "csv":
            parts.append(f"# {name}\n" + shown.to_csv(index=False))
        else:
            parts.append(f"## {name}\n\n" + shown.to_markdown(index=False, floatfmt=".4g") + "\n")
    return "\n".join(parts) if parts else "no runs in this store yet\n"
