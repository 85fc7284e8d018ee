"""A paper's claims as data, judged from the result tables: **holds**, **contradicted** or
**inconclusive**, decided by 95% intervals.

A claim (a ``[[claims]]`` table of a reproduction file) names the figure, quotes the paper and
lists checks. A check compares one metric of two series (``left``, ``right``: run selectors such
as ``{defense = "pixeldp", L = 0.1}``), or of one series and a number (``value``), at a list of
x values (``at``: thresholds T for certified metrics, attack sizes for accuracy under attack):

- ``relation = "above"`` (or ``"below"``) at one x: *holds* when the 95% intervals separate in
  that direction, *contradicted* when they separate the other way, *inconclusive* when they overlap;
- ``relation = "at-least"`` ("on par or above"): overlap cannot show equality, so the check only
  fails: *contradicted* when left's interval lies entirely below right's, *holds* otherwise;
- ``relation = "within"`` with ``band = [low, high]`` (timing ratios): *holds* when every measured
  ratio lies in the band, *contradicted* when none does, *inconclusive* otherwise.

Over its x values a check ``quantifier = "all"`` (default) holds when every point holds and is
contradicted when any point is; ``"any"`` holds when some point holds and is contradicted when
every point is. A claim holds when all its checks hold, is contradicted when any check is, and is
inconclusive otherwise. Intervals are the tables' Clopper-Pearson 95% intervals of each series;
comparing separated intervals is conservative (it asks more than a paired test would).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd

from bench.errors import BenchError
from bench.metrics import WORST_CASE
from bench.reports.load import select_runs
from bench.types import CLEAN, Norm

HOLDS, CONTRADICTED, INCONCLUSIVE = "holds", "contradicted", "inconclusive"
VERDICTS = (HOLDS, CONTRADICTED, INCONCLUSIVE)
VERDICT_COLUMNS = ["id", "figure", "claim", "paper", "ours", "verdict"]
RELATIONS = ("above", "below", "at-least", "within")
# metric -> (table, interval columns, x column)
METRICS: dict[str, tuple[str, tuple[str, str], str]] = {
    "clean_accuracy": ("clean", ("ci_low", "ci_high"), "x"),
    "accuracy": ("accuracy_under_attack", ("ci_low", "ci_high"), "epsilon"),
    "certified_accuracy": ("certified", ("certified_accuracy_ci_low", "certified_accuracy_ci_high"), "threshold"),
    "robust_precision": ("certified", ("robust_precision_ci_low", "robust_precision_ci_high"), "epsilon"),
    "robust_recall": ("certified", ("robust_recall_ci_low", "robust_recall_ci_high"), "threshold"),
    "ratio": ("overhead", ("low", "high"), "x"),
}


@dataclass(frozen=True)
class Point:
    """One series' value at one x, with its 95% interval (or, for timings, its measured range)."""

    value: float
    low: float
    high: float

    def shown(self, percent: bool) -> str:
        if percent:
            return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass
class Check:
    metric: str
    relation: str
    left: dict[str, Any]
    at: list[float]
    right: dict[str, Any] | None = None
    value: float | None = None
    band: tuple[float, float] | None = None
    quantifier: str = "all"
    norm: Norm | None = None  # accuracy under attack: the attack's norm
    attack: str = WORST_CASE  # accuracy: an attack name or worst-case; robust precision: worst over attacks
    threshold: float | None = None  # robust precision: certified at this T
    right_metric: str | None = None  # right's metric, where it differs (e.g. Madry's accuracy)
    label: str = ""


@dataclass
class Claim:
    id: str
    figure: str
    claim: str
    paper: str
    checks: list[Check]
    crossings: list[dict[str, Any]] = field(default_factory=list)  # series whose curves' crossings are reported
    crossing_metric: str = "certified_accuracy"


def _fail(where: str, message: str) -> BenchError:
    return BenchError(f"{where}: {message}")


def _check_from(table: Mapping[str, Any], where: str) -> Check:
    known = {f for f in Check.__dataclass_fields__}
    unknown = sorted(set(table) - known)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
    for key in ("metric", "relation", "left", "at"):
        if key not in table:
            raise _fail(where, f"missing key {key!r}")
    check = Check(**{k: v for k, v in table.items()})
    for metric in (check.metric, check.right_metric or check.metric):
        if metric not in METRICS:
            raise _fail(where, f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if check.relation not in RELATIONS:
        raise _fail(where, f"relation {check.relation!r} is not one of {', '.join(RELATIONS)}")
    if check.quantifier not in ("all", "any"):
        raise _fail(where, f"quantifier {check.quantifier!r} is not 'all' or 'any'")
    if not isinstance(check.left, dict) or (check.right is not None and not isinstance(check.right, dict)):
        raise _fail(where, "left and right are tables of run fields, e.g. {defense = \"pixeldp\", L = 0.1}")
    if check.relation == "within":
        if not (isinstance(check.band, (list, tuple)) and len(check.band) == 2):
            raise _fail(where, "relation 'within' needs band = [low, high]")
        check.band = (float(check.band[0]), float(check.band[1]))
    elif (check.right is None) == (check.value is None):
        raise _fail(where, "give exactly one of right (a second series) and value (a number)")
    if not isinstance(check.at, list) or not check.at:
        raise _fail(where, "at must be a non-empty list of x values")
    check.at = [float(x) for x in check.at]
    if check.metric == "robust_precision" and check.threshold is None:
        raise _fail(where, "robust_precision needs threshold = T")
    return check


def claims_from(tables: Sequence[Mapping[str, Any]], where: str = "claims") -> list[Claim]:
    """The ``[[claims]]`` tables of a reproduction file as :class:`Claim` objects; a one-line
    error naming the claim and the key for anything malformed."""
    claims = []
    for number, table in enumerate(tables, 1):
        place = f"{where} {table.get('id', number)!s}"
        for key in ("id", "figure", "claim", "paper", "checks"):
            if key not in table:
                raise _fail(place, f"missing key {key!r}")
        checks = [_check_from(check, f"{place}, check {i}") for i, check in enumerate(table["checks"], 1)]
        claims.append(Claim(table["id"], table["figure"], table["claim"], table["paper"], checks,
                            list(table.get("crossings", [])), table.get("crossing_metric", "certified_accuracy")))
    return claims


# -- reading the tables -------------------------------------------------------------------------
def _selector(selector: Mapping[str, Any]) -> list[tuple[str, str]]:
    # lists and tables as JSON, the way run fields holding them compare (reports.load._same)
    return [(key, json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value))
            for key, value in selector.items()]


def _shown_selector(selector: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.items())


def series_run(runs: pd.DataFrame, selector: Mapping[str, Any]) -> str:
    """The one run that ``selector`` picks; an error when it picks none or several."""
    chosen = select_runs(runs, _selector(selector))
    if len(chosen) != 1:
        raise BenchError(f"series {_shown_selector(selector)} selects {len(chosen)} runs, not one; "
                         "add a field that tells them apart (e.g. test_size or a defense parameter)")
    return str(chosen.run_id.iloc[0])


def _point(row: pd.Series, value: str, interval: tuple[str, str]) -> Point:
    return Point(float(row[value]), float(row[interval[0]]), float(row[interval[1]]))


def series_points(tables: Mapping[str, pd.DataFrame], runs: pd.DataFrame, check: Check,
                  selector: Mapping[str, Any], metric: str | None = None) -> dict[float, Point]:
    """The values of ``metric`` (default ``check.metric``) for the run ``selector`` picks, by x
    (clean accuracy: at x = 0)."""
    metric = metric or check.metric
    table_name, interval, x = METRICS[metric]
    if table_name == "overhead":
        table = tables.get("overhead", pd.DataFrame())
        rows = table[(table.name == selector.get("name"))] if not table.empty else table
        if rows.empty:
            raise BenchError(f"no overhead measurement named {selector.get('name')!r}")
        return {float(r.x): Point(float(r.value), float(r.low), float(r.high)) for r in rows.itertuples()}
    run_id = series_run(runs, selector)
    table = tables[table_name]
    rows = table[table.run_id == run_id] if not table.empty else table
    if metric == "clean_accuracy":
        return {0.0: _point(rows.iloc[0], "accuracy", interval)} if len(rows) else {}
    if metric == "accuracy":
        rows = rows[(rows.attack == check.attack) & ((rows.norm == check.norm) if check.norm else True)]
        return {float(r.epsilon): _point(r, "accuracy", interval) for _, r in rows.iterrows()}
    if metric in ("certified_accuracy", "robust_recall"):
        rows = rows[rows.attack == CLEAN]
        return {float(r.threshold): _point(r, metric, interval) for _, r in rows.iterrows()}
    # robust precision under attack, at threshold T: the attack of that norm that leaves the lowest
    rows = rows[(rows.attack != CLEAN) & (rows.threshold.round(6) == round(check.threshold, 6))]
    if check.norm:
        rows = rows[rows.attack_norm == check.norm]
    rows = rows.dropna(subset=["robust_precision"])
    points: dict[float, Point] = {}
    for epsilon, group in rows.groupby("epsilon"):
        worst = group.sort_values("robust_precision").iloc[0]
        points[float(epsilon)] = _point(worst, "robust_precision", interval)
    return points


def _at(points: Mapping[float, Point], x: float) -> Point | None:
    for key, point in points.items():
        if math.isclose(key, x, rel_tol=1e-6, abs_tol=1e-9):
            return point
    return None


# -- verdicts -----------------------------------------------------------------------------------
def point_verdict(check: Check, left: Point, right: Point | None) -> str:
    if check.relation == "within":
        low, high = check.band
        if low <= left.low and left.high <= high:
            return HOLDS
        if left.high < low or left.low > high:
            return CONTRADICTED
        return INCONCLUSIVE
    other = right if right is not None else Point(check.value, check.value, check.value)
    above, below = left.low > other.high, left.high < other.low
    if check.relation == "at-least":
        return CONTRADICTED if below else HOLDS
    if check.relation == "below":
        above, below = below, above
    return HOLDS if above else CONTRADICTED if below else INCONCLUSIVE


def combine(verdicts: Sequence[str], quantifier: str = "all") -> str:
    """Point verdicts into one: see the module's docstring."""
    if not verdicts:
        return INCONCLUSIVE
    if quantifier == "any":
        if HOLDS in verdicts:
            return HOLDS
        return CONTRADICTED if all(v == CONTRADICTED for v in verdicts) else INCONCLUSIVE
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE


X_NAMES = {"clean_accuracy": "", "accuracy": "eps", "certified_accuracy": "T", "robust_recall": "T", "robust_precision": "eps", "ratio": ""}


def judge_check(check: Check, tables: Mapping[str, pd.DataFrame], runs: pd.DataFrame) -> tuple[str, str]:
    """A check's verdict and what we measured, in words."""
    left = series_points(tables, runs, check, check.left)
    right = series_points(tables, runs, check, check.right, check.right_metric) if check.right is not None else None
    percent = check.metric != "ratio"
    verdicts, parts = [], []
    for x in check.at:
        a, b = _at(left, x), (_at(right, x) if right is not None else None)
        where = f"{X_NAMES[check.metric]}={x:g}" if X_NAMES[check.metric] else check.metric.replace("_", " ")
        if a is None or (right is not None and b is None):
            verdicts.append(INCONCLUSIVE)
            parts.append(f"{where}: not measured")
            continue
        verdict = point_verdict(check, a, b)
        verdicts.append(verdict)
        against = (f" vs {b.shown(percent)}" if b is not None else
                   f" vs band [{check.band[0]:g}, {check.band[1]:g}]" if check.band else f" vs {check.value:g}")
        parts.append(f"{where}: {a.shown(percent)}{against} ({verdict})")
    verdict = combine(verdicts, check.quantifier)
    name = check.label or (f"{_shown_selector(check.left)} {check.relation} "
                           + (_shown_selector(check.right) if check.right is not None else
                              f"{check.band}" if check.band else f"{check.value:g}"))
    return verdict, f"{name}: " + "; ".join(parts)


def crossings(claim: Claim, tables: Mapping[str, pd.DataFrame], runs: pd.DataFrame) -> list[str]:
    """For successive series of ``claim.crossings``: the first x from which the later series'
    estimate is at or above the earlier one's (where ours cross), by point estimates."""
    probe = Check(claim.crossing_metric, "above", {}, [0.0])
    found = []
    for earlier, later in zip(claim.crossings, claim.crossings[1:]):
        a, b = series_points(tables, runs, probe, earlier), series_points(tables, runs, probe, later)
        xs = sorted(set(a) & set(b))
        above = [x for x in xs if b[x].value >= a[x].value and (b[x].value > 0 or a[x].value > 0)]
        text = f"{_shown_selector(later)} over {_shown_selector(earlier)}"
        found.append(f"{text} from {X_NAMES[claim.crossing_metric]}={above[0]:g}" if above else f"{text}: never")
    return found


def judge(claims: Sequence[Claim], tables: Mapping[str, pd.DataFrame], runs: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: ``id``, ``figure``, ``claim``, ``paper``, ``ours`` (every check's points
    and verdicts, and where curves cross), ``verdict``. A check whose runs are missing is
    inconclusive and says why; it never stops the others."""
    rows = []
    for claim in claims:
        verdicts, ours = [], []
        for check in claim.checks:
            try:
                verdict, text = judge_check(check, tables, runs)
            except BenchError as error:
                verdict, text = INCONCLUSIVE, f"not measured: {error}"
            verdicts.append(verdict)
            ours.append(text)
        if claim.crossings:
            try:
                ours.append("curves cross: " + "; ".join(crossings(claim, tables, runs)))
            except BenchError as error:
                ours.append(f"crossings not measured: {error}")
        rows.append({"id": claim.id, "figure": claim.figure, "claim": claim.claim, "paper": claim.paper,
                     "ours": "\n".join(ours), "verdict": combine(verdicts)})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)
