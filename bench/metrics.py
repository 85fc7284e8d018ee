"""Metrics computed from stored per-sample records, never from numbers kept aside.

- accuracy under attack at epsilon: fraction of samples whose prediction on the attacked input
  is correct; per sample, the worst case over attacks of one norm counts (``attack = "worst-case"``);
- certified accuracy at T: fraction with a certificate (see ``bench.types.Certificate``: a point
  without one is not certified at any T, T = 0 included), a correct certified label and a
  certified radius >= T;
- robust precision / recall at T (PixelDP paper, Sec. IV): among the attacked inputs whose
  prediction is certified at T, the fraction that is correct / the fraction of all inputs that are
  certified at T.

Every metric comes with its counts (``correct``, ``certified_correct``, ``robust_n`` and ``n``),
so intervals are computed from integers, not from rounded proportions. Epsilon 0 is the clean
input for every attack (``clean_at_epsilon_zero``), whatever an attack stored at epsilon 0.

Each metric is one SQL aggregation over the ``records`` table (``bench.store.RECORDS_TABLE``) of a
store, or of an in-memory SQLite copy for records that are not stored (``Records.of``): the one
implementation, whatever holds the records. It runs once per run, so a report holds one run's
intermediate rows and the aggregated tables, never every record (ten million records are
gigabytes as a DataFrame; ``benchmarks/bench_report_scale.py``).
"""
from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from bench.confidence import at_chance, chance_level
from bench.types import ABSTAIN, CLEAN, HAS_CERTIFICATE_SQL, RECORD_COLUMNS, Norm, Record

RUN_KEYS = ["run_id", "dataset", "defense", "label", "params"]
WORST_CASE = "worst-case"  # the per-sample worst case over the attacks of one norm

# The certified thresholds T, listed once: the fine grid of the JSON, CSV and plots; the columns
# of the human-readable tables; the T of robust precision/recall (the paper's Fig. 5).
THRESHOLD_GRID: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.0, 1.0001, 0.05), 2))
TABLE_THRESHOLDS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
PRECISION_THRESHOLDS: tuple[float, ...] = (0.05, 0.1)
DEFAULT_THRESHOLDS = THRESHOLD_GRID


def records_frame(records: list[Record], run_id: str = "run") -> pd.DataFrame:
    """Records of one run as the frame the metrics take (the true class is ``true_label``,
    since ``label`` names the defense configuration in tables); plain tuples get ``Record``'s defaults."""
    frame = pd.DataFrame([(run_id,) + tuple(Record(*r)) for r in records], columns=list(RECORD_COLUMNS))
    frame = frame.rename(columns={"label": "true_label"})
    return frame.assign(dataset="", defense="", label="", params="")


Opener = Callable[[], AbstractContextManager[sqlite3.Connection]]


@dataclass(frozen=True)
class Records:
    """Where the per-sample records of some runs are: per part, a database with a ``records``
    table (``opener`` gives a connection: ``Store.reading``, or an in-memory one) and the runs
    chosen in it, in the runs' order."""

    parts: tuple[tuple[Opener, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]]) -> "Records":
        """Records held in memory (tuples in ``RECORD_COLUMNS`` order, ``run_id`` first) copied into
        an in-memory SQLite database, so the metrics run the same SQL on them as on a store."""
        from bench.store import RECORDS_TABLE

        # check_same_thread: Results may be read from another thread; nothing writes after this.
        connection = sqlite3.connect(":memory:", check_same_thread=False)
        connection.executescript(RECORDS_TABLE)
        connection.executemany(f"INSERT INTO records VALUES ({','.join('?' * len(RECORD_COLUMNS))})",
                               (tuple(row) for row in rows))
        connection.commit()
        run_ids = tuple(r for (r,) in connection.execute("SELECT run_id FROM records GROUP BY run_id ORDER BY MIN(rowid)"))
        return cls((((lambda: nullcontext(connection)), run_ids),))

    def only(self, run_ids: Iterable[str]) -> "Records":
        """These records restricted to ``run_ids``."""
        keep = set(run_ids)
        return Records(tuple((opener, tuple(r for r in ids if r in keep)) for opener, ids in self.parts))

    def query(self, sql: str, columns: Sequence[str], params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """``sql`` run once per run (it names the run ``:run_id``; ``:clean`` and ``:worst_case`` are
        the step names), its rows for every run in one frame: ``run_id``, then ``columns``."""
        params = {"clean": CLEAN, "worst_case": WORST_CASE, **(params or {})}
        rows = []
        for opener, run_ids in self.parts:
            with opener() as connection:
                for run_id in run_ids:
                    rows += [(run_id, *row) for row in connection.execute(sql, {**params, "run_id": run_id})]
        return pd.DataFrame(rows, columns=["run_id", *columns])

    def frame(self) -> pd.DataFrame:
        """Every record as one DataFrame (its size grows with the records: for notebooks, not reports)."""
        columns = RECORD_COLUMNS[1:]
        return self.query(f"SELECT {', '.join(columns)} FROM records WHERE run_id = :run_id ORDER BY rowid", columns)

    def __len__(self) -> int:
        counts = self.query("SELECT COUNT(*) FROM records WHERE run_id = :run_id", ["n"])
        return int(counts.n.sum())


def _as_records(records: Records | pd.DataFrame) -> Records:
    """``records`` as ``Records``: a frame of records (``records_frame``'s columns) is copied into SQLite."""
    if isinstance(records, Records):
        return records
    frame = records.reindex(columns=["true_label" if c == "label" else c for c in RECORD_COLUMNS])
    return Records.of(frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None))


def clean_at_epsilon_zero(attacked: pd.DataFrame, clean: pd.DataFrame, per: list[str]) -> pd.DataFrame:
    """``attacked`` rows, with the rows at epsilon 0 replaced by the run's ``clean`` rows, one copy
    for each distinct ``per`` (e.g. attack and norm) of the run: epsilon 0 is the clean input.

    The one place that decides it, so every table and plot starts its curves at the clean value."""
    pairs = attacked[["run_id"] + per].drop_duplicates()
    zero = pairs.merge(clean.drop(columns=[c for c in per if c in clean], errors="ignore"), on="run_id")
    zero["epsilon"] = 0.0
    return pd.concat([zero, attacked[attacked.epsilon > 0]], ignore_index=True)


CLEAN_SQL = "SELECT SUM(correct), COUNT(*) FROM records WHERE run_id = :run_id AND attack = :clean GROUP BY run_id"


def clean_accuracy(records: Records | pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``accuracy`` = ``correct`` / ``n`` on the clean inputs."""
    return _with_accuracy(_as_records(records).query(CLEAN_SQL, ["correct", "n"]))


def _with_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    table["correct"] = table.correct.astype(int)
    accuracy = table.correct / table.n if len(table) else pd.Series(dtype=float)
    return table.assign(accuracy=accuracy)


# A point's verdict under attack is right on the attacked input *and* on the clean one: the
# attacker may leave a point as it is (a perturbation of size 0 is within every budget), so a point
# the defense gets wrong unperturbed is not robust at any epsilon. For deterministic defenses this
# changes nothing; for randomized ones it makes each point's verdict one event: a point is not
# counted robust because a fresh call of a noisy rule got lucky on the attacked input after a call
# got it wrong on the clean one. A point without a clean record keeps its attacked verdict.
# The worst case of a norm with several attacks: per point and epsilon, the lowest verdict; since
# verdicts are 0/1, that is the lowest attacked ``correct`` times the clean one (the sample is
# joined to its clean record after the grouping: fewer rows).
ATTACKED_SQL = """
WITH clean AS (
    SELECT sample_index, MIN(correct) AS correct FROM records
    WHERE run_id = :run_id AND attack = :clean GROUP BY sample_index),
per_attack AS (
    SELECT attack, norm, epsilon, SUM(attacked.correct * COALESCE(clean.correct, 1)) AS correct, COUNT(*) AS n
    FROM records AS attacked LEFT JOIN clean USING (sample_index)
    WHERE attacked.run_id = :run_id AND attacked.attack != :clean GROUP BY attack, norm, epsilon),
worst AS (
    SELECT point.norm, point.epsilon, point.correct * COALESCE(clean.correct, 1) AS correct
    FROM (SELECT norm, epsilon, sample_index, MIN(correct) AS correct FROM records
          WHERE run_id = :run_id AND attack != :clean
                AND norm IN (SELECT norm FROM per_attack GROUP BY norm HAVING COUNT(DISTINCT attack) > 1)
          GROUP BY norm, epsilon, sample_index) AS point
    LEFT JOIN clean USING (sample_index))
SELECT attack, norm, epsilon, correct, n FROM per_attack
UNION ALL
SELECT :worst_case, norm, epsilon, SUM(correct), COUNT(*) FROM worst GROUP BY norm, epsilon
"""


def accuracy_under_attack(records: Records | pd.DataFrame) -> pd.DataFrame:
    """One row per run, attack, norm and epsilon: ``accuracy`` = ``correct`` / ``n`` where a point is
    correct when the defense is right on its clean and its attacked input (``ATTACKED_SQL``);
    epsilon 0 is the clean accuracy of every attack."""
    records = _as_records(records)
    columns = ["run_id", "attack", "norm", "epsilon", "correct", "n", "accuracy"]
    table = records.query(ATTACKED_SQL, ["attack", "norm", "epsilon", "correct", "n"])
    if table.empty:
        return pd.DataFrame(columns=columns)
    table = clean_at_epsilon_zero(_with_accuracy(table), clean_accuracy(records), ["attack", "norm"])
    return table[columns].sort_values(["run_id", "attack", "norm", "epsilon"], kind="stable").reset_index(drop=True)


def certified(records: Records | pd.DataFrame, thresholds: Sequence[float] = THRESHOLD_GRID) -> pd.DataFrame:
    """Certified accuracy (clean inputs, ``attack = "clean"``) and robust precision/recall
    (attacked inputs; epsilon 0 is the clean input) at each threshold T, with their counts:
    ``robust_n`` inputs certified at T, ``certified_correct`` of them with the true label, of ``n``.

    Certified at T (``bench.types.certified_at``): the point carries a certificate (its stored
    ``certified`` flag where there is one, and always the rule ``HAS_CERTIFICATE_SQL``) and its
    radius is at least T. SQL counts the points per largest T their radius reaches (``bucket``:
    one comparison chain per record, where a sum per T was six times slower); the counts at each
    T are then the sums over the buckets at or above it."""
    keys = ["run_id", "attack", "epsilon"]
    columns = keys + ["norm", "threshold", "certified_correct", "robust_n", "n", "certified_accuracy",
                      "robust_precision", "robust_recall"]
    grid = sorted(set(float(t) for t in thresholds))
    reached = " ".join(f"WHEN certified_radius >= :t{i} THEN {i}" for i in reversed(range(len(grid))))
    sql = f"""
    SELECT attack, epsilon, bucket, MIN(certified_norm), COUNT(*), SUM(certified_label = label)
    FROM (SELECT attack, epsilon, certified_norm, certified_label, label,
                 COALESCE(CASE WHEN COALESCE(certified, 1) AND {HAS_CERTIFICATE_SQL} THEN CASE {reached} END END, -1)
                     AS bucket
          FROM records WHERE run_id = :run_id AND certified_radius IS NOT NULL)
    GROUP BY attack, epsilon, bucket"""
    buckets = _as_records(records).query(sql, ["attack", "epsilon", "bucket", "norm", "count", "right"],
                                         {f"t{i}": t for i, t in enumerate(grid)})
    groups = buckets.groupby(keys, sort=False)
    group, column = groups.ngroup().to_numpy(), buckets.bucket.to_numpy(dtype=int) + 1  # column 0: certified at no T
    counts, right = (np.zeros((groups.ngroups, len(grid) + 1), dtype=int) for _ in range(2))
    np.add.at(counts, (group, column), buckets["count"].to_numpy(dtype=int))
    np.add.at(right, (group, column), buckets.right.fillna(0).to_numpy(dtype=int))
    at_least = [np.cumsum(c[:, ::-1], axis=1)[:, ::-1][:, 1:] for c in (counts, right)]  # [g, i]: buckets >= i
    chosen = [grid.index(float(t)) for t in thresholds]
    first = groups.first()
    table = pd.DataFrame({
        **{key: np.repeat(first.index.get_level_values(key).to_numpy(dtype=object), len(chosen)) for key in keys},
        "norm": np.repeat(groups.norm.min().to_numpy(dtype=object), len(chosen)),
        "threshold": np.tile(np.asarray(thresholds, dtype=float), groups.ngroups),
        "certified_correct": at_least[1][:, chosen].reshape(-1),
        "robust_n": at_least[0][:, chosen].reshape(-1),
        "n": np.repeat(counts.sum(axis=1), len(chosen)),
    })
    table["epsilon"] = table.epsilon.astype(float)
    robust = table.robust_n.where(table.robust_n > 0)
    table = table.assign(certified_accuracy=table.certified_correct / table.n,
                         robust_precision=table.certified_correct / robust, robust_recall=table.robust_n / table.n)
    table = table[columns]
    attacked = table[table.attack != CLEAN]
    if attacked.empty:
        return table
    clean = table[table.attack == CLEAN].drop(columns="epsilon")
    attacked = clean_at_epsilon_zero(attacked, clean, ["attack"])
    return pd.concat([table[table.attack == CLEAN], attacked], ignore_index=True)[columns]


# Per point, its smallest stored perturbation that the defense misclassifies (NULL: none, an
# infinite one; grouped by sample first, the order of the store's unique index, so without a sort;
# an attack has one norm); then the median over the points of an attack: the middle one, or the mean of the
# two middle ones (NULLs sort last, so a median that reaches them is infinite).
MEDIAN_SQL = """
WITH point AS (
    SELECT attack, MIN(norm) AS norm, MIN(CASE WHEN correct = 0 THEN distance END) AS distance FROM records
    WHERE run_id = :run_id AND attack != :clean AND distance IS NOT NULL
    GROUP BY sample_index, attack),
ranked AS (
    SELECT attack, norm, distance, ROW_NUMBER() OVER by_distance AS position,
           COUNT(*) OVER (by_distance ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS n
    FROM point WINDOW by_distance AS (PARTITION BY attack, norm ORDER BY distance NULLS LAST))
SELECT attack, norm, CASE WHEN COUNT(distance) < COUNT(*) THEN 9e999 ELSE AVG(distance) END, MAX(n) FROM ranked
WHERE position IN ((n + 1) / 2, (n + 2) / 2) GROUP BY attack, norm
"""


def median_perturbation(records: Records | pd.DataFrame) -> pd.DataFrame:
    """Per run, attack and norm: the median over all test points of the smallest perturbation
    (norm of ``distance``) among the point's stored adversarials that the defense misclassifies;
    infinite for a point no epsilon broke, so the median is finite only when the attack broke at
    least half the points. For minimisation attacks (CW, FMN) this is the median minimal
    perturbation; for fixed-budget attacks it is resolved only to the epsilon grid."""
    return _as_records(records).query(MEDIAN_SQL, ["attack", "norm", "median_perturbation", "n"])


# An attack size is "very large" when the uniform mid-gray image (every pixel 0.5) lies within it
# of every input in [0,1]^d: linf 0.5, l2 0.5*sqrt(d), l1 0.5*d. There an attack that moves every
# input to that one image leaves the classifier right only on the class it gives the gray image,
# so accuracy well above the largest class share means the attack failed, not that the model is
# robust (gradient masking, too few steps; Carlini et al. 2019, "On Evaluating Adversarial Robustness").
VERY_LARGE_MARGIN = 0.1  # accuracy points above the largest class share that trigger the warning


def very_large_epsilon(norm: Norm, input_dim: int | None) -> float | None:
    """The smallest attack size in ``norm`` that reaches the mid-gray image from any input in
    [0,1]^input_dim: half the diameter (``Norm.diameter``); ``None`` when that is unknown."""
    diameter = Norm(norm).diameter(input_dim)
    return None if diameter is None else 0.5 * diameter


STRENGTH_MARGIN = 0.01  # per-sample disagreement between two attacks of one norm that triggers a warning
STRENGTH_PREFIX = "attack strength"


def strength_warnings(frame: pd.DataFrame, among: Callable[[str], bool] | None = None) -> list[str]:
    """Where two attacks of one norm disagree per sample by more than ``STRENGTH_MARGIN``.

    For every ordered pair (a, b) of attacks with the same norm and epsilon: the share of samples
    that b breaks and a misses. Above the margin, a's figure overstates robustness; one warning
    per pair names both accuracies at the epsilon where the gap is largest and the per-sample
    worst case, the figure to quote. Each warning starts with ``attack strength (NORM)``. ``among``
    limits the pairs to the attacks it accepts (the worst case still counts every attack).
    """
    attacked = frame[frame.attack != CLEAN]
    warnings = []
    for norm, by_norm in attacked.groupby("norm", sort=True):
        correct = by_norm.pivot_table(index=["epsilon", "sample_index"], columns="attack", values="correct", aggfunc="min")
        names = sorted(name for name in correct.columns if among is None or among(name))
        for a in names:
            for b in names:
                if a == b:
                    continue
                both = correct[[a, b]].dropna()
                if both.empty:
                    continue
                missed = ((both[a] == 1) & (both[b] == 0)).groupby(level="epsilon").mean()
                if missed.max() <= STRENGTH_MARGIN:
                    continue
                eps = float(missed.idxmax())
                at = correct.loc[eps]
                worst = float(at.min(axis=1).mean())
                others = int((missed > STRENGTH_MARGIN).sum()) - 1
                warnings.append(
                    f"{STRENGTH_PREFIX} ({norm}): at {norm} epsilon {eps:g}, {a} leaves {float(at[a].mean()):.1%} "
                    f"accurate but {b} breaks {float(missed.max()):.1%} of the points {a} misses ({b}: "
                    f"{float(at[b].mean()):.1%}); quote the per-sample worst case over {norm} attacks, {worst:.1%}"
                    + (f" (gap above {STRENGTH_MARGIN:.0%} at {others} more epsilon(s))" if others > 0 else "")
                )
    return warnings


def sanity_warnings(
    records: list[tuple], randomized: bool, eot_draws: int | None, input_dim: int | None = None
) -> list[str]:
    """Signs that an evaluation overstates robustness (Athalye et al. 2018; Carlini et al. 2019).

    - accuracy that rises with epsilon (the attack is too weak or unstable);
    - accuracy well above chance at a very large epsilon (see ``very_large_epsilon``; for l2/l1
      it needs ``input_dim``, the number of values per input, C*H*W);
    - a randomized defense attacked with a single noise draw per step (non-adaptive);
    - two attacks of one norm that disagree per sample by more than 1 point (``strength_warnings``);
    - clean accuracy not significantly above chance (the largest class's share;
      ``bench.confidence.at_chance``): an untrained model, or inputs or labels not as the model expects.
    """
    warnings = []
    frame = records_frame(records)
    table = accuracy_under_attack(frame)
    clean = frame[frame.attack == CLEAN]
    chance = chance_level(clean.true_label) if not clean.empty else None
    finding = at_chance(int(clean.correct.sum()), len(clean), chance, inputs="test inputs") if chance is not None else None
    if finding is not None:
        abstained = int((clean.prediction == ABSTAIN).sum())
        warnings.append(
            f"clean {finding}{f' ({abstained} abstentions)' if abstained else ''}: the model does no better than "
            "guessing (untrained, or inputs or labels not as it expects), so its robustness numbers say nothing"
        )
    for (attack, norm), group in table[table.attack != WORST_CASE].groupby(["attack", "norm"]):
        group = group.sort_values("epsilon")
        accuracy = group.accuracy.to_numpy()
        rises = np.diff(accuracy) > 0.02  # tolerate noise from randomized prediction
        if rises.any():
            warnings.append(
                f"{attack}: accuracy rises with epsilon ({', '.join(f'{a:.3f}' for a in accuracy)}); the attack may be too weak"
            )
        largest = float(group.epsilon.iloc[-1])
        threshold = very_large_epsilon(norm, input_dim)
        if chance is not None and threshold is not None and largest >= threshold and accuracy[-1] > chance + VERY_LARGE_MARGIN:
            warnings.append(
                f"{attack}: accuracy {accuracy[-1]:.3f} at {norm} epsilon {largest:g}, where every input can reach the "
                f"uniform gray image (from {norm} {threshold:g}) and a working attack leaves at most about {chance:.3f} "
                "(the largest class share); a sign of gradient masking or too weak an attack"
            )
    if randomized and eot_draws == 1:
        warnings.append("randomized defense attacked with --eot-draws 1: results are non-adaptive and overstate robustness")
    return warnings + strength_warnings(frame)
