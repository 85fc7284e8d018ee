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
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from bench.confidence import at_chance, chance_level
from bench.types import ABSTAIN, CLEAN, RECORD_COLUMNS, Norm, Record, certified_at, has_certificate

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


def certified_mask(records: pd.DataFrame) -> np.ndarray:
    """Which records carry a certificate: the stored ``certified`` flag, else (records without
    it) the rule ``bench.types.has_certificate``: not abstained and a radius above 0."""
    derived = has_certificate(records.certified_label, records.certified_radius)
    if "certified" not in records:
        return derived.to_numpy(dtype=bool)
    stored = records.certified
    return stored.where(stored.notna(), derived).astype(bool).to_numpy() & derived.to_numpy(dtype=bool)


def clean_at_epsilon_zero(attacked: pd.DataFrame, clean: pd.DataFrame, per: list[str]) -> pd.DataFrame:
    """``attacked`` rows, with the rows at epsilon 0 replaced by the run's ``clean`` rows, one copy
    for each distinct ``per`` (e.g. attack and norm) of the run: epsilon 0 is the clean input.

    The one place that decides it, so every table and plot starts its curves at the clean value."""
    pairs = attacked[RUN_KEYS + per].drop_duplicates()
    zero = pairs.merge(clean.drop(columns=[c for c in per if c in clean], errors="ignore"), on=RUN_KEYS)
    zero["epsilon"] = 0.0
    return pd.concat([zero, attacked[attacked.epsilon > 0]], ignore_index=True)


def clean_accuracy(records: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``accuracy`` = ``correct`` / ``n`` on the clean inputs."""
    clean = records[records.attack == CLEAN]
    table = clean.groupby(RUN_KEYS, sort=False).agg(correct=("correct", "sum"), n=("correct", "size")).reset_index()
    return _with_accuracy(table)


def _with_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    table["correct"] = table.correct.astype(int)
    accuracy = table.correct / table.n if len(table) else pd.Series(dtype=float)
    return table.assign(accuracy=accuracy)


def robust_verdicts(attacked: pd.DataFrame, clean: pd.DataFrame) -> pd.DataFrame:
    """``attacked`` with ``correct`` = right on the attacked input *and* on the clean one.

    The attacker may leave a point as it is (a perturbation of size 0 is within every budget), so a
    point the defense gets wrong unperturbed is not robust at any epsilon. For deterministic
    defenses this changes nothing; for randomized ones it makes each point's verdict one event:
    a point is not counted robust because a fresh call of a noisy rule got lucky on the attacked
    input after a call got it wrong on the clean one."""
    if clean.empty:
        return attacked
    right = clean.groupby(["run_id", "sample_index"], sort=False).correct.min().rename("clean_correct")
    merged = attacked.join(right, on=["run_id", "sample_index"])
    both = merged.correct.where(merged.clean_correct.isna(), merged.correct * merged.clean_correct.fillna(1))
    return attacked.assign(correct=both.astype(attacked.correct.dtype))


def accuracy_under_attack(records: pd.DataFrame) -> pd.DataFrame:
    """One row per run, attack, norm and epsilon: ``accuracy`` = ``correct`` / ``n`` where a point is
    correct when the defense is right on its clean and its attacked input (``robust_verdicts``);
    epsilon 0 is the clean accuracy of every attack."""
    columns = RUN_KEYS + ["attack", "norm", "epsilon", "correct", "n", "accuracy"]
    attacked = records[records.attack != CLEAN]
    if attacked.empty:
        return pd.DataFrame(columns=columns)
    attacked = robust_verdicts(attacked, records[records.attack == CLEAN])
    worst = (
        attacked.groupby(RUN_KEYS + ["norm", "epsilon", "sample_index"], sort=False)["correct"].min().reset_index()
    )
    worst["attack"] = WORST_CASE
    attacks_per_norm = attacked.groupby(RUN_KEYS + ["norm"], sort=False)["attack"].nunique().reset_index()
    multi = attacks_per_norm[attacks_per_norm.attack > 1][RUN_KEYS + ["norm"]]
    worst = worst.merge(multi, on=RUN_KEYS + ["norm"])
    combined = pd.concat([attacked, worst], ignore_index=True)
    table = (
        combined.groupby(RUN_KEYS + ["attack", "norm", "epsilon"], sort=False)
        .agg(correct=("correct", "sum"), n=("correct", "size"))
        .reset_index()
    )
    table = clean_at_epsilon_zero(_with_accuracy(table), clean_accuracy(records), ["attack", "norm"])
    return table[columns].sort_values(RUN_KEYS + ["attack", "norm", "epsilon"], kind="stable").reset_index(drop=True)


def certified(records: pd.DataFrame, thresholds: tuple[float, ...] = THRESHOLD_GRID) -> pd.DataFrame:
    """Certified accuracy (clean inputs, ``attack = "clean"``) and robust precision/recall
    (attacked inputs; epsilon 0 is the clean input) at each threshold T, with their counts:
    ``robust_n`` inputs certified at T, ``certified_correct`` of them with the true label, of ``n``."""
    keys = RUN_KEYS + ["attack", "epsilon"]
    columns = keys + ["norm", "threshold", "certified_correct", "robust_n", "n", "certified_accuracy",
                      "robust_precision", "robust_recall"]
    with_certificates = records[records.certified_radius.notna()]
    mask = certified_mask(with_certificates)
    rows = []
    for key, index in with_certificates.groupby(keys, sort=False).indices.items():
        group = with_certificates.iloc[index]
        radius = group.certified_radius.to_numpy(dtype=float)
        with_certificate = mask[index]
        correct = (group.certified_label == group.true_label).to_numpy()
        for threshold in thresholds:
            robust = certified_at(with_certificate, radius, threshold)
            robust_n, robust_correct = int(robust.sum()), int((robust & correct).sum())
            rows.append({
                **dict(zip(keys, key)),
                "norm": group.certified_norm.iloc[0],
                "threshold": float(threshold),
                "certified_correct": robust_correct,
                "robust_n": robust_n,
                "n": len(group),
                "certified_accuracy": robust_correct / len(group),
                "robust_precision": robust_correct / robust_n if robust_n else None,
                "robust_recall": robust_n / len(group),
            })
    table = pd.DataFrame(rows, columns=columns)
    attacked = table[table.attack != CLEAN]
    if attacked.empty:
        return table
    clean = table[table.attack == CLEAN].drop(columns="epsilon")
    attacked = clean_at_epsilon_zero(attacked, clean, ["attack"])
    return pd.concat([table[table.attack == CLEAN], attacked], ignore_index=True)[columns]


def median_perturbation(records: pd.DataFrame) -> pd.DataFrame:
    """Per run, attack and norm: the median over all test points of the smallest perturbation
    (norm of ``distance``) among the point's stored adversarials that the defense misclassifies;
    infinite for a point no epsilon broke, so the median is finite only when the attack broke at
    least half the points. For minimisation attacks (CW, FMN) this is the median minimal
    perturbation; for fixed-budget attacks it is resolved only to the epsilon grid."""
    columns = RUN_KEYS + ["attack", "norm", "median_perturbation", "n"]
    attacked = records[(records.attack != CLEAN) & records.distance.notna()]
    if attacked.empty:
        return pd.DataFrame(columns=columns)
    keys = RUN_KEYS + ["attack", "norm"]
    broken = attacked[attacked.correct == 0].groupby(keys + ["sample_index"], sort=False).distance.min()
    points = attacked.groupby(keys + ["sample_index"], sort=False).size().rename("count").to_frame()
    points["distance"] = broken.reindex(points.index).fillna(np.inf)
    table = points.groupby(level=keys, sort=False).distance.agg(median_perturbation="median", n="size").reset_index()
    return table[columns]


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
