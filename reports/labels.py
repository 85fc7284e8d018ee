"""Names shown in tables and plots: configuration labels, their order, norm names."""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bench.spec import flatten
from bench.types import Norm

NORM_NAMES = {norm: norm.symbol for norm in Norm}
# Appended to the label of a run whose diagnostics fired (bench.diagnostics): it then shows in
# every table and plot legend; the HTML report and the plots draw it in red.
FLAG = "⚠ FLAGGED"


def flagged(info: Any) -> bool:
    """Whether a run's stored diagnostics (``info["diagnostics"]``) include one that fired."""
    return isinstance(info, dict) and any(isinstance(d, dict) and d.get("fired") for d in info.get("diagnostics") or [])


def verdict(info: Any) -> str:
    """``flagged``, ``clean`` (every diagnostic ran, none fired) or ``unchecked``."""
    if flagged(info):
        return "flagged"
    return "clean" if isinstance(info, dict) and info.get("diagnostics_complete") else "unchecked"

# Spec fields that make two runs of one label different configurations; runs that differ only in
# their attacks (e.g. one run per norm, the second reusing the first one's checkpoint) share one.
CONFIGURATION_FIELDS = ("model", "params", "epochs", "batch_size", "lr", "seed", "train_size", "test_size", "image_size")


def configuration_labels(runs: pd.DataFrame) -> pd.Series:
    """The run label, with the spec fields that tell runs apart where a dataset has a label twice."""
    labels = runs.label.copy()
    for _, group in runs.groupby(["dataset", "label"], sort=False):
        if len(group) < 2:
            continue
        specs = [flatten(_configuration(spec, defense)) for spec, defense in zip(group.spec, group.defense)]
        if all(spec == specs[0] for spec in specs):
            continue
        keys = sorted(set().union(*specs))
        differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in specs}) > 1]
        for index, spec in zip(group.index, specs):
            parts = [f"{k}={_short(spec.get(k))}" for k in differing[:3]]
            labels[index] = f"{group.label.iloc[0]} [{', '.join(parts)}]"
    if "info" in runs:
        marked = runs["info"].map(flagged).astype(bool)
        labels[marked] = labels[marked] + f" {FLAG}"
    return labels


def _configuration(spec: dict[str, Any], defense: str) -> dict[str, Any]:
    """The spec fields that define a configuration; parameters scoped to other defenses dropped."""
    chosen = {k: v for k, v in spec.items() if k in CONFIGURATION_FIELDS}
    params = chosen.get("params") or {}
    chosen["params"] = {k: v for k, v in params.items() if "." not in k or k.startswith(defense + ".")}
    return chosen


def _short(value: Any) -> str:
    if value is None:
        return "default"
    return value if isinstance(value, str) else json.dumps(value)


def config_order(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Configurations in the order their first run started (e.g. the order of a config's [[runs]])."""
    for name in ("cost", "clean"):
        table = tables.get(name, pd.DataFrame())
        if not table.empty and "config" in table:
            order = list(dict.fromkeys(table.config))
            break
    else:
        order = []
    others = {c for table in tables.values() if not table.empty and "config" in table for c in table.config}
    return order + sorted(others - set(order))


def ranked(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    return table.assign(_rank=table.config.map({c: i for i, c in enumerate(order)}))
