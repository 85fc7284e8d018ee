"""Computational overhead as the PixelDP paper measures it (its Q4), as ratios on this machine: a
training step of each defense against a baseline step, and a PixelDP prediction with k noise
draws against one with a single draw.

Each round times every contender once, interleaved, so a change of machine load hits all of
them alike; the table keeps the median ratio and its range over the rounds.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from bench.datasets.base import Dataset
from bench.runner import build_defense
from bench.spec import RunSpec
from bench.training import TrainConfig, training_defaults

OVERHEAD_COLUMNS = ["name", "x", "value", "low", "high", "rounds", "detail"]
DRAWS = (1, 10, 25, 100, 300, 1000)


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def step_seconds(defense_name: str, dataset: Dataset, steps: int, params: Mapping[str, object] | None = None,
                 batch_size: int = 64, seed: int = 0, model: str | None = None) -> float:
    """Seconds per training step of ``defense_name``: ``fit`` over ``2 * steps`` batches minus
    ``fit`` over ``steps`` batches, divided by ``steps`` (what a fit does once, such as PixelDP's
    sensitivity measurement or building the model, cancels out)."""
    spec = RunSpec(defense=defense_name, dataset=dataset.name, params=dict(params or {}), seed=seed, model=model)
    lr = training_defaults(defense_name, dataset.name)["lr"]

    def fit(count: int) -> float:
        defense, _ = build_defense(spec, dataset, "cpu")
        x, y = dataset.x_train[:count * batch_size], dataset.y_train[:count * batch_size]
        return _timed(lambda: defense.fit(x, y, TrainConfig(epochs=1, batch_size=batch_size, lr=lr, seed=seed)))

    return max(fit(2 * steps) - fit(steps), 0.0) / steps


def _ratio_row(name: str, x: float, ratios: Sequence[float], detail: str) -> dict[str, object]:
    return {"name": name, "x": float(x), "value": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
            "rounds": len(ratios), "detail": detail}


def training_overhead(dataset: Dataset, defenses: Sequence[str] = ("pixeldp", "madry", "robustopt"),
                      steps: int = 5, rounds: int = 3, model: str | None = None) -> list[dict[str, object]]:
    """Per defense, ``<defense>-step``: its seconds per training step over the baseline's, with
    the training defaults of ``dataset`` (batch 64), every defense on ``model`` (default: the
    dataset's zoo model; a defense that cannot use it, as RobustOpt a network with batch norm,
    keeps its own, and the row says so)."""
    from bench.registry import DEFENSES

    chosen = {name: None if DEFENSES.get(name).default_model else model for name in ("baseline", *defenses)}
    # Each defense times about the same seconds of work: a step that costs c baseline steps
    # (Defense.training_cost) is timed over steps / c steps, so that the difference of two fits
    # stays well above the jitter of one.
    counts = {name: max(2, round(steps / DEFENSES.get(name).training_cost(DEFENSES.get(name).Params())))
              for name in chosen}
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in range(rounds):
        for name in seconds:
            seconds[name].append(step_seconds(name, dataset, counts[name], model=chosen[name]))
    rows = []
    for name in defenses:
        ratios = [s / b for s, b in zip(seconds[name], seconds["baseline"]) if b > 0]
        detail = (f"{statistics.median(seconds[name]):.4f} s vs baseline {statistics.median(seconds['baseline']):.4f} s "
                  f"per step of 64 images" + ("" if chosen[name] == chosen["baseline"] else
                                              f" ({name} on its own model, {DEFENSES.get(name).default_model})"))
        rows.append(_ratio_row(f"{name}-step", 0.0, ratios, detail))
    return rows


def prediction_overhead(dataset: Dataset, draws: Sequence[int] = DRAWS, rounds: int = 3,
                        repeats: int = 5, model: str | None = None) -> list[dict[str, object]]:
    """``prediction-draws`` at x = k: the seconds of a PixelDP prediction for one image with k
    noise draws (its expected scores, whose argmax is the prediction) over those with one draw
    (the paper's Q4 timing, one image at a time)."""
    defense, _ = build_defense(RunSpec(defense="pixeldp", dataset=dataset.name, model=model), dataset, "cpu")
    defense.fit(dataset.x_train[:64], dataset.y_train[:64], TrainConfig(epochs=1, batch_size=64))
    image = dataset.x_test[:1]
    seconds: dict[int, list[float]] = {k: [] for k in draws}
    with torch.no_grad():
        for _ in range(rounds):
            for k in draws:
                defense.expected_scores(image, k)  # warm-up: first calls at a new size allocate
                seconds[k].append(min(_timed(lambda: defense.expected_scores(image, k)) for _ in range(repeats)))
    base = seconds[draws[0]]
    return [_ratio_row("prediction-draws", k, [s / b for s, b in zip(seconds[k], base)],
                       f"{statistics.median(seconds[k]) * 1000:.2f} ms per image") for k in draws]


def measure_overhead(dataset: Dataset, steps: int = 5, rounds: int = 3, model: str | None = None) -> pd.DataFrame:
    """The training and prediction overheads as one table (``OVERHEAD_COLUMNS``), on ``model``
    (default: the dataset's zoo model)."""
    rows = (training_overhead(dataset, steps=steps, rounds=rounds, model=model)
            + prediction_overhead(dataset, rounds=rounds, model=model))
    return pd.DataFrame(rows, columns=OVERHEAD_COLUMNS)
