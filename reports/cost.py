"""The cost table: training and evaluation time per run, from the timings in each run's info."""
from __future__ import annotations

import pandas as pd


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

