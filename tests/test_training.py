"""The training loop's divergence check, the training defaults table,
and the small zoo CNNs' layer-by-layer architectures."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from torch import nn

from bench.errors import TrainingFailed
from bench.models import build_model
from bench.registry import DATASETS
from bench.runner import build_defense
from bench.spec import RunSpec
from bench.store import Store
from bench.training import TRAINING_DEFAULTS, TrainConfig, train_classifier, training_defaults
from conftest import FAST


def tiny_problem(count: int = 64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.rand(count, 1, 2, 2), torch.arange(count) % 3


def test_a_loss_that_becomes_nan_stops_training_with_its_reason():
    model, x, y = tiny_problem()
    x[5] = float("nan")  # the batch holding image 5 has a NaN loss
    with pytest.raises(TrainingFailed, match=r"loss became nan at epoch 1, step \d") as error:
        train_classifier(model.parameters(), [model], x, y, TrainConfig(epochs=3, batch_size=16),
                         lambda xb, yb: nn.functional.cross_entropy(model(xb), yb))
    assert "\n" not in str(error.value)


def test_a_huge_learning_rate_diverges():
    model, x, y = tiny_problem()
    calls = []

    def loss_fn(xb, yb):
        calls.append(1)
        return nn.functional.cross_entropy(model(xb) * 1e20, yb)

    with pytest.raises(TrainingFailed, match="diverged"):
        train_classifier(model.parameters(), [model], x, y, TrainConfig(epochs=50, batch_size=16, lr=1e30), loss_fn)
    assert len(calls) < 50 * 4  # it stops at the first bad step, not after all epochs


def test_a_diverged_run_is_stored_as_failed_with_no_checkpoint(bench, tmp_path):
    code, _, err = bench("run", *FAST, "--lr", "1e6", "--out", str(tmp_path))
    assert code != 0 and "training diverged, the loss became nan" in err
    (run,) = Store(tmp_path).runs(complete_only=False)
    assert run.status == "failed" and "training diverged" in json.dumps(run.info)
    assert Store(tmp_path).runs() == []  # tables read complete runs only
    assert not list(tmp_path.glob("checkpoints/*.pt"))
    with sqlite3.connect(tmp_path / "results.sqlite") as connection:
        assert connection.execute("SELECT COUNT(*) FROM records").fetchone() == (0,)


def test_defaults_table_resolves_most_specific_row_and_the_spec_stores_it(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(TRAINING_DEFAULTS, ("baseline", "digits"), {"lr": 0.07, "epochs": 2})
    assert training_defaults("baseline", "digits") == {"lr": 0.07, "epochs": 2, "test_size": 200, "params": {}}
    assert training_defaults("baseline", "cifar10")["test_size"] is None  # the whole split
    assert training_defaults("someone-elses", "digits")["lr"] == TRAINING_DEFAULTS[("*", "*")]["lr"]
    fast = [a for a in FAST if a not in ("--epochs", "2")]
    assert bench("run", *fast, "--out", str(tmp_path))[0] == 0
    assert bench("run", *fast, "--lr", "0.03", "--out", str(tmp_path))[0] == 0
    first, second = Store(tmp_path).runs()
    assert (first.spec["lr"], first.spec["epochs"]) == (0.07, 2)
    assert (second.spec["lr"], second.spec["epochs"]) == (0.03, 2)  # the command line wins
    assert first.training_hash != second.training_hash


def test_defaults_table_params_are_under_the_command_lines(monkeypatch):
    monkeypatch.setitem(TRAINING_DEFAULTS, ("robustopt", "digits"), {"params": {"ramp_epochs": 1.0, "proj": 8}})
    data = DATASETS.get("digits")()
    defense, _ = build_defense(RunSpec("robustopt", params={"proj": "4"}), data, "cpu")
    assert (defense.params.ramp_epochs, defense.params.proj) == (1.0, 4)
    defense, _ = build_defense(RunSpec("robustopt", dataset="digits"), data, "cpu")
    assert (defense.params.ramp_epochs, defense.params.proj) == (1.0, 8)


# Each small CNN, layer by layer, as its source describes it: (type, in, out, kernel, stride, padding).
ARCHITECTURES = {
    # Wong & Kolter (2018), the small MNIST model of convex_adversarial's examples/problems.py:
    # Conv2d(1, 16, 4, stride=2, padding=1), ReLU, Conv2d(16, 32, 4, stride=2, padding=1), ReLU,
    # Flatten, Linear(32*7*7, 100), ReLU, Linear(100, 10).
    ("wk-small", 28): [("conv", 1, 16, 4, 2, 1), "relu", ("conv", 16, 32, 4, 2, 1), "relu", "flatten",
                       ("linear", 32 * 7 * 7, 100), "relu", ("linear", 100, 10)],
    ("wk-small", 8): [("conv", 1, 16, 4, 2, 1), "relu", ("conv", 16, 32, 4, 2, 1), "relu", "flatten",
                      ("linear", 32 * 2 * 2, 100), "relu", ("linear", 100, 10)],
    # The PixelDP paper's MNIST CNN.
    ("mnist-cnn", 28): [("conv", 1, 32, 5, 2, 2), "relu", ("conv", 32, 64, 5, 2, 2), "relu", "flatten",
                        ("linear", 64 * 7 * 7, 1024), "relu", ("linear", 1024, 10)],
    ("digits-cnn", 8): [("conv", 1, 32, 3, 1, 1), "relu", ("conv", 32, 64, 3, 2, 1), "relu", "flatten",
                        ("linear", 64 * 4 * 4, 128), "relu", ("linear", 128, 10)],
}


def describe(layer: nn.Module):
    if isinstance(layer, nn.Conv2d):
        return ("conv", layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.stride[0], layer.padding[0])
    if isinstance(layer, nn.Linear):
        return ("linear", layer.in_features, layer.out_features)
    return {nn.ReLU: "relu", nn.Flatten: "flatten"}[type(layer)]


@pytest.mark.parametrize("name,size", list(ARCHITECTURES))
def test_small_cnns_match_their_published_layouts(name, size):
    model = build_model(name, (1, size, size), 10, (0.5,), (0.5,))
    assert [describe(layer) for layer in [model.stem, *model.body]] == ARCHITECTURES[name, size]
    assert model(torch.rand(2, 1, size, size)).shape == (2, 10)
