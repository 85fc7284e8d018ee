"""Madry adversarial training: it raises PGD accuracy over the baseline at the training epsilon,
the adversarial fraction and budget are honoured, and the CLI runs it."""
from __future__ import annotations

import pytest
import torch

from bench.attacks.pgd import LinfPGD
from bench.errors import BenchError
from bench.models import build_model
from bench.training import TrainConfig
from conftest import FAST
from helpers import perturbation_tolerance
from bench.defenses.madry import Madry


def test_madry_training_raises_pgd_accuracy_over_the_baseline(digits, digits_baseline):
    # The same data and epochs as the shared baseline (800 images, 6 epochs, seed 0); PGD-3 with
    # step 0.05 spans the 0.1 ball at a third of PGD-5's training cost.
    x, y = digits.x_test[:150], digits.y_test[:150]
    torch.manual_seed(0)
    madry = Madry(build_model("digits-cnn", digits.shape, 10, digits.mean, digits.std),
                  Madry.Params(epsilon=0.1, steps=3, step_size=0.05))
    madry.fit(digits.x_train[:800], digits.y_train[:800], TrainConfig(epochs=6, seed=0))
    pgd = LinfPGD(LinfPGD.Params(steps=20, restarts=1))
    accuracy = {}
    for defense in (digits_baseline, madry):
        torch.manual_seed(0)
        x_adv = pgd.run(defense.attack_model(), x, y, [0.1])[0]
        accuracy[defense.name] = (defense.predict(x_adv) == y).float().mean().item()
    assert accuracy["madry"] > accuracy["baseline"] + 0.1, accuracy


def test_only_the_adversarial_fraction_is_perturbed_within_epsilon():
    torch.manual_seed(0)
    defense = Madry(build_model("digits-cnn", (1, 8, 8), 10, (0.3,), (0.4,)),
                    Madry.Params(epsilon=0.05, adversarial_fraction=0.5))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    mixed = defense.adversarial_batch(x, y)
    assert defense.model.training  # the attack's eval mode is undone
    change = (mixed - x).flatten(1).abs().amax(1)
    assert torch.equal(mixed[4:], x[4:])
    assert (change[:4] > 0).all() and (change <= 0.05 + perturbation_tolerance(0.05, "linf", 64)).all()
    assert mixed.min() >= 0 and mixed.max() <= 1


def test_recipe_defaults_and_bad_parameters():
    defense = Madry(build_model("digits-cnn", (1, 8, 8), 10, (0.3,), (0.4,)))
    assert defense.params.epsilon == 8 / 255 and defense.params.steps == 7
    assert defense.attack.params.abs_stepsize == 2 / 255  # (8 / 255) / 4: a division by 4 is exact
    with pytest.raises(BenchError):
        Madry(build_model("digits-cnn", (1, 8, 8), 10, (0.3,), (0.4,)), Madry.Params(adversarial_fraction=1.5))


def test_cli_end_to_end(bench, tmp_path):
    code, out, err = bench(
        "run", "--defense", "baseline", "--defense", "madry", *FAST, "--attack", "pgd-linf", "--epsilons", "0.05",
        "--param", "madry.norm=l2", "--param", "madry.epsilon=0.5", "--attack-param", "steps=5", "--out", str(tmp_path),
    )
    assert code == 0, err
    assert "madry(" in out and "baseline" in out
