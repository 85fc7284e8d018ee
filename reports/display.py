"""Tables for people: proportions with their interval and count, epsilons and thresholds as columns."""
from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from bench.metrics import PRECISION_THRESHOLDS, TABLE_THRESHOLDS, WORST_CASE
from bench.reports.labels import FLAG, NORM_NAMES, config_order, ranked
from bench.reports.tables import ranking_table
from bench.types import CLEAN

RANKING_PREFIX = "Ranking: "
RANKING_RULE = (
    "Who wins, per dataset, threat model and epsilon (ε=0: clean accuracy), judged by each configuration's headline "
    "row of accuracy under attack: the worst case over the norm's attacks where it faced several, else its one "
    "attack. Cells: rank (accuracy). rank = 1 + the number of configurations whose 95% Clopper-Pearson interval "
    "lies entirely above this one's, so configurations whose intervals overlap share a rank; rank 1 means no "
    "configuration is clearly better.")
FLAG_NOTE = (
    f"{FLAG}: this configuration's gradient-masking diagnostics fired. Its figure is the worst case over all its "
    "attacks of this norm, the audit attacks (gradient-free and transfer) included, and an adaptive attack may go "
    "lower: its rank is an upper bound, not a win.")


def number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def cell(value: Any, low: Any, high: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{number(value)} [{number(low)}, {number(high)}]"


def _order(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    worst_last = table.attack.eq(WORST_CASE) if "attack" in table else False
    return table.assign(_worst=worst_last).sort_values(keys[:-1] + ["_worst", keys[-1]], kind="stable")


def _pivot(table: pd.DataFrame, rows: list[str], column: str, cells: pd.Series, n: pd.Series, heading: str) -> pd.DataFrame:
    """Rows as given, one column per value of ``column`` (``heading`` + value), then ``n``."""
    frame = table[rows].assign(_column=table[column], _cell=cells.to_numpy(), _n=n.to_numpy())
    frame = frame.assign(_row=frame[rows].astype(str).agg("\x1f".join, axis=1))
    order = list(dict.fromkeys(frame._row))
    wide = frame.pivot_table(index="_row", columns="_column", values="_cell", aggfunc="first").reindex(order)
    counts = frame.groupby("_row", sort=False)._n.agg(lambda s: "/".join(str(v) for v in sorted(set(s)))).reindex(order)
    keys = frame.drop_duplicates("_row").set_index("_row")[rows].reindex(order)
    wide = wide[sorted(wide.columns)].fillna("–")
    wide.columns = [f"{heading}{c:g}" for c in wide.columns]
    return pd.concat([keys, wide, counts.rename("n")], axis=1).reset_index(drop=True)


def _with_flips_column(shown: pd.DataFrame, group: pd.DataFrame) -> pd.DataFrame:
    """Randomized defenses: the largest share of points whose verdict flipped between two calls of
    the defense's rule, over the row's epsilons (differences smaller than it are noise)."""
    if "verdict_flips" not in group or group.verdict_flips.isna().all():
        return shown
    largest = group.groupby(["configuration", "attack"], sort=False).verdict_flips.max()
    column = [largest.get((c, a)) for c, a in zip(shown.configuration, shown.attack)]
    return shown.assign(**{"verdict flips": ["–" if v is None or pd.isna(v) else f"{v:.1%}" for v in column]})


def _with_median_column(shown: pd.DataFrame, group: pd.DataFrame) -> pd.DataFrame:
    """The accuracy table plus each attack's median minimal perturbation ("> max eps" where the
    attack broke fewer than half the points; "–" on worst-case rows)."""
    if "median_perturbation" not in group:
        return shown
    largest = group.epsilon.max()
    medians = group.drop_duplicates(["configuration", "attack"]).set_index(["configuration", "attack"]).median_perturbation

    def text(key: tuple) -> str:
        value = medians.get(key)
        if value is None or pd.isna(value):
            return "–"
        return f"> {largest:g}" if value == float("inf") else f"{value:.3g}"

    column = [text((c, a)) for c, a in zip(shown.configuration, shown.attack)]
    return shown.assign(**{"median min. perturbation": column})


def display_tables(
    tables: dict[str, pd.DataFrame],
    thresholds: Sequence[float] | None = None,
    precision_thresholds: Sequence[float] | None = None,
) -> dict[str, pd.DataFrame]:
    """Tables for people: values with their 95% Clopper-Pearson interval and sample count ``n``.

    First the rankings (``ranking_tables``, titles starting with ``RANKING_PREFIX``). Accuracy under
    attack has one column per epsilon (0 = clean) and the worst case over the
    attacks of a norm as its own row; certified accuracy one column per threshold T; robust
    precision (its ``n=`` is the number of certified inputs) and recall one column per epsilon.
    """
    shown: dict[str, pd.DataFrame] = {}
    order = config_order(tables)
    tables = {name: ranked(table, order) if not table.empty and "config" in table else table
              for name, table in tables.items()}
    shown.update(ranking_tables(tables.get("accuracy_under_attack", pd.DataFrame()), order))
    clean = tables.get("clean", pd.DataFrame())
    if not clean.empty:
        clean = clean.sort_values(["dataset", "_rank"], kind="stable")
        shown["Clean accuracy"] = pd.DataFrame({
            "dataset": clean.dataset, "configuration": clean.config,
            "accuracy [95% CI]": [cell(*v) for v in zip(clean.accuracy, clean.ci_low, clean.ci_high)],
            "n": clean.n,
        }).drop_duplicates().reset_index(drop=True)  # one model evaluated by several runs
    attack = tables.get("accuracy_under_attack", pd.DataFrame())
    if not attack.empty:
        attack = _order(attack, ["dataset", "norm", "_rank", "attack"]).rename(columns={"config": "configuration"})
        for (dataset, norm), group in attack.groupby(["dataset", "norm"], sort=False):
            cells = pd.Series([cell(*v) for v in zip(group.accuracy, group.ci_low, group.ci_high)])
            shown[f"Accuracy under attack: {dataset}, {NORM_NAMES.get(norm, norm)}"] = _with_flips_column(
                _with_median_column(_pivot(group, ["configuration", "attack"], "epsilon", cells, group.n, "ε="), group),
                group)
    certified = tables.get("certified", pd.DataFrame())
    if not certified.empty:
        clean_rows = certified[certified.attack == CLEAN]
        chosen = thresholds_present(clean_rows, thresholds if thresholds is not None else TABLE_THRESHOLDS)
        clean_rows = clean_rows[clean_rows.threshold.isin(chosen)].sort_values(["dataset", "norm", "_rank"], kind="stable")
        if not clean_rows.empty:
            cells = pd.Series([cell(*v) for v in zip(clean_rows.certified_accuracy, clean_rows.certified_accuracy_ci_low,
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
            frame[column.removesuffix("_seconds").replace("_", " ") + " (s)"] = cost[column].map(lambda v: number(v, 1))
        frame["model training (s)"] = cost.model_train_seconds.map(lambda v: number(v, 1))
        frame["eval (ms/image)"] = cost.eval_ms_per_image.map(lambda v: number(v, 2))
        frame["train images"] = cost.num_train
        frame["test images"] = cost.num_test
        frame["checkpoint reused"] = cost.reused_checkpoint.map({True: "yes", False: "no"}).fillna("–")
        shown["Cost"] = frame.reset_index(drop=True)
    return shown


def ranking_tables(under_attack: pd.DataFrame, order: list[str]) -> dict[str, pd.DataFrame]:
    """One ranking per dataset and norm (``bench.reports.tables.ranking_table``, computed from the
    accuracy-under-attack rows given): rows configurations (in ``order``), one column per epsilon,
    cells ``rank (accuracy)``, then ``n``."""
    ranking = ranking_table(under_attack)
    if ranking.empty:
        return {}
    ranking = ranked(ranking, order).sort_values(["dataset", "norm", "_rank"], kind="stable")
    shown = {}
    for (dataset, norm), group in ranking.groupby(["dataset", "norm"], sort=False):
        cells = pd.Series([f"{rank} ({number(accuracy)})" for rank, accuracy in zip(group["rank"], group.accuracy)])
        shown[f"{RANKING_PREFIX}{dataset}, {NORM_NAMES.get(norm, norm)}"] = _pivot(
            group.rename(columns={"config": "configuration"}), ["configuration"], "epsilon", cells, group.n, "ε=")
    return shown


def sample_counts(frame: pd.DataFrame) -> list[int]:
    """The distinct sample counts in a shown table's ``n`` column (cells such as ``"100/500"`` hold several)."""
    if "n" not in frame:
        return []
    return sorted({int(part) for value in frame.n for part in str(value).split("/") if part.strip().isdigit()})


def table_notes(title: str, frame: pd.DataFrame) -> list[str]:
    """One-line notes for under a shown table: the sample counts where they differ within it, and
    for a ranking with a flagged configuration what its figure means (``FLAG_NOTE``)."""
    notes = []
    counts = sample_counts(frame)
    if len(counts) > 1:
        notes.append(f"n differs in this table: n = {', '.join(str(n) for n in counts)}; values over fewer samples "
                     "have wider intervals.")
    if title.startswith(RANKING_PREFIX) and frame.configuration.str.contains(FLAG, regex=False).any():
        notes.append(FLAG_NOTE)
    return notes


def thresholds_present(rows: pd.DataFrame, wanted: Sequence[float]) -> list[float]:
    present = sorted(set(rows.threshold))
    return [t for t in present if any(math.isclose(t, w, abs_tol=1e-9) for w in wanted)]


def _precision_recall(certified: pd.DataFrame, thresholds: Sequence[float] | None) -> dict[str, pd.DataFrame]:
    """Robust precision and recall at T: one row per (dataset, attack, configuration, T), one column per epsilon."""
    attacked = certified[certified.attack != CLEAN]
    if attacked.empty:
        return {}
    chosen = thresholds_present(certified, thresholds if thresholds is not None else PRECISION_THRESHOLDS)
    rows = attacked[attacked.threshold.isin(chosen)].sort_values(["dataset", "attack", "_rank", "threshold", "epsilon"],
                                                                  kind="stable")
    if rows.empty:
        return {}
    rows = rows.rename(columns={"config": "configuration", "threshold": "T"}).reset_index(drop=True)
    keys = ["attack", "configuration", "T"]
    shown = {}
    for (dataset, norm), group in rows.groupby(["dataset", "attack_norm"], sort=False):
        precision = pd.Series([
            "–" if pd.isna(p) else f"{cell(p, lo, hi)} n={m}"
            for p, lo, hi, m in zip(group.robust_precision, group.robust_precision_ci_low,
                                    group.robust_precision_ci_high, group.robust_n)
        ])
        recall = pd.Series([cell(*v) for v in zip(group.robust_recall, group.robust_recall_ci_low,
                                                    group.robust_recall_ci_high)])
        where = f"{dataset}, {NORM_NAMES.get(norm, norm)} attacks"
        shown[f"Robust precision under attack: {where}"] = _pivot(group, keys, "epsilon", precision, group.n, "ε=")
        shown[f"Robust recall under attack: {where}"] = _pivot(group, keys, "epsilon", recall, group.n, "ε=")
    return shown


