"""Metrics computed from stored per-sample records, never from numbers kept aside.

- accuracy under attack at epsilon: fraction of samples whose prediction on the attacked input
  is correct; per sample, the worst case over attacks of one norm counts (``attack = "worst-case"``);
- certified accuracy at T: fraction with a correct certified label and certified radius >= T;
- robust precision / recall at T (PixelDP paper, Sec. IV): among the attacked inputs whose
  prediction is certified at T, the fraction that is correct / the fraction of all inputs that are
  certified at T.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.types import RECORD_COLUMNS, Record

RUN_KEYS = ["run_id", "dataset", "defense", "label", "params"]
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))


def records_frame(records: list[Record], run_id: str = "run") -> pd.DataFrame:
    """Records of one run as the frame the metrics take (the true class is ``true_label``,
    since ``label`` names the defense configuration in tables)."""
    frame = pd.DataFrame([(run_id,) + tuple(r) for r in records], columns=list(RECORD_COLUMNS))
    frame = frame.rename(columns={"label": "true_label"})
    return frame.assign(dataset="", defense="", label="", params="")


def clean_accuracy(records: pd.DataFrame) -> pd.DataFrame:
    clean = records[records.attack == "clean"]
    return clean.groupby(RUN_KEYS, sort=False).agg(accuracy=("correct", "mean"), n=("correct", "size")).reset_index()


def accuracy_under_attack(records: pd.DataFrame) -> pd.DataFrame:
    """One row per run, attack, norm and epsilon; epsilon 0 is the clean accuracy of every attack."""
    attacked = records[records.attack != "clean"]
    if attacked.empty:
        return pd.DataFrame(columns=RUN_KEYS + ["attack", "norm", "epsilon", "accuracy", "n"])
    worst = (
        attacked.groupby(RUN_KEYS + ["norm", "epsilon", "sample_index"], sort=False)["correct"].min().reset_index()
    )
    worst["attack"] = "worst-case"
    attacks_per_norm = attacked.groupby(RUN_KEYS + ["norm"], sort=False)["attack"].nunique().reset_index()
    multi = attacks_per_norm[attacks_per_norm.attack > 1][RUN_KEYS + ["norm"]]
    worst = worst.merge(multi, on=RUN_KEYS + ["norm"])
    combined = pd.concat([attacked, worst], ignore_index=True)
    table = (
        combined.groupby(RUN_KEYS + ["attack", "norm", "epsilon"], sort=False)
        .agg(accuracy=("correct", "mean"), n=("correct", "size"))
        .reset_index()
    )
    clean = clean_accuracy(records)
    zero = table[RUN_KEYS + ["attack", "norm"]].drop_duplicates().merge(clean, on=RUN_KEYS)
    zero["epsilon"] = 0.0
    table = pd.concat([zero, table[table.epsilon > 0]], ignore_index=True)
    return table.sort_values(RUN_KEYS + ["attack", "norm", "epsilon"], kind="stable").reset_index(drop=True)


def certified(records: pd.DataFrame, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Certified accuracy (clean inputs) and robust precision/recall (attacked inputs) at each T."""
    rows = []
    with_certificates = records[records.certified_radius.notna()]
    keys = RUN_KEYS + ["attack", "epsilon"]
    for key, group in with_certificates.groupby(keys, sort=False):
        radius = group.certified_radius.to_numpy()
        correct = (group.certified_label == group.true_label).to_numpy()
        norm = group.certified_norm.iloc[0]
        for threshold in thresholds:
            robust = radius >= threshold
            robust_count = int(robust.sum())
            rows.append({
                **dict(zip(keys, key)),
                "norm": norm,
                "threshold": float(threshold),
                "certified_accuracy": float((robust & correct).mean()),
                "robust_precision": float((robust & correct).sum() / robust_count) if robust_count else None,
                "robust_recall": float(robust.mean()),
                "n": len(group),
            })
    columns = keys + ["norm", "threshold", "certified_accuracy", "robust_precision", "robust_recall", "n"]
    return pd.DataFrame(rows, columns=columns)


# An attack size is "very large" when the uniform mid-gray image (every pixel 0.5) lies within it
# of every input in [0,1]^d: linf 0.5, l2 0.5*sqrt(d), l1 0.5*d. There an attack that moves every
# input to that one image leaves the classifier right only on the class it gives the gray image,
# so accuracy well above the largest class share means the attack failed, not that the model is
# robust (gradient masking, too few steps; Carlini et al. 2019, "On Evaluating Adversarial Robustness").
VERY_LARGE_MARGIN = 0.1  # accuracy points above the largest class share that trigger the warning


def very_large_epsilon(norm: str, input_dim: int | None) -> float | None:
    """The smallest attack size in ``norm`` that reaches the mid-gray image from any input in
    [0,1]^input_dim; ``None`` when it needs the input dimension and that is unknown."""
    if norm == "linf":
        return 0.5
    if input_dim is None:
        return None
    if norm == "l2":
        return 0.5 * float(np.sqrt(input_dim))
    if norm == "l1":
        return 0.5 * input_dim
    return None


def sanity_warnings(
    records: list[tuple], randomized: bool, eot_draws: int | None, input_dim: int | None = None
) -> list[str]:
    """Signs that an evaluation overstates robustness (Athalye et al. 2018; Carlini et al. 2019).

    - accuracy that rises with epsilon (the attack is too weak or unstable);
    - accuracy well above chance at a very large epsilon (see ``very_large_epsilon``; for l2/l1
      it needs ``input_dim``, the number of values per input, C*H*W);
    - a randomized defense attacked with a single noise draw per step (non-adaptive).
    """
    warnings = []
    frame = records_frame(records)
    table = accuracy_under_attack(frame)
    clean = frame[frame.attack == "clean"]
    chance = float(clean.true_label.value_counts(normalize=True).max()) if not clean.empty else None
    for (attack, norm), group in table[table.attack != "worst-case"].groupby(["attack", "norm"]):
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
    return warnings
