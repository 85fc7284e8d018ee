"""Trained digits defenses for the attack benchmarks: reused from a results store, else trained
exactly as ``bench run --defense NAME --dataset digits`` trains them (and stored for next time)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.datasets.base import balanced_subset
from bench.datasets.digits import load_digits
from bench.provenance import seed_everything
from bench.runner import build_defense, resolved
from bench.spec import RunSpec
from bench.store import Store
from bench.training import TrainConfig


def trained(defense: str, results: Path, params: dict[str, Any] | None = None):
    """The defense trained with the CLI's defaults, its checkpoint shared with ``bench run --out results``."""
    dataset = load_digits()
    spec = RunSpec(defense=defense, dataset="digits", params=dict(params or {}))
    model, model_name = build_defense(spec, dataset, "cpu")
    spec = resolved(spec, model, model_name)  # the training defaults table, as bench run resolves it
    store = Store(results)
    state = store.load_checkpoint(spec.training_hash())
    if state is not None:
        model.load_state_dict(state)
    else:
        train_index = balanced_subset(dataset.y_train, spec.train_size, spec.seed)
        seed_everything(spec.seed)
        model.fit(dataset.x_train[train_index], dataset.y_train[train_index],
                  TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed))
        store.save_checkpoint(spec.training_hash(), model.state_dict())
    return model


def test_images(count: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of the seeded class-balanced test subset the CLI uses."""
    dataset = load_digits()
    index = balanced_subset(dataset.y_test, count, 0)
    return dataset.x_test[index], dataset.y_test[index]
