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

from bench.store import RECORD_COLUMNS

RUN_KEYS = ["run_id", "dataset", "defense", "label", "params"]
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))


def records_frame(records: list[tuple], run_id: str = "run") -> pd.DataFrame:
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


def sanity_warnings(records: list[tuple], randomized: bool, eot_draws: int | None) -> list[str]:
    """Signs that an evaluation overstates robustness (Athalye et al. 2018; Carlini et al. 2019)."""
    warnings = []
    frame = records_frame(records)
    table = accuracy_under_attack(frame)
    for (attack, norm), group in table[table.attack != "worst-case"].groupby(["attack", "norm"]):
        accuracy = group.sort_values("epsilon").accuracy.to_numpy()
        rises = np.diff(accuracy) > 0.02  # tolerate noise from randomized prediction
        if rises.any():
            warnings.append(
                f"{attack}: accuracy rises with epsilon ({', '.join(f'{a:.3f}' for a in accuracy)}); the attack may be too weak"
            )
    if randomized and eot_draws == 1:
        warnings.append("randomized defense attacked with --eot-draws 1: results are non-adaptive and overstate robustness")
    return warnings
