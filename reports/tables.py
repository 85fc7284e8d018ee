"""The tables of a results store as DataFrames: the JSON contract for scripts.

JSON contract (``bench report --format json``): one object with lists
``clean`` ({dataset, defense, label, params, accuracy, n}),
``accuracy_under_attack`` ({dataset, defense, label, params, attack, norm, epsilon, accuracy, n};
epsilon 0 is clean; ``attack = "worst-case"`` is the per-sample worst case over the attacks of
that norm) and ``certified`` ({dataset, defense, label, params, attack, epsilon, norm, threshold,
certified_accuracy, robust_precision, robust_recall, n}; ``attack = "clean"`` rows give the
certified accuracy at threshold T). Every row also carries its ``run_id``. Rows come in the
order of the configurations (the order their runs were asked for), stably, not by ``run_id``.

Added fields (compatible extensions):

- every row carries ``config``: the configuration label shown in tables and plots (``label``,
  with the differing spec fields appended when two runs of one dataset share a label);
- ``clean`` and ``accuracy_under_attack`` rows carry ``correct`` (the count behind ``accuracy``)
  and ``ci_low``, ``ci_high``: the 95% Clopper-Pearson (exact binomial) interval of ``accuracy``
  over ``n`` samples;
- ``certified`` rows carry ``attack_norm`` (the norm of the attack; ``norm`` is the certificate's),
  the counts ``certified_correct`` (certified at T with the true label) and ``robust_n`` (certified
  at T: the denominator of robust precision), ``certified_accuracy_ci_low/high`` and
  ``robust_recall_ci_low/high`` (over ``n``) and ``robust_precision_ci_low/high`` (over
  ``robust_n``). Each attack also has rows at epsilon 0: the clean inputs' certificates. A point
  without a certificate (abstention, failed test, radius 0) is certified at no T, T = 0 included;
- a ``cost`` list, one row per run: {run_id, dataset, defense, label, params, config, every
  ``*_seconds`` entry of the run's info (``train_seconds``, ``eval_seconds``, ...), num_train,
  num_test, eval_ms_per_image, reused_checkpoint, device, model_train_seconds}. ``train_seconds``
  of a run that reused a checkpoint is the loading time; ``model_train_seconds`` is the training
  time of its model, from the run that trained it (null when that run is not in the stores);
- a ``diagnostics`` list, one row per run (``bench.diagnostics``): {run_id, dataset, defense,
  label, config, verdict (``flagged``: a diagnostic fired; ``clean``: all ran, none fired;
  ``unchecked``: not all ran), fired (the names of those that fired), verdict_flips (randomized
  defenses: the share of clean points whose verdict changed between two calls of the rule),
  messages (what fired, and why)};
- ``accuracy_under_attack`` rows carry ``verdict_flips``: on randomized defenses, the share of the
  points whose verdict at that epsilon changed between two calls of the defense's rule (the noise
  that differences smaller than it drown in); empty for deterministic defenses and worst-case rows;
- a ``ranking`` list (``ranking_table``), one row per dataset, norm, epsilon and configuration:
  {dataset, norm, epsilon, config, run_id, attack, accuracy, ci_low, ci_high, n, rank, flagged}.
  It ranks the headline rows of ``accuracy_under_attack``: per configuration and norm the
  ``worst-case`` row where it exists, else the single attack's row (epsilon 0 is clean accuracy).
  ``rank`` = 1 + the number of configurations of that dataset, norm and epsilon whose 95% interval
  lies entirely above this one's (their ``ci_low`` > this ``ci_high``): configurations whose
  intervals overlap are not told apart, and rank 1 means no configuration is clearly better.
  ``flagged``: the configuration's label carries ``bench.reports.labels.FLAG`` (its diagnostics
  fired); it is ranked like the others, on its worst case over all its attacks of that norm (the
  audit attacks included), and keeps its flag.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench import metrics
from bench.confidence import clopper_pearson_interval
from bench.reports.cost import cost_table
from bench.reports.labels import FLAG, verdict
from bench.reports.load import Selection, load_results, run_keys
from bench.store import Store
from bench.types import CLEAN, TABLE_NAMES

CONFIDENCE = 0.95  # of every interval in tables and plots


def with_interval(table: pd.DataFrame, successes: str, trials: str, prefix: str = "") -> pd.DataFrame:
    """``table`` with ``{prefix}ci_low`` and ``{prefix}ci_high``: the Clopper-Pearson interval of
    ``successes`` out of ``trials`` (count columns); NaN where ``trials`` is 0."""
    if table.empty:
        return table.assign(**{f"{prefix}ci_low": [], f"{prefix}ci_high": []})
    low, high = clopper_pearson_interval(table[successes].to_numpy(dtype=float), table[trials].to_numpy(dtype=float),
                                         CONFIDENCE)
    return table.assign(**{f"{prefix}ci_low": low, f"{prefix}ci_high": high})


def tables_from(results: Selection, thresholds: Sequence[float] = metrics.THRESHOLD_GRID) -> dict[str, pd.DataFrame]:
    """The tables of the JSON contract (plus ``cost``) for the given runs and records, in the
    order of the configurations (see ``order_by_configuration``). The records stay where they
    are: every metric is an aggregation in SQLite (``bench.metrics``)."""
    if results.runs.empty:
        return {name: pd.DataFrame() for name in TABLE_NAMES}
    records = results.records.only(results.runs.run_id)
    clean = with_interval(with_keys(metrics.clean_accuracy(records), results.runs), "correct", "n")
    under_attack = with_keys(metrics.accuracy_under_attack(records), results.runs)
    under_attack = with_median_perturbation(with_interval(under_attack, "correct", "n"), records)
    certified = with_keys(metrics.certified(records, tuple(thresholds)), results.runs)
    certified = with_interval(certified, "certified_correct", "n", "certified_accuracy_")
    certified = with_interval(certified, "robust_n", "n", "robust_recall_")
    certified = with_interval(certified, "certified_correct", "robust_n", "robust_precision_")
    attacks = under_attack[under_attack.attack != metrics.WORST_CASE]
    attack_norms = attacks[["run_id", "attack", "norm"]].drop_duplicates(["run_id", "attack"])
    certified = certified.merge(attack_norms.rename(columns={"norm": "attack_norm"}), on=["run_id", "attack"], how="left")
    certified = certified.sort_values(["attack", "epsilon", "threshold"], key=_clean_first, kind="stable")
    under_attack = with_verdict_flips(under_attack, results.runs)
    tables = {"clean": clean, "accuracy_under_attack": under_attack, "certified": certified,
              "cost": cost_table(results.runs), "diagnostics": diagnostics_table(results.runs)}
    config = results.runs.set_index("run_id").config
    tables = {name: order_by_configuration(table.assign(config=table.run_id.map(config)), results.runs)
              if not table.empty else table for name, table in tables.items()}
    tables["ranking"] = ranking_table(tables["accuracy_under_attack"])
    return {name: table.assign(params=table.params.map(_params)) if "params" in table else table
            for name, table in tables.items()}


def with_keys(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``table`` (a metric per ``run_id``) with its run's keys (``run_keys``) after ``run_id``,
    rows in their order."""
    joined = table.merge(run_keys(runs), on="run_id", how="left")
    return joined[metrics.RUN_KEYS + [c for c in table.columns if c != "run_id"]]


RANKING_COLUMNS = ["dataset", "norm", "epsilon", "config", "run_id", "attack", "accuracy", "ci_low", "ci_high", "n",
                   "rank", "flagged"]


def headline_rows(under_attack: pd.DataFrame) -> pd.DataFrame:
    """The rows a configuration is judged by: per run and norm its ``worst-case`` rows where it has
    them (several attacks of that norm), else its single attack's rows. Epsilon 0 is clean accuracy."""
    if under_attack.empty:
        return under_attack
    has_worst = under_attack.groupby(["run_id", "norm"], sort=False).attack.transform(
        lambda attacks: (attacks == metrics.WORST_CASE).any())
    return under_attack[(under_attack.attack == metrics.WORST_CASE) | ~has_worst]


def interval_rank(low: Sequence[float], high: Sequence[float]) -> list[int]:
    """Rank of each interval ``[low[i], high[i]]``: 1 + the number of intervals that lie entirely
    above it (``low[j] > high[i]``). Overlapping (or touching) intervals do not outrank each other,
    so they tie; a configuration is ranked below another only when the 95% intervals separate."""
    lows = np.sort(np.asarray(low, dtype=float))
    lows = lows[~np.isnan(lows)]  # an interval without bounds (n = 0) is above nothing
    # 1 + how many lows exceed each high, by binary search (a thousand configurations: a million pairs)
    return (1 + len(lows) - np.searchsorted(lows, np.asarray(high, dtype=float), side="right")).tolist()


def ranking_table(under_attack: pd.DataFrame) -> pd.DataFrame:
    """Who wins, per dataset, norm (threat model) and epsilon, from the headline rows of the
    ``accuracy_under_attack`` table (``headline_rows``): ``rank`` = 1 + the number of
    configurations whose 95% Clopper-Pearson interval lies entirely above this one's
    (``interval_rank``). Where one configuration has several headline rows at one epsilon (several
    runs of that norm), its lowest accuracy counts. ``flagged`` marks configurations whose
    diagnostics fired (their label carries ``FLAG``): ranked on their worst case, the audit attacks
    included, never hidden. Rows keep the order of ``under_attack`` (the configurations' order)."""
    if under_attack.empty:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    rows = headline_rows(under_attack)
    rows = rows.assign(_position=range(len(rows))).sort_values("accuracy", kind="stable")
    rows = rows.drop_duplicates(["dataset", "norm", "epsilon", "config"]).sort_values("_position")
    groups = rows.groupby(["dataset", "norm", "epsilon"], sort=False)
    rank = pd.concat([pd.Series(interval_rank(group.ci_low.tolist(), group.ci_high.tolist()), index=group.index)
                      for _, group in groups])
    rows = rows.assign(rank=rank, flagged=rows.config.str.contains(FLAG, regex=False))
    return rows[RANKING_COLUMNS].reset_index(drop=True)


def _findings(info: Any) -> list[dict[str, Any]]:
    return [d for d in (info.get("diagnostics") or []) if isinstance(d, dict)] if isinstance(info, dict) else []


def diagnostics_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its diagnostics' verdict, what fired and the verdict noise."""
    rows = []
    for _, run in runs.iterrows():
        findings = _findings(run["info"])
        flips = next((d for d in findings if d.get("name") == "verdict-flips"), None)
        rows.append({
            "run_id": run.run_id, "dataset": run.dataset, "defense": run.defense, "label": run.label,
            "params": run.params, "verdict": verdict(run["info"]),
            "fired": ", ".join(d["name"] for d in findings if d.get("fired")),
            "verdict_flips": flips["count"] / flips["n"] if flips and flips.get("n") else None,
            "messages": [d["message"] for d in findings if d.get("fired")] + [
                w for w in run.warnings if w not in {d.get("message") for d in findings}],
        })
    return pd.DataFrame(rows)


def with_verdict_flips(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``verdict_flips`` per run, attack and epsilon from the runs' stored verdict-flips counts."""
    rows = []
    for _, run in runs.iterrows():
        for finding in _findings(run["info"]):
            if finding.get("name") == "verdict-flips":
                for step in finding.get("detail", {}).get("per_step", []):
                    rows.append((run.run_id, step["step"], float(step["epsilon"]), step["count"] / max(step["n"], 1)))
    if table.empty:
        return table
    flips = pd.DataFrame(rows, columns=["run_id", "attack", "epsilon", "verdict_flips"])
    clean = flips[flips.attack == CLEAN][["run_id", "verdict_flips"]].rename(columns={"verdict_flips": "clean_flips"})
    merged = table.merge(flips, on=["run_id", "attack", "epsilon"], how="left").merge(clean, on="run_id", how="left")
    at_zero = (merged.epsilon == 0) & (merged.attack != metrics.WORST_CASE)
    merged["verdict_flips"] = merged.verdict_flips.where(~at_zero, merged.clean_flips)
    return merged.drop(columns="clean_flips")


def with_median_perturbation(table: pd.DataFrame, records: metrics.Records) -> pd.DataFrame:
    """``table`` with each attack's median minimal perturbation (``metrics.median_perturbation``)
    on its rows; empty for the worst-case rows."""
    if table.empty:
        return table
    medians = metrics.median_perturbation(records).drop(columns=["n"])
    return table.merge(medians, on=["run_id", "attack", "norm"], how="left")


def _clean_first(column: pd.Series) -> pd.Series:
    return column.map(lambda a: (a != CLEAN, a)) if column.name == "attack" else column


def order_by_configuration(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``table`` grouped by configuration in the order its first run was asked for
    (``runs`` come in that order), then by run; a stable sort, so the order within a run stays."""
    config_position = {config: i for i, config in enumerate(dict.fromkeys(runs.config))}
    run_position = {run_id: i for i, run_id in enumerate(runs.run_id)}
    config_of = {run_id: config_position[config] for run_id, config in zip(runs.run_id, runs.config)}
    keys = pd.DataFrame({"config": table.run_id.map(config_of), "run": table.run_id.map(run_position)})
    order = keys.sort_values(["config", "run"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


def _params(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def build_tables(
    store: Store | Sequence[Store],
    thresholds: Sequence[float] = metrics.THRESHOLD_GRID,
    where: Sequence[tuple[str, str]] = (),
) -> dict[str, pd.DataFrame]:
    """Every table, from the latest run of each spec in one or several stores."""
    return tables_from(load_results(store, where), thresholds)
