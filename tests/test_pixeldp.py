"""PixelDP: noise calibration, robustness test and radius on hand-computed numbers, sensitivity
control and measurement against the dense matrix, determinism, checkpoints, and the CLI."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.errors import BenchError
from bench.models import build_model
from bench.registry import build_params
from bench.store import Store
from bench.training import TrainConfig
from conftest import FAST
from helpers import float32_sum_tolerance, float64_sum_tolerance
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


def dense_pre_noise(module, shape):
    """The matrix of the linear part of pixels -> pre-noise activations (``module.pre_noise``, or
    the module itself), one row per pixel, in float64 from the stored float32 weights: the exact
    map up to float64 rounding (a float32 pass would add the rounding of the pre(e_i) - pre(0)
    cancellation, about 1e-5)."""
    module = copy.deepcopy(module).double()
    pre = getattr(module, "pre_noise", module)
    n = math.prod(shape)
    with torch.no_grad():
        zero = torch.zeros(1, *shape, dtype=torch.float64)
        rows = pre(torch.eye(n, dtype=torch.float64).view(n, *shape)) - pre(zero)
    return rows.reshape(n, -1)


def dense_tolerance(dense):
    """float64 rounding of ``dense_pre_noise`` and of a norm of it, relative: each entry sums a
    conv window, a bias and the offset (<= one row's length of terms); an SVD or column sum over
    the matrix adds its dimensions. About 1e-12: negligible next to float32 tolerances."""
    return float64_sum_tolerance(2 * sum(dense.shape) + 3)


def parseval_tolerance(conv):
    """float32 rounding of one ``parseval_project`` step, relative to the norm bound it enforces:
    M^T M sums out_ch products per entry, M (M^T M) sums fan-in products, plus the scaling, the
    division by the computed norm, the 1.5 M - 0.5 M M^T M combination and the unscaling (4).
    The SVD's error does not enter to first order: s -> 1.5 s - 0.5 s^3 is flat at s = 1."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return float32_sum_tolerance(conv.out_channels + fan_in + 4)


def l1_normalise_tolerance(conv):
    """float32 rounding of ``l1_normalise``: each input channel's sum of |W| / std has out_ch * kh * kw
    terms, plus the division by std and the division by the sum (2)."""
    return float32_sum_tolerance(conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] + 2)


def power_iteration_tolerance(conv, mean, shape, dense):
    """float32 rounding of one step of ``power_iteration_norm`` (sigma = ||pre(v) - pre(0)|| for a unit
    v), relative to the true norm. Each activation is a fan-in dot product of (v - mean) / std with
    the kernel plus the bias: error <= gamma * (|A| |v| + |A| mean + |b|), the same for pre(0);
    in norm <= gamma * (2 || |A| || (1 + ||mean||) + 2 ||b||) (||v|| = 1), over the true norm ||A||.
    The cancellation against the offset is what makes this larger than gamma itself."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    gamma = float32_sum_tolerance(fan_in + 4)  # + normalisation (2), bias, the final subtraction
    abs_norm = float(torch.linalg.matrix_norm(dense.abs(), ord=2))
    mean_norm = float(torch.as_tensor(mean).expand(1, *shape).norm())
    bias_norm = 0.0 if conv.bias is None else float(conv.bias.detach().norm()) * math.sqrt(dense.shape[1] / conv.out_channels)
    true_norm = float(torch.linalg.matrix_norm(dense, ord=2))
    return gamma * (2 * abs_norm * (1 + mean_norm) + 2 * bias_norm) / true_norm + float32_sum_tolerance(dense.shape[1])


def test_noise_scale_matches_the_paper_formula():
    # sqrt(2 ln(1.25 / 0.05)) * 0.1 / 1 = 2.5373 * 0.1, to the 4 decimals computed by hand
    assert round(noise_scale("gaussian", 0.1, 1.0, 0.05), 4) == 0.2537
    assert noise_scale("laplace", 0.1, 1.0, 0.05) == 0.1  # 1 * 0.1 / 1: exact
    assert round(noise_scale("gaussian", 0.1, 1.0, 0.05, sensitivity=2.0), 4) == 0.5075


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
    # The hand computation rounds three factors to 5-6 digits (relative error <= 5e-6 + 2e-6 + 3e-6)
    # and its result to 6 decimals: within 1e-5 * 0.1447 + 5e-7 < 2e-6.
    assert radius == pytest.approx(0.144712, abs=2e-6)
    # A measured sensitivity of 2 halves every radius (a division by 2: exact).
    assert certified_radius([1.0], [0.0], "gaussian", 0.1, 1.0, 0.05, 2.0)[0] == radius / 2


def test_laplace_radius_closed_form():
    # r = L ln(p_low / p_up) / (2 epsilon) = 0.1 * ln 8 / 2 = 0.103972
    radius = certified_radius([0.8, 0.4], [0.1, 0.5], "laplace", 0.1, 1.0, 0.05)
    assert round(radius[0], 6) == 0.103972 and radius[1] == 0.0  # to the 6 decimals computed by hand


@pytest.mark.parametrize("name, shape", [("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 12, 12)), ("wrn-10-1", (3, 6, 6))])
def test_measured_sensitivity_matches_the_dense_map(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, (0.1,) * shape[0], (0.3,) * shape[0])
    std = model.normalize.std.flatten()
    dense = dense_pre_noise(model, shape)
    exact = dense_tolerance(dense)
    true_l2 = float(torch.linalg.matrix_norm(dense, ord=2))
    upper = conv_l2_upper_bound(model.stem, std, shape)
    # Sound, and useful: the torus bound's slack comes from the border, large on these tiny inputs
    # (about 1.5% on a 28x28 MNIST input, 0 on a Parseval-projected layer).
    assert true_l2 * (1 - exact) <= upper <= 1.1 * true_l2
    # Power iteration approaches the norm from below (50 steps: within 1%), up to float32 rounding.
    measured = power_iteration_norm(model.pre_noise, shape, iterations=50)
    assert 0.99 * true_l2 <= measured <= true_l2 * (1 + power_iteration_tolerance(model.stem, model.normalize.mean, shape, dense))
    # l1 -> l1 norm: the largest absolute column sum of the map (rows here are pixels); the code's
    # value is an upper bound (its own rounding margin), tight to float64 rounding.
    l1 = float(dense.abs().sum(1).max())
    assert l1 * (1 - exact) <= conv_l1_norm(model.stem, std, shape) <= l1 * (1 + 2 * exact)


@pytest.mark.parametrize("name, shape", [("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 12, 12))])
def test_projections_bound_the_whole_pre_noise_map(name, shape):
    torch.manual_seed(1)
    model = build_model(name, shape, 10, (0.1,), (0.3,))
    std = model.normalize.std.flatten()
    parseval_project(model.stem, std)
    # Bounds hold up to the float32 rounding of the projection itself (the norms below are float64).
    tolerance = parseval_tolerance(model.stem)
    # The reshaped kernel on pixels has norm <= 1 / ceil(k/s): the overlap factor is folded in.
    kernel = (model.stem.weight.detach().double() / model.normalize.std.double().flatten()[0]).reshape(32, -1)
    k, s = model.stem.kernel_size[0], model.stem.stride[0]
    assert float(torch.linalg.matrix_norm(kernel, ord=2)) <= (1 + tolerance) / math.ceil(k / s)
    dense = dense_pre_noise(model, shape)
    assert float(torch.linalg.matrix_norm(dense, ord=2)) <= 1 + tolerance + dense_tolerance(dense)
    for _ in range(5):  # more steps pull towards a tight frame: the map's norm gets close to 1
        parseval_project(model.stem, std)
    assert 0.98 <= float(torch.linalg.matrix_norm(dense_pre_noise(model, shape), ord=2)) <= 1 + tolerance + dense_tolerance(dense)
    l1_normalise(model.stem, std)
    dense = dense_pre_noise(model, shape)
    assert float(dense.abs().sum(1).max()) <= 1 + l1_normalise_tolerance(model.stem) + dense_tolerance(dense)


def test_params_are_checked():
    with pytest.raises(BenchError, match="epsilon"):
        build_params(PixelDP.Params, {"epsilon": "2"}, "defense pixeldp")
    with pytest.raises(BenchError, match="gaussian, laplace"):
        build_params(PixelDP.Params, {"mechanism": "cauchy"}, "defense pixeldp")
    params = build_params(PixelDP.Params, {"L": "0.3", "bound": "clopper-pearson", "autoencoder": "true"}, "x")
    assert params.L == 0.3 and params.bound == "clopper-pearson" and params.autoencoder is True


def sensitivity_tolerance(defense):
    """How far float32 rounding may lift a trained defense's sensitivity above 1."""
    if defense.params.noise_at == "input" and not defense.params.autoencoder:
        return 0.0  # the identity: exactly 1
    if defense.params.autoencoder:
        conv, mean, module = defense.autoencoder.first, 0.0, defense.autoencoder.first
    else:
        conv, mean, module = defense.model.stem, defense.model.normalize.mean, defense.model
    if defense.params.mechanism == "laplace":
        return l1_normalise_tolerance(conv) + float64_sum_tolerance(conv.weight.numel() + 1)
    dense = dense_pre_noise(module, defense.shape)
    return parseval_tolerance(conv) + power_iteration_tolerance(conv, mean, defense.shape, dense)


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
    # The certificate's sensitivity covers the measurement, and the projections keep it at 1 up to
    # float32 rounding: theirs, then (l2) the power iteration's.
    assert defense.sensitivity >= defense.sensitivity_measured
    assert defense.sensitivity <= 1 + sensitivity_tolerance(defense)
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
    # Noise after conv1 slows learning: 6 epochs in batches of 16 (about 110 steps) reach 0.5
    # train accuracy; FAST's 2 epochs of 64 stay at chance.
    args = [a for a in FAST if a not in ("--test-size", "60", "--epochs", "2")]
    code, stdout, _ = bench("run", *args, "--epochs", "6", "--batch-size", "16", "--test-size", "40", "--defense", "pixeldp",
                            "--param", "draws=50", "--out", str(tmp_path))
    assert code == 0 and "Certified accuracy" in stdout
    records = Store(tmp_path).records()
    assert len(records) == 40 and records.certified_radius.notna().all() and set(records.certified_norm) == {"l2"}
    assert (records.certified_label == records.prediction).all()
    assert records.certified_radius.max() <= 0.1 * 1.45 / 0.9  # the Gaussian saturation, over sensitivity
