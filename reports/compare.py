"""What changed between two runs: setup and every metric, side by side."""
from __future__ import annotations

import json
from typing import Any, Sequence

import pandas as pd

from bench.errors import BenchError
from bench.metrics import PRECISION_THRESHOLDS, TABLE_THRESHOLDS
from bench.reports.display import cell, thresholds_present
from bench.reports.load import Selection, load_results
from bench.reports.render import rows, to_latex
from bench.reports.tables import tables_from
from bench.spec import flatten
from bench.store import Store
from bench.types import CLEAN


def resolve_run(runs: pd.DataFrame, prefix: str) -> pd.Series:
    """The run whose id starts with ``prefix``; a one-line error when none or several do."""
    matches = runs[runs.run_id.str.startswith(prefix)]
    if len(matches) != 1:
        what = "no run" if matches.empty else f"{len(matches)} runs ({', '.join(matches.run_id)})"
        raise BenchError(f"run id {prefix!r} matches {what}; 'bench report --format json' lists run ids")
    return matches.iloc[0]


def compare(
    stores: Store | Sequence[Store],
    run_a: str,
    run_b: str,
    thresholds: Sequence[float] = TABLE_THRESHOLDS,
) -> dict[str, pd.DataFrame]:
    """What changed between two runs: ``setup`` (spec, seed, versions, host, warnings that differ)
    and ``metrics`` (every metric of either run, A and B with intervals, and B - A)."""
    everything = load_results(stores, latest=False)
    a, b = resolve_run(everything.runs, run_a), resolve_run(everything.runs, run_b)
    chosen = everything.runs[everything.runs.run_id.isin([a.run_id, b.run_id])]
    results = Selection(chosen.reset_index(drop=True), everything.records)
    tables = tables_from(results, tuple(sorted(set(thresholds) | set(PRECISION_THRESHOLDS))))
    return {"setup": _setup_diff(a, b), "metrics": _metric_diff(tables, a.run_id, b.run_id, thresholds)}


def _setup_diff(a: pd.Series, b: pd.Series) -> pd.DataFrame:
    fields = {"run_id": (a.run_id, b.run_id), "created": (a.created, b.created), "label": (a.label, b.label)}
    for name in ("dataset", "defense", "seed", "host"):
        fields[name] = (a[name], b[name])
    for source in ("spec", "versions"):
        flat_a, flat_b = flatten(a[source]), flatten(b[source])
        for key in sorted(set(flat_a) | set(flat_b)):
            fields[f"{source}.{key}"] = (flat_a.get(key, "–"), flat_b.get(key, "–"))
    fields["warnings"] = ("; ".join(a.warnings) or "none", "; ".join(b.warnings) or "none")
    rows = [{"field": k, "A": _text(va), "B": _text(vb)} for k, (va, vb) in fields.items()
            if k in ("run_id", "created") or _text(va) != _text(vb)]
    return pd.DataFrame(rows, columns=["field", "A", "B"])


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _metric_diff(tables: dict[str, pd.DataFrame], a: str, b: str, thresholds: Sequence[float]) -> pd.DataFrame:
    long = []
    clean = tables["clean"]
    for _, r in clean.iterrows():
        long.append((r.run_id, "accuracy", CLEAN, "", 0.0, None, r.accuracy, r.ci_low, r.ci_high, r.n))
    for _, r in tables["accuracy_under_attack"].iterrows():
        if r.epsilon > 0:
            long.append((r.run_id, "accuracy", r.attack, r.norm, r.epsilon, None, r.accuracy, r.ci_low, r.ci_high, r.n))
    certified = tables["certified"]
    if not certified.empty:
        shown = thresholds_present(certified, thresholds)
        for _, r in certified[certified.attack.eq(CLEAN) & certified.threshold.isin(shown)].iterrows():
            long.append((r.run_id, "certified accuracy", CLEAN, r.norm, 0.0, r.threshold, r.certified_accuracy,
                         r.certified_accuracy_ci_low, r.certified_accuracy_ci_high, r.n))
        at_t = thresholds_present(certified, PRECISION_THRESHOLDS)
        for _, r in certified[certified.attack.ne(CLEAN) & certified.threshold.isin(at_t)].iterrows():
            long.append((r.run_id, "robust precision", r.attack, r.attack_norm, r.epsilon, r.threshold, r.robust_precision,
                         r.robust_precision_ci_low, r.robust_precision_ci_high, r.robust_n))
            long.append((r.run_id, "robust recall", r.attack, r.attack_norm, r.epsilon, r.threshold, r.robust_recall,
                         r.robust_recall_ci_low, r.robust_recall_ci_high, r.n))
    for _, r in tables["cost"].iterrows():
        for column in [c for c in tables["cost"].columns if c.endswith("_seconds")]:
            if pd.notna(r[column]):
                long.append((r.run_id, column, "", "", None, None, r[column], None, None, None))
    keys = ["metric", "attack", "norm", "epsilon", "threshold"]
    frame = pd.DataFrame(long, columns=["run_id"] + keys + ["value", "low", "high", "n"])
    frame[["epsilon", "threshold"]] = frame[["epsilon", "threshold"]].astype(float).fillna(-1.0)
    side_a = frame[frame.run_id == a].drop(columns="run_id")
    side_b = frame[frame.run_id == b].drop(columns="run_id")
    merged = side_a.merge(side_b, on=keys, how="outer", suffixes=("_a", "_b"), sort=False)
    order = {"accuracy": 0, "certified accuracy": 1, "robust precision": 2, "robust recall": 3}
    merged = merged.assign(_order=merged.metric.map(order).fillna(4), _clean=merged.attack.ne(CLEAN))
    merged = merged.sort_values(["_order", "_clean", "attack", "threshold", "epsilon", "metric"], kind="stable")
    rows = []
    for _, r in merged.iterrows():
        seconds = r.metric.endswith("_seconds")
        rows.append({
            "metric": r.metric, "attack": r.attack, "norm": r.norm,
            "epsilon": "" if r.epsilon < 0 else f"{r.epsilon:g}",
            "T": "" if r.threshold < 0 else f"{r.threshold:g}",
            "A": _side(r.value_a, r.low_a, r.high_a, r.n_a, seconds),
            "B": _side(r.value_b, r.low_b, r.high_b, r.n_b, seconds),
            "change": "–" if pd.isna(r.value_a) or pd.isna(r.value_b) else f"{r.value_b - r.value_a:+.{1 if seconds else 3}f}",
            "value_a": None if pd.isna(r.value_a) else float(r.value_a),
            "value_b": None if pd.isna(r.value_b) else float(r.value_b),
        })
    return pd.DataFrame(rows, columns=["metric", "attack", "norm", "epsilon", "T", "A", "B", "change", "value_a", "value_b"])


def _side(value: Any, low: Any, high: Any, n: Any, seconds: bool) -> str:
    if pd.isna(value):
        return "–"
    if seconds:
        return f"{value:.1f} s"
    return f"{cell(value, low, high)} n={int(n)}"


def render_comparison(comparison: dict[str, pd.DataFrame], fmt: str) -> str:
    """Markdown (default), LaTeX, CSV (the metrics table) or JSON of :func:`compare`."""
    if fmt == "json":
        return json.dumps({name: rows(table) for name, table in comparison.items()}, indent=2)
    shown = {"Setup (fields that differ)": comparison["setup"],
             "Metrics (B - A)": comparison["metrics"].drop(columns=["value_a", "value_b"])}
    if fmt == "csv":  # one tidy table: the metrics (the setup is in every other format)
        return comparison["metrics"].to_csv(index=False)
    if fmt == "latex":
        return "\n".join(to_latex(table, title) for title, table in shown.items())
    return "\n".join(f"## {title}\n\n{table.to_markdown(index=False)}\n" for title, table in shown.items())
