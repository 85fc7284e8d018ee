"""PixelDP: noise calibration, robustness test and radius on hand-computed numbers, sensitivity
control and measurement against the dense matrix, determinism, checkpoints, and the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from bench.errors import BenchError
from bench.models import build_model
from bench.registry import build_params
from bench.store import Store
from bench.training import TrainConfig
from conftest import FAST
from bench.defenses.pixeldp import (
    PixelDP,
    certified_radius,
    conv_l1_norm,
    conv_l2_upper_bound,
    l1_normalise,
    noise_scale,
    parseval_project,
    power_iteration_norm,
    robustness_test,
)


def dense_pre_noise(model, shape):
    """The matrix of the linear part of pixels -> pre-noise activations, one row per pixel."""
    n = math.prod(shape)
    with torch.no_grad():
        rows = model.pre_noise(torch.eye(n).view(n, *shape)) - model.pre_noise(torch.zeros(1, *shape))
    return rows.reshape(n, -1).double()


def test_noise_scale_matches_the_paper_formula():
    # sqrt(2 ln(1.25 / 0.05)) * 0.1 / 1 = 2.5373 * 0.1
    assert noise_scale("gaussian", 0.1, 1.0, 0.05) == pytest.approx(0.2537, abs=1e-4)
    assert noise_scale("laplace", 0.1, 1.0, 0.05) == pytest.approx(0.1)
    assert noise_scale("gaussian", 0.1, 1.0, 0.05, sensitivity=2.0) == pytest.approx(0.5075, abs=1e-4)


def test_robustness_test_just_inside_and_just_outside():
    # epsilon = 1, delta = 0.05: threshold = e^2 * 0.05 + (1 + e) * 0.05 = 0.36945 + 0.18591 = 0.55536
    assert robustness_test(0.556, 0.05, 1.0, 0.05)
    assert not robustness_test(0.555, 0.05, 1.0, 0.05)
    inside, outside = certified_radius([0.556, 0.555], [0.05, 0.05], "gaussian", 0.1, 1.0, 0.05)
    assert inside >= 0.1 > outside > 0.0
    # Not even robust to the measurement error: radius 0.
    assert certified_radius([0.3], [0.3], "gaussian", 0.1, 1.0, 0.05)[0] == 0.0


def test_gaussian_radius_saturates_near_1_44_L():
    # p_low = 1, p_up = 0: epsilon' = min(1, ln((1 - delta') / delta')), which is 1 up to
    # delta' = 1/(1+e) = 0.26894. Grid point 0.268: r = 0.1 * 2.53727 / sqrt(2 ln(1.25/0.268)) = 0.144578;
    # 0.269: epsilon' = ln(0.731/0.269) = 0.99971, r = 0.1 * 0.99971 * 2.53727 / 1.75282 = 0.144712 (the best).
    radius = certified_radius([1.0], [0.0], "gaussian", 0.1, 1.0, 0.05)[0]
    assert radius == pytest.approx(0.144712, abs=2e-6)
    # A measured sensitivity of 2 halves every radius.
    assert certified_radius([1.0], [0.0], "gaussian", 0.1, 1.0, 0.05, 2.0)[0] == pytest.approx(radius / 2)


def test_laplace_radius_closed_form():
    # r = L ln(p_low / p_up) / (2 epsilon) = 0.1 * ln 8 / 2 = 0.103972
    radius = certified_radius([0.8, 0.4], [0.1, 0.5], "laplace", 0.1, 1.0, 0.05)
    assert radius[0] == pytest.approx(0.103972, abs=1e-6) and radius[1] == 0.0


@pytest.mark.parametrize("name, shape", [("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 12, 12)), ("wrn-10-1", (3, 6, 6))])
def test_measured_sensitivity_matches_the_dense_map(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, (0.1,) * shape[0], (0.3,) * shape[0])
    std = model.normalize.std.flatten()
    dense = dense_pre_noise(model, shape)
    true_l2 = float(torch.linalg.matrix_norm(dense, ord=2))
    upper = conv_l2_upper_bound(model.stem, std, shape)
    # Sound, and useful: the torus bound's slack comes from the border, large on these tiny inputs
    # (about 1.5% on a 28x28 MNIST input, 0 on a Parseval-projected layer).
    assert true_l2 <= upper <= 1.1 * true_l2
    # Power iteration approaches the norm from below.
    measured = power_iteration_norm(model.pre_noise, shape, iterations=50)
    assert 0.99 * true_l2 <= measured <= true_l2 * (1 + 1e-6)
    # l1 -> l1 norm: the largest absolute column sum of the map (rows here are pixels).
    assert conv_l1_norm(model.stem, std, shape) == pytest.approx(float(dense.abs().sum(1).max()), rel=1e-6)


@pytest.mark.parametrize("name, shape", [("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 12, 12))])
def test_projections_bound_the_whole_pre_noise_map(name, shape):
    torch.manual_seed(1)
    model = build_model(name, shape, 10, (0.1,), (0.3,))
    std = model.normalize.std.flatten()
    parseval_project(model.stem, std)
    # The reshaped kernel on pixels has norm <= 1 / ceil(k/s): the overlap factor is folded in.
    kernel = (model.stem.weight.detach() / 0.3).reshape(32, -1).double()
    k, s = model.stem.kernel_size[0], model.stem.stride[0]
    assert float(torch.linalg.matrix_norm(kernel, ord=2)) <= 1 / math.ceil(k / s) + 1e-6
    assert float(torch.linalg.matrix_norm(dense_pre_noise(model, shape), ord=2)) <= 1 + 1e-5
    for _ in range(5):  # more steps pull towards a tight frame: the map's norm gets close to 1
        parseval_project(model.stem, std)
    assert float(torch.linalg.matrix_norm(dense_pre_noise(model, shape), ord=2)) == pytest.approx(1.0, abs=0.02)
    l1_normalise(model.stem, std)
    assert float(dense_pre_noise(model, shape).abs().sum(1).max()) <= 1 + 1e-5


def test_params_are_checked():
    with pytest.raises(BenchError, match="epsilon"):
        build_params(PixelDP.Params, {"epsilon": "2"}, "defense pixeldp")
    with pytest.raises(BenchError, match="gaussian, laplace"):
        build_params(PixelDP.Params, {"mechanism": "cauchy"}, "defense pixeldp")
    params = build_params(PixelDP.Params, {"L": "0.3", "bound": "clopper-pearson", "autoencoder": "true"}, "x")
    assert params.L == 0.3 and params.bound == "clopper-pearson" and params.autoencoder is True


def _tiny(params: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("digits-cnn", (1, 8, 8), 3, (0.3,), (0.4,))
    defense = PixelDP(model, build_params(PixelDP.Params, params, "pixeldp"))
    x = torch.rand(48, 1, 8, 8)
    y = (x.mean((1, 2, 3)) * 3).long().clamp(0, 2)
    defense.fit(x, y, TrainConfig(epochs=1, batch_size=16))
    return defense, x


@pytest.mark.parametrize(
    "params, norm",
    [({"draws": "20"}, "l2"), ({"draws": "20", "mechanism": "laplace", "bound": "bernstein"}, "l1"),
     ({"draws": "20", "noise_at": "input", "bound": "clopper-pearson"}, "l2"), ({"draws": "20", "autoencoder": "true"}, "l2")],
)
def test_modes_train_certify_and_survive_a_checkpoint(params, norm, tmp_path):
    defense, x = _tiny(params)
    assert defense.sensitivity <= 1 + 1e-6 and defense.sensitivity >= defense.sensitivity_measured - 1e-6
    torch.manual_seed(3)
    labels, certificate = defense.evaluate(x[:5])
    assert certificate.norm == norm and torch.equal(certificate.label, labels) and (certificate.radius >= 0).all()
    # The attack model is differentiable and draws fresh noise per call.
    module = defense.attack_model()
    inputs = x[:2].clone().requires_grad_(True)
    module(inputs).sum().backward()
    assert inputs.grad is not None and not torch.equal(module(x[:2]), module(x[:2]))
    # Checkpoints hold only tensors/plain values (the runner loads them with weights_only=True).
    torch.save(defense.state_dict(), tmp_path / "c.pt")
    restored = PixelDP(build_model("digits-cnn", (1, 8, 8), 3, (0.3,), (0.4,)), defense.params)
    restored.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    torch.manual_seed(3)
    labels_again, certificate_again = restored.evaluate(x[:5])
    assert torch.equal(labels, labels_again) and torch.equal(certificate.radius, certificate_again.radius)


def test_certification_is_deterministic_with_a_seed_and_shares_draws_with_prediction():
    defense, x = _tiny({"draws": "30"})
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        results.append(defense.evaluate(x[:6]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1].radius, results[1][1].radius)
    torch.manual_seed(7)
    mean = defense.expected_scores(x[:6])[0]
    assert torch.equal(torch.from_numpy(mean.argmax(1)), results[0][0])


def test_autoencoder_loads_a_stored_classifier_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = build_model("digits-cnn", (1, 8, 8), 3, (0.3,), (0.4,))
    torch.save({"model": classifier.state_dict()}, tmp_path / "baseline.pt")
    model = build_model("digits-cnn", (1, 8, 8), 3, (0.3,), (0.4,))
    params = build_params(PixelDP.Params, {"autoencoder": "true", "classifier_checkpoint": str(tmp_path / "baseline.pt")}, "p")
    defense = PixelDP(model, params)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    defense.fit(x, y, TrainConfig(epochs=1, batch_size=16))
    # The classifier is frozen: its weights are the checkpoint's.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), classifier.state_dict().values()))
    params.classifier_checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(BenchError, match="does not exist"):
        PixelDP(build_model("digits-cnn", (1, 8, 8), 3, (0.3,), (0.4,)), params).fit(x, y, TrainConfig(epochs=1))


def test_cli_run_stores_certified_records(bench, tmp_path):
    args = [a for a in FAST if a not in ("--test-size", "60")]
    code, stdout, _ = bench("run", *args, "--test-size", "40", "--defense", "pixeldp", "--param", "draws=50",
                            "--out", str(tmp_path))
    assert code == 0 and "Certified accuracy" in stdout
    records = Store(tmp_path).records()
    assert len(records) == 40 and records.certified_radius.notna().all() and set(records.certified_norm) == {"l2"}
    assert (records.certified_label == records.prediction).all()
    assert records.certified_radius.max() <= 0.1 * 1.45 / 0.9  # the Gaussian saturation, over sensitivity
