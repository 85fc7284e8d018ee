"""Tables from the results store, in Markdown, LaTeX, CSV or the JSON contract for scripts.

JSON contract (``bench report --format json``): one object with lists
``clean`` ({dataset, defense, label, params, accuracy, n}),
``accuracy_under_attack`` ({dataset, defense, label, params, attack, norm, epsilon, accuracy, n};
epsilon 0 is clean; ``attack = "worst-case"`` is the per-sample worst case over the attacks of
that norm) and ``certified`` ({dataset, defense, label, params, attack, epsilon, norm, threshold,
certified_accuracy, robust_precision, robust_recall, n}; ``attack = "clean"`` rows give the
certified accuracy at threshold T). Every row also carries its ``run_id``.

Added fields (compatible extensions):

- every row carries ``config``: the configuration label shown in tables and plots (``label``,
  with the differing spec fields appended when two runs of one dataset share a label);
- ``clean`` and ``accuracy_under_attack`` rows carry ``ci_low``, ``ci_high``: the 95%
  Clopper-Pearson (exact binomial) interval of ``accuracy`` over ``n`` samples;
- ``certified`` rows carry ``attack_norm`` (the norm of the attack; ``norm`` is the certificate's),
  ``certified_accuracy_ci_low/high`` and ``robust_recall_ci_low/high`` (over ``n``), ``robust_n`` (the inputs certified at T: the denominator of robust precision)
  and ``robust_precision_ci_low/high`` (over ``robust_n``);
- a ``cost`` list, one row per run: {run_id, dataset, defense, label, params, config, every
  ``*_seconds`` entry of the run's info (``train_seconds``, ``eval_seconds``, ...), num_train,
  num_test, eval_ms_per_image, reused_checkpoint, device, model_train_seconds}. ``train_seconds``
  of a run that reused a checkpoint is the loading time; ``model_train_seconds`` is the training
  time of its model, from the run that trained it (null when that run is not in the stores).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.stats import beta

from bench import metrics
from bench.errors import BenchError
from bench.spec import flatten
from bench.store import Run, Store

CONFIDENCE = 0.95
# Columns of the human-readable tables; the JSON and CSV keep every threshold.
TABLE_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
# Thresholds of the robust precision/recall tables and plots (the paper's Fig. 5).
PRECISION_THRESHOLDS = (0.05, 0.1)
NORM_NAMES = {"l2": "L2", "linf": "L∞", "l1": "L1"}
TABLE_NAMES = ("clean", "accuracy_under_attack", "certified", "cost")
RUN_COLUMNS = [f.name for f in dataclasses.fields(Run)]


# -- confidence intervals ------------------------------------------------------------------
def clopper_pearson(successes: Any, trials: Any, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) binomial confidence interval, elementwise; NaN where trials is 0.

    Conservative: the interval covers the true proportion with at least ``confidence``
    probability, also for the proportions near 0 and 1 that robustness results often have.
    """
    k = np.atleast_1d(np.asarray(successes, dtype=float))
    n = np.atleast_1d(np.asarray(trials, dtype=float))
    alpha = 1.0 - confidence
    valid = n > 0
    safe_k = np.where(k > 0, k, 1.0)
    safe_rest = np.where(n - k > 0, n - k, 1.0)
    low = np.where(k > 0, beta.ppf(alpha / 2, safe_k, n - k + 1), 0.0)
    high = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, safe_rest), 1.0)
    return np.where(valid, low, np.nan), np.where(valid, high, np.nan)


def _with_interval(table: pd.DataFrame, value: str, trials: str, prefix: str) -> pd.DataFrame:
    if table.empty:
        return table.assign(**{f"{prefix}ci_low": [], f"{prefix}ci_high": []})
    n = table[trials].fillna(0).to_numpy(dtype=float)
    k = np.round(table[value].fillna(0).to_numpy(dtype=float) * n)
    low, high = clopper_pearson(k, n)
    return table.assign(**{f"{prefix}ci_low": low, f"{prefix}ci_high": high})


# -- loading ----------------------------------------------------------------------------------
@dataclass
class Results:
    """The selected runs (one row each, ``params``/``spec``/... as Python objects, plus
    ``config`` and ``store``) and their per-sample records (``true_label`` is the class;
    ``dataset``, ``defense``, ``label``, ``params`` (JSON text) come from the run)."""

    runs: pd.DataFrame
    records: pd.DataFrame


def parse_where(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["dataset=svhn", "L=0.1"]`` -> pairs; a one-line error for anything else."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--where {item!r} is malformed; expected KEY=VALUE, e.g. --where dataset=svhn")
        pairs.append((key.strip(), value.strip()))
    return pairs


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
    for key, values in wanted.items():
        found = [_lookup(run, key) for _, run in runs.iterrows()]
        if not any(present for present, _ in found):
            raise BenchError(f"--where {key}: no run has a field {key!r}; try dataset, defense, label, run_id, "
                             "seed, a spec field (epochs, model, ...) or a defense parameter")
        keep &= np.array([present and any(_same(value, v) for v in values) for present, value in found], dtype=bool)
    return runs[keep]


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


def _as_stores(stores: Store | Sequence[Store]) -> list[Store]:
    return [stores] if isinstance(stores, Store) else list(stores)


def load_results(stores: Store | Sequence[Store], where: Sequence[tuple[str, str]] = (), latest: bool = True) -> Results:
    """Runs and records of one or several stores, filtered by ``where``.

    With ``latest``, a re-run of the same spec replaces the earlier one (across stores too).
    """
    frames = []
    for store in _as_stores(stores):
        runs = pd.DataFrame([vars(run) for run in store.runs()], columns=RUN_COLUMNS)
        frames.append(runs.assign(store=str(store.directory)))
    runs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS + ["store"])
    runs = runs.sort_values(["created"], kind="stable")
    runs["model_train_seconds"] = _training_seconds(runs)
    if latest:
        runs = runs.drop_duplicates("spec_hash", keep="last")
    runs = select_runs(runs, where).reset_index(drop=True)
    runs["config"] = configuration_labels(runs)
    parts = []
    for store in _as_stores(stores):
        ids = list(runs.run_id[runs.store == str(store.directory)])
        if ids:
            parts.append(store.records(ids))
    records = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run_id", "label"])
    records = records.rename(columns={"label": "true_label"})
    keys = runs[["run_id", "dataset", "defense", "label"]].assign(
        params=runs.params.map(lambda p: json.dumps(p, sort_keys=True)))
    return Results(runs, records.merge(keys, on="run_id"))


def _training_seconds(runs: pd.DataFrame) -> pd.Series:
    """Seconds the run's model took to train: its own training, or for a run that reused a
    checkpoint the training of the (possibly superseded) run with the same training hash."""
    trained = {}
    for _, run in runs.iterrows():
        if run["info"].get("reused_checkpoint") is False and "train_seconds" in run["info"]:
            trained.setdefault(run.training_hash, float(run["info"]["train_seconds"]))
    return runs.apply(lambda run: trained.get(run.training_hash), axis=1) if not runs.empty else pd.Series(dtype=float)


def latest_runs(store: Store) -> pd.DataFrame:
    """One row per distinct spec: a re-run of the same spec replaces the earlier one in tables."""
    return load_results(store).runs


# -- tables -----------------------------------------------------------------------------------
def tables_from(results: Results, thresholds: Sequence[float] = metrics.DEFAULT_THRESHOLDS) -> dict[str, pd.DataFrame]:
    """The tables of the JSON contract (plus ``cost``) for the given runs and records."""
    if results.runs.empty:
        return {name: pd.DataFrame() for name in TABLE_NAMES}
    records = results.records
    clean = _with_interval(metrics.clean_accuracy(records), "accuracy", "n", "")
    under_attack = _with_interval(metrics.accuracy_under_attack(records), "accuracy", "n", "")
    certified = metrics.certified(records, tuple(thresholds))
    certified = _with_interval(certified, "certified_accuracy", "n", "certified_accuracy_")
    certified = _with_interval(certified, "robust_recall", "n", "robust_recall_")
    certified["robust_n"] = np.round(certified.robust_recall.astype(float) * certified.n).astype(int)
    precision = certified.robust_precision.astype(float).fillna(0)
    certified = _with_interval(certified.assign(_precision=precision), "_precision", "robust_n", "robust_precision_")
    certified = certified.drop(columns="_precision")
    attack_norms = records[["run_id", "attack", "norm"]].drop_duplicates(["run_id", "attack"])
    certified = certified.merge(attack_norms.rename(columns={"norm": "attack_norm"}), on=["run_id", "attack"], how="left")
    tables = {"clean": clean, "accuracy_under_attack": under_attack, "certified": certified,
              "cost": cost_table(results.runs)}
    config = results.runs.set_index("run_id").config
    tables = {name: table.assign(config=table.run_id.map(config)) if not table.empty else table
              for name, table in tables.items()}
    return {name: table.assign(params=table.params.map(_params)) if "params" in table else table
            for name, table in tables.items()}


def _params(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def cost_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Training and evaluation cost per run, from the timings the runner stores in ``info``."""
    rows = []
    for _, run in runs.iterrows():
        info = run["info"]
        row = {key: run[key] for key in ("run_id", "dataset", "defense", "label", "params")}
        row.update({k: float(v) for k, v in info.items() if k.endswith("_seconds") and isinstance(v, (int, float))})
        row["model_train_seconds"] = run.get("model_train_seconds")
        row["num_train"] = info.get("num_train")
        row["num_test"] = info.get("num_test")
        eval_seconds, num_test = info.get("eval_seconds"), info.get("num_test")
        row["eval_ms_per_image"] = 1000 * eval_seconds / num_test if eval_seconds is not None and num_test else None
        row["reused_checkpoint"] = info.get("reused_checkpoint")
        row["device"] = info.get("device")
        rows.append(row)
    return pd.DataFrame(rows)


def build_tables(
    store: Store | Sequence[Store],
    thresholds: Sequence[float] = metrics.DEFAULT_THRESHOLDS,
    where: Sequence[tuple[str, str]] = (),
) -> dict[str, pd.DataFrame]:
    """Every table, from the latest run of each spec in one or several stores."""
    return tables_from(load_results(store, where), thresholds)


# -- human-readable tables --------------------------------------------------------------------
def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(value: Any, low: Any, high: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _order(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    worst_last = table.attack.eq("worst-case") if "attack" in table else False
    return table.assign(_worst=worst_last).sort_values(keys[:-1] + ["_worst", keys[-1]], kind="stable")


def _pivot(table: pd.DataFrame, rows: list[str], column: str, cell: pd.Series, n: pd.Series, heading: str) -> pd.DataFrame:
    """Rows as given, one column per value of ``column`` (``heading`` + value), then ``n``."""
    frame = table[rows].assign(_column=table[column], _cell=cell.to_numpy(), _n=n.to_numpy())
    frame = frame.assign(_row=frame[rows].astype(str).agg("\x1f".join, axis=1))
    order = list(dict.fromkeys(frame._row))
    wide = frame.pivot_table(index="_row", columns="_column", values="_cell", aggfunc="first").reindex(order)
    counts = frame.groupby("_row", sort=False)._n.agg(lambda s: "/".join(str(v) for v in sorted(set(s)))).reindex(order)
    keys = frame.drop_duplicates("_row").set_index("_row")[rows].reindex(order)
    wide = wide[sorted(wide.columns)].fillna("–")
    wide.columns = [f"{heading}{c:g}" for c in wide.columns]
    return pd.concat([keys, wide, counts.rename("n")], axis=1).reset_index(drop=True)


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


def _ranked(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    return table.assign(_rank=table.config.map({c: i for i, c in enumerate(order)}))


def display_tables(
    tables: dict[str, pd.DataFrame],
    thresholds: Sequence[float] | None = None,
    precision_thresholds: Sequence[float] | None = None,
) -> dict[str, pd.DataFrame]:
    """Tables for people: values with their 95% Clopper-Pearson interval and sample count ``n``.

    Accuracy under attack has one column per epsilon (0 = clean) and the worst case over the
    attacks of a norm as its own row; certified accuracy one column per threshold T; robust
    precision (its ``n=`` is the number of certified inputs) and recall one column per epsilon.
    """
    shown: dict[str, pd.DataFrame] = {}
    order = config_order(tables)
    tables = {name: _ranked(table, order) if not table.empty and "config" in table else table
              for name, table in tables.items()}
    clean = tables.get("clean", pd.DataFrame())
    if not clean.empty:
        clean = clean.sort_values(["dataset", "_rank"], kind="stable")
        shown["Clean accuracy"] = pd.DataFrame({
            "dataset": clean.dataset, "configuration": clean.config,
            "accuracy [95% CI]": [_cell(*v) for v in zip(clean.accuracy, clean.ci_low, clean.ci_high)],
            "n": clean.n,
        }).drop_duplicates().reset_index(drop=True)  # one model evaluated by several runs
    attack = tables.get("accuracy_under_attack", pd.DataFrame())
    if not attack.empty:
        attack = _order(attack, ["dataset", "norm", "_rank", "attack"]).rename(columns={"config": "configuration"})
        for (dataset, norm), group in attack.groupby(["dataset", "norm"], sort=False):
            cells = pd.Series([_cell(*v) for v in zip(group.accuracy, group.ci_low, group.ci_high)])
            shown[f"Accuracy under attack: {dataset}, {NORM_NAMES.get(norm, norm)}"] = _pivot(
                group, ["configuration", "attack"], "epsilon", cells, group.n, "ε=")
    certified = tables.get("certified", pd.DataFrame())
    if not certified.empty:
        clean_rows = certified[certified.attack == "clean"]
        chosen = _thresholds(clean_rows, thresholds if thresholds is not None else TABLE_THRESHOLDS)
        clean_rows = clean_rows[clean_rows.threshold.isin(chosen)].sort_values(["dataset", "norm", "_rank"], kind="stable")
        if not clean_rows.empty:
            cells = pd.Series([_cell(*v) for v in zip(clean_rows.certified_accuracy, clean_rows.certified_accuracy_ci_low,
                                                        clean_rows.certified_accuracy_ci_high)])
            shown["Certified accuracy"] = _pivot(
                clean_rows.rename(columns={"config": "configuration"}), ["dataset", "norm", "configuration"],
                "threshold", cells, clean_rows.n, "T=")
        shown.update(_precision_recall(certified, precision_thresholds))
    cost = tables.get("cost", pd.DataFrame())
    if not cost.empty:
        cost = cost.sort_values(["dataset", "_rank"], kind="stable")
        frame = pd.DataFrame({"dataset": cost.dataset, "configuration": cost.config})
        for column in [c for c in cost.columns if c.endswith("_seconds") and c != "model_train_seconds"]:
            frame[column.removesuffix("_seconds").replace("_", " ") + " (s)"] = cost[column].map(lambda v: _number(v, 1))
        frame["model training (s)"] = cost.model_train_seconds.map(lambda v: _number(v, 1))
        frame["eval (ms/image)"] = cost.eval_ms_per_image.map(lambda v: _number(v, 2))
        frame["train images"] = cost.num_train
        frame["test images"] = cost.num_test
        frame["checkpoint reused"] = cost.reused_checkpoint.map({True: "yes", False: "no"}).fillna("–")
        shown["Cost"] = frame.reset_index(drop=True)
    return shown


def _thresholds(rows: pd.DataFrame, wanted: Sequence[float]) -> list[float]:
    present = sorted(set(rows.threshold))
    return [t for t in present if any(math.isclose(t, w, abs_tol=1e-9) for w in wanted)]


def _precision_recall(certified: pd.DataFrame, thresholds: Sequence[float] | None) -> dict[str, pd.DataFrame]:
    """Robust precision and recall at T: one row per (dataset, attack, configuration, T), one column per epsilon."""
    attacked = certified[certified.attack != "clean"]
    if attacked.empty:
        return {}
    chosen = _thresholds(certified, thresholds if thresholds is not None else PRECISION_THRESHOLDS)
    clean = certified[certified.attack == "clean"]
    pairs = attacked[["run_id", "attack", "attack_norm"]].drop_duplicates()
    # epsilon 0 of every attack is the clean input, as in accuracy under attack
    zero = clean.drop(columns=["attack", "attack_norm"]).merge(pairs, on="run_id")
    rows = pd.concat([zero, attacked], ignore_index=True)
    rows = rows[rows.threshold.isin(chosen)].sort_values(["dataset", "attack", "_rank", "threshold", "epsilon"], kind="stable")
    if rows.empty:
        return {}
    rows = rows.rename(columns={"config": "configuration", "threshold": "T"}).reset_index(drop=True)
    keys = ["attack", "configuration", "T"]
    shown = {}
    for (dataset, norm), group in rows.groupby(["dataset", "attack_norm"], sort=False):
        precision = pd.Series([
            "–" if pd.isna(p) else f"{_cell(p, lo, hi)} n={m}"
            for p, lo, hi, m in zip(group.robust_precision, group.robust_precision_ci_low,
                                    group.robust_precision_ci_high, group.robust_n)
        ])
        recall = pd.Series([_cell(*v) for v in zip(group.robust_recall, group.robust_recall_ci_low,
                                                    group.robust_recall_ci_high)])
        where = f"{dataset}, {NORM_NAMES.get(norm, norm)} attacks"
        shown[f"Robust precision under attack: {where}"] = _pivot(group, keys, "epsilon", precision, group.n, "ε=")
        shown[f"Robust recall under attack: {where}"] = _pivot(group, keys, "epsilon", recall, group.n, "ε=")
    return shown


# -- rendering ---------------------------------------------------------------------------------
def _rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records")) if not table.empty else []


def latex_escape(text: Any) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "ε": r"$\epsilon$", "–": "--", "∞": r"$\infty$"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    header = " & ".join(latex_escape(c) for c in table.columns) + r" \\"
    body = "\n".join(" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False))
    return "\n".join([
        r"\begin{table}[ht]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
        rf"\begin{{tabular}}{{{'l' * len(table.columns)}}}", r"\toprule", header, r"\midrule", body,
        r"\bottomrule", r"\end{tabular}", r"\end{table}", "",
    ])


def render(
    tables: dict[str, pd.DataFrame],
    fmt: str,
    thresholds: Sequence[float] | None = None,
    precision_thresholds: Sequence[float] | None = None,
) -> str:
    """``json`` (the contract above), ``csv`` (every row, long format), ``md`` or ``latex``
    (the tables of :func:`display_tables`)."""
    if fmt == "json":
        return json.dumps({name: _rows(table) for name, table in tables.items()}, indent=2)
    if fmt == "csv":
        parts = [f"# {name}\n" + table.drop(columns=["params"], errors="ignore").to_csv(index=False)
                 for name, table in tables.items() if not table.empty]
        return "\n".join(parts) if parts else "no runs in this store yet\n"
    shown = display_tables(tables, thresholds, precision_thresholds)
    if not shown:
        return "no runs in this store yet\n"
    note = "Values: proportion [95% Clopper-Pearson interval]; n: samples per value."
    if fmt == "latex":
        return f"% {note}\n" + "\n".join(to_latex(table, title) for title, table in shown.items())
    if fmt == "md":
        return f"{note}\n\n" + "\n".join(f"## {title}\n\n{table.to_markdown(index=False)}\n" for title, table in shown.items())
    raise ValueError(f"unknown table format {fmt!r}")


# -- comparing two runs --------------------------------------------------------------------------
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
    results = Results(chosen.reset_index(drop=True), everything.records[everything.records.run_id.isin(chosen.run_id)])
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
        long.append((r.run_id, "accuracy", "clean", "", 0.0, None, r.accuracy, r.ci_low, r.ci_high, r.n))
    for _, r in tables["accuracy_under_attack"].iterrows():
        if r.epsilon > 0:
            long.append((r.run_id, "accuracy", r.attack, r.norm, r.epsilon, None, r.accuracy, r.ci_low, r.ci_high, r.n))
    certified = tables["certified"]
    if not certified.empty:
        shown = _thresholds(certified, thresholds)
        for _, r in certified[certified.attack.eq("clean") & certified.threshold.isin(shown)].iterrows():
            long.append((r.run_id, "certified accuracy", "clean", r.norm, 0.0, r.threshold, r.certified_accuracy,
                         r.certified_accuracy_ci_low, r.certified_accuracy_ci_high, r.n))
        at_t = _thresholds(certified, PRECISION_THRESHOLDS)
        for _, r in certified[certified.attack.ne("clean") & certified.threshold.isin(at_t)].iterrows():
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
    merged = merged.assign(_order=merged.metric.map(order).fillna(4), _clean=merged.attack.ne("clean"))
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
    return f"{_cell(value, low, high)} n={int(n)}"


def render_comparison(comparison: dict[str, pd.DataFrame], fmt: str) -> str:
    """Markdown (default), LaTeX, CSV or JSON of :func:`compare`."""
    if fmt == "json":
        return json.dumps({name: _rows(table) for name, table in comparison.items()}, indent=2)
    shown = {"Setup (fields that differ)": comparison["setup"],
             "Metrics (B - A)": comparison["metrics"].drop(columns=["value_a", "value_b"])}
    if fmt == "csv":
        return "\n".join(f"# {name}\n" + table.to_csv(index=False) for name, table in comparison.items())
    if fmt == "latex":
        return "\n".join(to_latex(table, title) for title, table in shown.items())
    return "\n".join(f"## {title}\n\n{table.to_markdown(index=False)}\n" for title, table in shown.items())
