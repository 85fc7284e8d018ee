"""The training loop's divergence check, the chance check, the training defaults table,
and the small zoo CNNs' layer-by-layer architectures."""
from __future__ import annotations

import json
import re
import sqlite3

import pytest
import torch
from torch import nn

import bench
from bench.errors import TrainingFailed
from bench.models import build_model
from bench.registry import DATASETS
from bench.runner import build_defense
from bench.spec import RunSpec
from bench.store import Store
from bench.training import (CHANCE_ALPHA, TRAINING_DEFAULTS, TrainConfig, check_learned, train_classifier,
                            training_defaults)
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


class Lookup(nn.Module):
    """Predicts ``predictions[i]`` for the image whose pixels all hold ``i``: a model right on exactly
    the images one chooses."""

    def __init__(self, predictions: torch.Tensor, classes: int):
        super().__init__()
        self.predictions, self.classes = predictions, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.predictions[x[:, 0, 0, 0].long()], self.classes).float()


def right_on(correct: int, y: torch.Tensor, classes: int) -> Lookup:
    """A model right on the first ``correct`` images and wrong on the others."""
    predictions = y.clone()
    predictions[correct:] = (y[correct:] + 1) % classes
    return Lookup(predictions, classes)


def test_the_chance_check_is_the_exact_binomial_test_at_its_alpha():
    from scipy.stats import binom

    n, classes = 300, 10
    x, y = torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n) % classes
    # The fewest right answers that guessing (p = 0.1) reaches with probability <= alpha: scipy's test.
    needed = next(k for k in range(n + 1) if binom.sf(k - 1, n, 1 / classes) <= CHANCE_ALPHA)
    assert 0.1 < needed / n < 0.2
    assert check_learned(right_on(needed, y, classes), x, y) == needed / n  # weak, but it learned
    with pytest.raises(TrainingFailed) as error:
        check_learned(right_on(needed - 1, y, classes), x, y, desc="baseline")
    message = str(error.value)
    assert message.startswith(f"baseline: training ended at chance: train accuracy {(needed - 1) / n:.3f} <= chance 0.100 "
                              f"(1 of 10 classes) + {(needed - 1) / n - 0.1:.3f}") and "\n" not in message


def test_chance_is_the_largest_class_share_when_labels_are_unbalanced():
    n = 200
    x, y = torch.arange(n).float().view(n, 1, 1, 1), (torch.arange(n) % 4 == 0).long()  # 75% class 0
    with pytest.raises(TrainingFailed, match=r"train accuracy 0.750 <= chance 0.750 \(the largest class's share\)"):
        check_learned(Lookup(torch.zeros(n, dtype=torch.long), 2), x, y)  # always the majority class
    assert check_learned(Lookup(y, 2), x, y) == 1.0


def test_the_chance_check_leaves_the_random_state_and_skips_too_few_images(caplog):
    n = 500
    x, y = torch.rand(n, 1, 2, 2), torch.arange(n) % 2

    class Noisy(nn.Module):  # a randomized model: noise drawn from the global generator
        def forward(self, x):
            return torch.stack([x.flatten(1).sum(1), torch.randn(len(x))], 1)

    before = torch.get_rng_state()
    with pytest.raises(TrainingFailed):
        check_learned(Noisy(), x, y)
    assert torch.equal(torch.get_rng_state(), before)
    # 3 images of 10 classes: even 3 right is what guessing reaches with probability 0.001.
    x3, y3 = torch.arange(3).float().view(3, 1, 1, 1), torch.arange(3)
    assert check_learned(Lookup(y3, 10), x3, y3, desc="tiny") == 1.0
    assert "tiny: 3 training images are too few to tell" in caplog.text


def test_bench_train_fails_on_images_that_say_nothing_about_their_labels(digits):
    """The same model and settings learn from the digits and fail the check when every image is the same."""
    from test_api import mlp

    x, y = digits.x_train[:300], digits.y_train[:300]
    trained = bench.train(mlp(), (x, y), epochs=3, batch_size=16)
    assert check_learned(trained.model, x, y) > 0.5
    with pytest.raises(TrainingFailed) as error:
        bench.train(mlp(), (torch.full_like(x, 0.5), y), epochs=3, batch_size=16)
    # One image, one prediction: right on one class's share at most, the largest share (0.13) at best.
    accuracy, chance = re.search(r"^baseline: training ended at chance: train accuracy (\S+) <= chance (\S+) \(the largest",
                                 str(error.value)).groups()
    assert float(accuracy) <= float(chance) == float(torch.bincount(y).max()) / len(y)


def test_a_run_at_chance_fails_alone_with_its_reason_and_no_checkpoint(bench, tmp_path):
    """A grid of two runs: one whose learning rate is too small to move the weights (it stays at
    its initial, constant-like predictions), and one that learns. The first fails with the measured
    accuracy and chance in its reason; the second is stored; the command exits 1 with a summary."""
    config = tmp_path / "grid.toml"
    config.write_text('[[runs]]\nlr = 1e-9\n[[runs]]\nlr = 0.05\n')
    out = tmp_path / "results"
    code, stdout, err = bench("run", "--config", str(config), *FAST, "--out", str(out))
    assert code == 1 and "1 of 4 job(s) failed" in err
    assert "train baseline: TrainingFailed: baseline: training ended at chance: train accuracy" in err
    runs = {run.spec["lr"]: run for run in Store(out).runs(complete_only=False)}
    assert runs[1e-9].status == "failed" and runs[0.05].status == "complete"
    (reason,) = runs[1e-9].info["errors"]
    assert "training ended at chance" in reason and "<= chance 0.100 (1 of 10 classes) +" in reason
    assert [path.stem for path in (out / "checkpoints").glob("*.pt")] == [runs[0.05].training_hash]
    assert "| baseline" in stdout  # the table of the run that learned


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


def test_madry_trains_at_an_epsilon_inside_the_attack_grid_of_small_datasets(capsys):
    from bench.cli import main
    from bench.datasets.digits import load_digits
    from bench.runner import build_defense
    from bench.spec import RunSpec
    from bench.training import training_defaults

    defense, _ = build_defense(RunSpec("madry"), load_digits(), "cpu")
    assert defense.params.epsilon == 0.1
    assert training_defaults("madry", "mnist")["params"] == {"epsilon": 0.1}
    assert training_defaults("madry", "cifar10")["params"] == {}  # the class default: the CIFAR-10 recipe, 8/255
    defense, _ = build_defense(RunSpec("madry", params={"epsilon": 0.2}), load_digits(), "cpu")
    assert defense.params.epsilon == 0.2  # --param wins
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "on digits: --param epsilon=0.1" in listing and "on mnist: --lr 0.02 --param epsilon=0.1" in listing
