"""Randomized smoothing: CERTIFY's radius and PREDICT's test on given counts against scipy, the
noise model, a trained model's certificates, and the CLI."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import beta, binomtest, norm

from bench.models import build_model
from bench.registry import DATASETS
from bench.training import TrainConfig
from conftest import FAST
from helpers import float32_sum_tolerance
from bench.defenses.base import ABSTAIN
from bench.defenses.smoothing import Smoothing, smoothing_radius


def make(**params) -> Smoothing:
    torch.manual_seed(0)
    return Smoothing(build_model("digits-cnn", (1, 8, 8), 10, (0.3,), (0.4,)), Smoothing.Params(**params))


@pytest.mark.parametrize("count", [1000, 990, 900, 700, 520])
def test_radius_is_sigma_times_inverse_normal_of_clopper_pearson(count):
    n, sigma, alpha = 1000, 0.25, 0.001
    lower = beta.ppf(alpha, count, n - count + 1)  # one-sided Clopper-Pearson, computed here
    expected = sigma * norm.ppf(lower) if lower > 0.5 else 0.0
    assert smoothing_radius(count, n, sigma, alpha) == expected  # the same scipy calls on the same numbers


def test_certify_abstains_when_the_lower_bound_is_at_most_one_half():
    defense = make(n=1000, n0=10, alpha=0.001, sigma=0.5)
    selection = torch.tensor([[0, 10, 0], [9, 1, 0], [0, 0, 10]])
    estimation = torch.tensor([[0, 1000, 0], [400, 600, 0], [0, 480, 520]])
    certificate = defense.certify_from_counts(selection, estimation)
    assert certificate.norm == "l2"
    assert certificate.label.tolist() == [1, ABSTAIN, ABSTAIN]
    assert certificate.radius[0].item() == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 1000)), rel=1e-6)
    assert certificate.radius[1:].tolist() == [0.0, 0.0]


def test_predict_uses_a_binomial_test_between_the_top_two():
    defense = make(alpha=0.001)
    counts = torch.tensor([[5, 90, 5], [0, 52, 48], [40, 0, 60]])
    labels = defense.predict_from_counts(counts).tolist()
    assert labels[0] == 1 and binomtest(90, 95, 0.5).pvalue <= 0.001
    assert labels[1] == ABSTAIN and binomtest(52, 100, 0.5).pvalue > 0.001
    assert labels[2] == ABSTAIN


def test_noise_is_fresh_on_every_call_and_counts_add_up():
    defense = make(draw_batch=64)
    x = torch.rand(3, 1, 8, 8)
    noisy = defense.attack_model()
    assert not torch.equal(noisy(x), noisy(x))
    counts = defense.counts(x, 150)  # 150 draws in passes of 64: uneven chunks
    assert counts.shape == (3, 10) and counts.sum(1).tolist() == [150, 150, 150]


def test_gaussian_augmentation_training_gives_correct_certificates():
    data = DATASETS.get("digits")()
    defense = make(sigma=0.25, n0=20, n=200)
    torch.manual_seed(0)
    defense.fit(data.x_train, data.y_train, TrainConfig(epochs=6))
    x, y = data.x_test[:40], data.y_test[:40]
    predictions, certificate = defense.evaluate(x)
    certified = certificate.label != ABSTAIN
    assert certified.float().mean() > 0.6
    assert (certificate.label[certified] == y[certified]).float().mean() > 0.9
    # n = 200, alpha = 0.001 caps the radius at sigma * Phi^-1(0.001^(1/200)).
    # Radii are stored in float32: one rounding (relative); scipy's float64 inversion errs far less.
    assert certificate.radius.max() <= 0.25 * norm.ppf(0.001 ** (1 / 200)) * (1 + float32_sum_tolerance(1))
    assert (predictions[predictions != ABSTAIN] == y[predictions != ABSTAIN]).float().mean() > 0.9


def test_cli_end_to_end(bench, tmp_path):
    code, out, err = bench(
        "run", "--defense", "smoothing", *FAST, "--attack", "pgd-l2", "--epsilons", "0.5", "--eot-draws", "2",
        "--attack-param", "steps=5", "--param", "n=100", "--param", "n0=10", "--out", str(tmp_path),
    )
    assert code == 0, err
    assert "smoothing" in out and "Certified accuracy" in out
