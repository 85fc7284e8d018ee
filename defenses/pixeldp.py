"""PixelDP (Lecuyer et al., S&P 2019): a noise layer makes the network's expected scores
(epsilon, delta)-differentially private with respect to L_p changes of the input of size L, and
the DP stability bound (Proposition 1) turns Monte Carlo estimates of those scores into a
certified radius.

Structure of the noisy network, in every mode::

    x in [0,1] --pre--> h --(+ noise)--> post --> logits

- ``noise_at=conv1``: ``pre`` is the model's normalisation and first layer, ``post`` its body;
- ``noise_at=input``: ``pre`` is the identity (noise on the image), ``post`` the whole model;
- ``autoencoder=true``: ``pre`` is the first layer of a small auto-encoder, ``post`` the rest of
  the auto-encoder followed by a frozen, normally trained classifier.

The noise is calibrated for a pre-noise sensitivity of 1 (Gaussian sigma =
sqrt(2 ln(1.25/delta)) L / epsilon, Laplace scale L / epsilon). Training keeps the sensitivity
near or below 1 with a cheap projection after every step; after training the operator norm of
the whole pre-noise map (pixels -> pre-noise activations, normalisation included) is bounded
from above and every certified radius is divided by that bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError
from bench.models import ZooModel
from bench.registry import DEFENSES
from bench.checkpoint import load_into
from bench.progress import progress
from bench.training import TrainConfig, batches, train_classifier
from bench.defenses.base import Certificate, Defense
from bench.confidence import bernstein_bounds, clopper_pearson_bounds, hoeffding_bounds

# Parseval retraction step (Cisse et al. 2017). With beta = 0.5 and the spectral norm capped at 1
# first, one step maps every singular value s in [0, 1] to 1.5 s - 0.5 s^3, still in [0, 1]: the
# bound holds after every step and the layer is pulled towards a tight frame (best signal/noise).
PARSEVAL_BETA = 0.5
# The reference code's search grid over delta' for the Gaussian radius (robustness.py).
DELTA_GRID = np.arange(0.001, 0.3, 0.001)


# -- the mechanism ----------------------------------------------------------------------------
def gaussian_multiplier(delta: float | np.ndarray) -> float | np.ndarray:
    """sqrt(2 ln(1.25 / delta)): the Gaussian mechanism's sigma per unit of sensitivity/epsilon."""
    return np.sqrt(2.0 * np.log(1.25 / delta))


def noise_scale(mechanism: str, L: float, epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Standard deviation (Gaussian) or scale b (Laplace) of the noise for attack size ``L``."""
    if mechanism == "gaussian":
        return float(gaussian_multiplier(delta) * sensitivity * L / epsilon)
    if mechanism == "laplace":
        return float(sensitivity * L / epsilon)
    raise ValueError(f"unknown mechanism {mechanism!r}")


# -- robustness test and certified radius --------------------------------------------------------
def robustness_test(p_lower: Any, p_upper: Any, epsilon: float, delta: float) -> np.ndarray:
    """Proposition 1: the prediction is robust to attacks of the size the (epsilon, delta)
    guarantee covers when E_low(top) > e^(2 epsilon) E_up(runner-up) + (1 + e^epsilon) delta."""
    p_lower, p_upper = np.asarray(p_lower, np.float64), np.asarray(p_upper, np.float64)
    return p_lower > math.exp(2 * epsilon) * p_upper + (1 + math.exp(epsilon)) * delta


def certified_radius(
    p_lower: Any, p_upper: Any, mechanism: str, L: float, epsilon: float, delta: float, sensitivity: float = 1.0
) -> np.ndarray:
    """The largest attack size (in the mechanism's norm, pixel units) for which the robustness
    test passes, given bounds on the top score and on the best other score.

    The noise is fixed by the construction (L, epsilon, delta). A smaller or larger attack r is
    covered by other guarantees of the same noise:

    - Laplace (pure DP): the noise is (epsilon r / L)-DP at size r, so the test
      p_low > e^(2 epsilon r / L) p_up gives r = L ln(p_low / p_up) / (2 epsilon);
    - Gaussian: the noise is (epsilon', delta')-DP at size r = L (epsilon' / epsilon)
      sqrt(2 ln(1.25/delta)) / sqrt(2 ln(1.25/delta')) for any epsilon' <= 1. As the reference
      code, search delta' over a grid (0.001 .. 0.299, plus delta itself); for each delta' the
      largest passing epsilon' solves p_up t^2 + delta' t + delta' - p_low = 0 for t = e^epsilon'
      (the test is monotone in epsilon'), which replaces the reference's bisection.

    The radius is divided by the measured pre-noise ``sensitivity``: a change of r in pixels
    moves the pre-noise activations by at most sensitivity * r. 0 where nothing is certified.
    """
    p_lower = np.atleast_1d(np.asarray(p_lower, np.float64))
    p_upper = np.atleast_1d(np.asarray(p_upper, np.float64))
    if mechanism == "laplace":
        with np.errstate(divide="ignore"):
            ratio = np.log(np.maximum(p_lower, 1e-300) / np.maximum(p_upper, 1e-300))
        radius = np.where(p_lower > p_upper, L * ratio / (2 * epsilon), 0.0)
    elif mechanism == "gaussian":
        deltas = np.union1d(DELTA_GRID, [delta])[None, :]
        low, up = p_lower[:, None], p_upper[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            disc = deltas**2 - 4 * up * (deltas - low)
            t_quad = (-deltas + np.sqrt(np.maximum(disc, 0.0))) / (2 * up)
            t_lin = (low - deltas) / deltas
            t = np.where(up > 0, t_quad, t_lin)
            eps_prime = np.minimum(np.log(np.where(t > 1, t, 1.0)), 1.0)
        sizes = L * (eps_prime / epsilon) * gaussian_multiplier(delta) / gaussian_multiplier(deltas)
        radius = np.where(eps_prime > 0, sizes, 0.0).max(axis=1)
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}")
    return radius / sensitivity


def score_bounds(
    mean: np.ndarray, mean_sq: np.ndarray, votes: np.ndarray, draws: int, eta: float, bound: str, top: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lower bound on the ``top`` class's expected score, upper bound on the best other class's.

    Softmax scores with Hoeffding or empirical Bernstein; argmax votes with Clopper-Pearson.
    Bonferroni over 2k one-sided bounds (k classes, both sides): the top class is picked from
    the same draws, so every class's lower and upper bounds must hold at once. (The reference
    code corrects for k only.)
    """
    classes = mean.shape[1]
    if bound == "hoeffding":
        lower, upper = hoeffding_bounds(mean, draws, eta, 2 * classes)
    elif bound == "bernstein":
        lower, upper = bernstein_bounds(mean, mean_sq, draws, eta, 2 * classes)
    elif bound == "clopper-pearson":
        lower, upper = clopper_pearson_bounds(votes, draws, eta, 2 * classes)
    else:
        raise ValueError(f"unknown bound {bound!r}")
    rows = np.arange(len(top))
    top_lower = lower[rows, top]
    others = upper.copy()
    others[rows, top] = -np.inf
    return top_lower, others.max(axis=1)


# -- sensitivity of the pre-noise map -------------------------------------------------------------
def rounding_margin(n_terms: int, dtype: torch.dtype) -> float:
    """Rounding error bound of a sum of ``n_terms`` terms in ``dtype``, in any order, relative to
    the sum of the terms' absolute values: gamma_n = n u / (1 - n u) <= n * eps, u = eps / 2
    (Higham, section 3.1). For non-negative terms (a column sum of |A|) that is relative to the
    result: multiplying the computed sum by (1 + margin) makes it an upper bound of the exact one."""
    return n_terms * torch.finfo(dtype).eps


def _weight_on_pixels(conv: nn.Conv2d, std: torch.Tensor) -> torch.Tensor:
    """The conv's kernel acting on [0,1] pixels: normalisation divides channel c by std_c."""
    return conv.weight.detach().double() / std.detach().double().view(1, -1, 1, 1)


def _check_plain_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise BenchError("pixeldp noise_at=conv1 needs a plain Conv2d first layer (groups=1, no dilation)")


def conv_l2_upper_bound(conv: nn.Conv2d, std: torch.Tensor, input_shape: tuple[int, int, int]) -> float:
    """A proven upper bound on the l2 operator norm of pixels -> conv(normalised pixels).

    Soundness: a stride-s, zero-padded conv equals a stride-1 conv on the space-to-depth
    rearrangement of the padded input (s*s*C channels, kernel ceil(k/s)); rearranging and
    zero-padding is an isometric embedding of the input, and its outputs are a subset of the
    outputs of the circular (torus) convolution whose nonzero taps never wrap around. Dropping
    outputs cannot increase the norm, and the circular convolution's norm is exactly the largest
    singular value over frequencies of the DFT of its kernel (block-diagonalisation), computed
    here in float64. So the returned value is >= the true norm (Sedghi et al. 2019 for the
    circular case); on MNIST's 28x28 input it is within a few percent of the power iteration.
    """
    _check_plain_conv(conv)
    weight = _weight_on_pixels(conv, std)
    out_ch, in_ch, kh, kw = weight.shape
    sh, sw = conv.stride
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    if conv.padding == "same":
        ph, pw = kh // 2, kw // 2
    qh, qw = math.ceil(kh / sh), math.ceil(kw / sw)
    weight = F.pad(weight, (0, qw * sw - kw, 0, qh * sh - kh))
    # weight[o, c, sh*a1 + a0, sw*b1 + b0] -> poly[o, (c, a0, b0), a1, b1]
    poly = weight.view(out_ch, in_ch, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4).reshape(out_ch, -1, qh, qw)
    _, height, width = input_shape
    nh = max(math.ceil((height + 2 * ph) / sh), qh)
    nw = max(math.ceil((width + 2 * pw) / sw), qw)
    spectrum = torch.fft.fft2(poly, s=(nh, nw)).permute(2, 3, 0, 1)
    norm = float(torch.linalg.matrix_norm(spectrum, ord=2).max())
    # Rounding of this float64 computation, relative to the result: the transform (length nh * nw,
    # an FFT errs no more than a direct sum) errs by (1 + nh * nw) eps relative to the sum of |taps|,
    # which exceeds the largest spectral norm by at most sqrt(taps * rank) <= out_ch + columns
    # (Parseval); the SVD of each out_ch x columns matrix adds (out_ch + columns) eps (LAPACK).
    columns = poly.shape[1]
    return norm * (1 + rounding_margin((2 + nh * nw) * (out_ch + columns), torch.float64))


def conv_l1_norm(conv: nn.Conv2d, std: torch.Tensor, input_shape: tuple[int, int, int]) -> float:
    """The exact l1 -> l1 operator norm of pixels -> conv(normalised pixels): the largest column
    sum of |A|, i.e. max of |A|^T 1, obtained as the gradient of sum(conv_|W|(x))."""
    _check_plain_conv(conv)
    weight = _weight_on_pixels(conv, std).abs()
    x = torch.zeros(1, *input_shape, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x, weight, None, conv.stride, conv.padding)
    (column_sums,) = torch.autograd.grad(out.sum(), x)
    # Rounding: one division by std, then a pixel's column sum adds at most out_ch * kh * kw terms.
    out_ch, _, kh, kw = weight.shape
    return float(column_sums.max()) * (1 + rounding_margin(1 + out_ch * kh * kw, torch.float64))


def power_iteration_norm(
    pre: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...], iterations: int = 30, seed: int = 0
) -> float:
    """l2 operator norm of the linear part of ``pre`` (x -> pre(x) - pre(0)) by power iteration
    on A^T A, with A^T from autograd. A LOWER bound (it converges from below); used as the
    measurement the upper bound is checked against, and for stems without a proven bound."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, *input_shape, generator=generator)
    v = v / v.norm()
    zero = torch.zeros(1, *input_shape)
    with torch.no_grad():
        offset = pre(zero)
    sigma = 0.0
    for _ in range(iterations):
        v = v.detach().requires_grad_(True)
        out = pre(v) - offset
        sigma = float(out.detach().norm())
        (grad,) = torch.autograd.grad(out, v, grad_outputs=out.detach())
        v = grad / grad.norm().clamp_min(1e-30)
    return sigma


# -- sensitivity control during training -------------------------------------------------------
@torch.no_grad()
def parseval_project(conv: nn.Conv2d, std: torch.Tensor, beta: float = PARSEVAL_BETA) -> None:
    """One Parseval step on the effective kernel matrix M = ceil(k/s) W diag(1/std).

    ||pixels -> conv(normalised pixels)||_2 <= ceil(k/s) * ||W diag(1/std)||_2 (a sum of
    ceil(k/s)^2 shifted copies of the reshaped kernel), so keeping ||M||_2 <= 1 keeps the real map's
    norm <= 1. Folding 1/std and the overlap factor into M is what makes the trained map's norm
    close to 1 rather than 2-3 (the reference code divides by ceil(k/s) but ignores std). The cap
    costs one small SVD per step.
    """
    weight = conv.weight
    gain = math.ceil(weight.shape[2] / conv.stride[0]) * math.ceil(weight.shape[3] / conv.stride[1])
    scale = math.sqrt(gain) / std.view(1, -1, 1, 1)
    m = (weight * scale).reshape(weight.shape[0], -1)
    m = m / torch.linalg.matrix_norm(m, ord=2).clamp_min(1.0)
    m = (1 + beta) * m - beta * m @ (m.T @ m)
    weight.copy_(m.view_as(weight) / scale)


@torch.no_grad()
def l1_normalise(conv: nn.Conv2d, std: torch.Tensor) -> None:
    """Column normalisation: per input channel, sum |W[:, c]| / std_c = 1. Every pixel meets each
    kernel weight at most once, so the l1 -> l1 norm of the map is <= 1."""
    weight = conv.weight
    sums = (weight.abs() / std.view(1, -1, 1, 1)).sum(dim=(0, 2, 3), keepdim=True)
    weight.div_(sums.clamp_min(1e-12))


# -- the noisy network -----------------------------------------------------------------------------
class NoisyNet(nn.Module):
    """images -> pre -> + fresh noise (per example, per call) -> post -> logits. Differentiable."""

    def __init__(self, pre: Callable[[torch.Tensor], torch.Tensor], post: nn.Module, mechanism: str, scale: float,
                 parts: list[nn.Module]):
        super().__init__()
        self.pre_fn = pre
        self.post = post
        self.mechanism = mechanism
        self.scale = scale
        self.parts = nn.ModuleList(parts)  # so .eval()/.to() reach every module involved

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_fn(x)

    def add_noise(self, h: torch.Tensor) -> torch.Tensor:
        if self.mechanism == "gaussian":
            return h + self.scale * torch.randn_like(h)
        # Laplace(0, b) as b * (Exp(1) - Exp(1)), from torch's global generator (seeded runs).
        e = torch.empty((2,) + h.shape, dtype=h.dtype, device=h.device).exponential_()
        return h + self.scale * (e[0] - e[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.add_noise(self.pre(x)))


class AutoEncoder(nn.Module):
    """A small convolutional auto-encoder; PixelDP noise goes after its first (strided) conv."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.first = nn.Conv2d(channels, width, 5, stride=2, padding=2)
        self.rest = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
        )

    def decode(self, h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.rest(h)[..., : size[0], : size[1]]
        if out.shape[-2:] != size:  # odd sizes: the transpose conv comes out one pixel short
            out = F.interpolate(out, size=size, mode="nearest")
        return torch.sigmoid(out)


class _Decoded(nn.Module):
    """post-noise part of auto-encoder mode: decode, then the frozen classifier."""

    def __init__(self, autoencoder: AutoEncoder, classifier: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.autoencoder = autoencoder
        self.classifier = classifier
        self.size = size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.autoencoder.decode(h, self.size))


@DEFENSES.register("pixeldp")
class PixelDP(Defense):
    """PixelDP: DP noise layer + certified radius from the expected softmax (Lecuyer et al. 2019)."""

    randomized = True
    certifies = True
    images_per_group = 32  # pre-noise activations computed once per image, for this many at a time

    @dataclass
    class Params:
        L: float = 0.1  # construction attack bound, in the mechanism's norm, [0,1] pixel units
        epsilon: float = 1.0
        delta: float = 0.05  # unused by the Laplace mechanism (pure DP)
        mechanism: Literal["gaussian", "laplace"] = "gaussian"  # l2 / l1 certificates
        noise_at: Literal["conv1", "input"] = "conv1"  # ignored with autoencoder=true
        draws: int = 300  # noise draws per image for prediction and certification
        eta: float = 0.05  # certificates hold with probability >= 1 - eta
        # Empirical Bernstein by default: with 300 draws Hoeffding's bounds are +-0.1 wide, too wide to
        # pass the test at L even for a certain prediction (0.9 > e^2 * 0.1 + (1 + e) * 0.05 fails).
        bound: Literal["hoeffding", "bernstein", "clopper-pearson"] = "bernstein"
        autoencoder: bool = False  # noise inside an auto-encoder put in front of a frozen classifier
        classifier_checkpoint: str | None = None  # a baseline .pt (results/checkpoints); else trained first

        def check(self) -> None:
            if not self.L > 0:
                raise BenchError(f"pixeldp parameter L={self.L} must be positive")
            if not 0 < self.epsilon <= (1 if self.mechanism == "gaussian" else math.inf):
                raise BenchError(f"pixeldp parameter epsilon={self.epsilon} must be in (0, 1] for the Gaussian mechanism and positive for Laplace")
            if not 0 < self.delta < 1:
                raise BenchError(f"pixeldp parameter delta={self.delta} must be in (0, 1)")
            if self.draws < 2:
                raise BenchError(f"pixeldp parameter draws={self.draws} must be at least 2")
            if not 0 < self.eta < 1:
                raise BenchError(f"pixeldp parameter eta={self.eta} must be in (0, 1)")
            if self.classifier_checkpoint and not self.autoencoder:
                raise BenchError("pixeldp parameter classifier_checkpoint needs autoencoder=true")

    params: Params  # this defense's parameters (``Defense.params``)

    @classmethod
    def training_cost(cls, params: Params) -> float:
        return 2.0 if params.autoencoder else 1.0  # the classifier first, then the auto-encoder

    @classmethod
    def check_model(cls, model: nn.Module, params: Params) -> None:
        # Noise after conv1 needs the model split at its first layer, whose sensitivity is bounded
        # (Parseval step, measured operator norm): only the zoo's normalize -> stem -> body has that.
        if not params.autoencoder and params.noise_at == "conv1" and not isinstance(model, ZooModel):
            raise BenchError(
                "pixeldp noise_at=conv1 puts the noise after the model's first layer and bounds that layer's "
                "sensitivity, which needs a zoo model (normalize, stem, body); around an outside model use "
                "autoencoder=true (noise in an auto-encoder before your frozen classifier) or noise_at=input"
            )

    def __init__(self, model: nn.Module, params: Params | None = None, device: str = "cpu"):
        super().__init__(model, params, device)
        p = self.params
        self.scale = noise_scale(p.mechanism, p.L, p.epsilon, p.delta)
        self.norm = "l2" if p.mechanism == "gaussian" else "l1"
        self.autoencoder: AutoEncoder | None = None
        self.sensitivity: float | None = None  # sound upper bound used by certificates
        self.sensitivity_measured: float | None = None  # power iteration (lower bound), for the record
        self.net: NoisyNet | None = None

    # -- the network -----------------------------------------------------------------------------
    def _build(self, shape: tuple[int, int, int]) -> NoisyNet:
        p = self.params
        if p.autoencoder:
            if self.autoencoder is None:
                self.autoencoder = AutoEncoder(shape[0]).to(self.device)
            post = _Decoded(self.autoencoder, self.model, shape[1:])
            self.net = NoisyNet(self.autoencoder.first, post, p.mechanism, self.scale, [self.autoencoder, self.model])
        elif p.noise_at == "conv1":
            self.net = NoisyNet(self.model.pre_noise, self.model.body, p.mechanism, self.scale, [self.model])
        else:
            self.net = NoisyNet(nn.Identity(), self.model, p.mechanism, self.scale, [self.model])
        self.shape = shape
        return self.net

    def _sensitivity_layer(self) -> tuple[nn.Conv2d, torch.Tensor] | None:
        """The pre-noise conv and the std it sees pixels divided by; None for noise on the input."""
        if self.params.autoencoder:
            return self.autoencoder.first, torch.ones(self.shape[0], device=self.device)
        if self.params.noise_at == "conv1":
            _check_plain_conv(self.model.stem)
            return self.model.stem, self.model.normalize.std.flatten()
        return None

    # -- training --------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
        """Train with fresh noise per example and step; then measure the pre-noise sensitivity."""
        net = self._build(tuple(x.shape[1:]))
        layer = self._sensitivity_layer()
        if layer is not None:
            self.after_step()  # start inside the constraint set
        if self.params.autoencoder:
            self._prepare_classifier(x, y, config)
            train_classifier(self.autoencoder.parameters(), [self.autoencoder], x, y, config,
                             self.training_loss, self.after_step, desc="pixeldp-autoencoder")
        else:
            train_classifier(self.model.parameters(), [self.model], x, y, config,
                             self.training_loss, self.after_step, desc=self.name)
        net.eval()
        self.measure_sensitivity()

    def _prepare_classifier(self, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
        path = self.params.classifier_checkpoint
        if path:
            load_into(self.model, path, "pixeldp classifier_checkpoint", "this model", self.device)
        elif self.pretrained:
            pass  # an outside classifier arrived trained (bench.wrap): it stays as it is, frozen
        else:
            train_classifier(self.model.parameters(), [self.model], x, y, config,
                             lambda a, b: F.cross_entropy(self.model(a), b), desc="pixeldp-classifier")
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.params.autoencoder:
            return F.cross_entropy(self.net(x), y)
        # Auto-encoder: classify through the frozen classifier, and reconstruct the clean image.
        h = self.net.add_noise(self.autoencoder.first(x))
        decoded = self.autoencoder.decode(h, x.shape[-2:])
        return F.cross_entropy(self.model(decoded), y) + F.mse_loss(decoded, x)

    def after_step(self) -> None:
        layer = self._sensitivity_layer()
        if layer is None:
            return
        conv, std = layer
        if self.params.mechanism == "gaussian":
            parseval_project(conv, std)
        else:
            l1_normalise(conv, std)

    def measure_sensitivity(self) -> float:
        """Bound the operator norm of pixels -> pre-noise activations, in the mechanism's norm."""
        layer = self._sensitivity_layer()
        if layer is None:
            self.sensitivity = self.sensitivity_measured = 1.0  # the identity
        elif self.norm == "l1":
            self.sensitivity = self.sensitivity_measured = conv_l1_norm(*layer, self.shape)
        else:
            with torch.enable_grad():
                self.sensitivity_measured = power_iteration_norm(self.net.pre, self.shape)
            # The proven bound; the max only guards against an unexpected stem that breaks its proof.
            self.sensitivity = max(conv_l2_upper_bound(*layer, self.shape), self.sensitivity_measured)
        return self.sensitivity

    # -- inference -------------------------------------------------------------------------------
    def attack_model(self) -> nn.Module:
        if self.net is None:
            raise BenchError("pixeldp must be trained (fit) or loaded before it is attacked")
        return self.net

    @torch.no_grad()
    def expected_scores(self, x: torch.Tensor, draws: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean softmax, mean squared softmax and argmax votes over ``draws`` noise draws per image.

        The pre-noise activations are computed once per image; the (image, draw) rows then go
        through the post-noise layers in chunks of ``eval_batch_size`` rows (128 by default: the
        fastest on CPU; ``bench perf`` measures this loop within a few percent of its floor).
        """
        draws = draws or self.params.draws
        net = self.attack_model().eval()
        means, squares, votes = [], [], []
        for group in progress(batches(len(x), self.images_per_group), f"pixeldp {draws} draws per image", unit="group"):
            h = net.pre(x[group].to(self.device))
            rows = len(group) * draws
            chunks = []
            for start in range(0, rows, self.eval_batch_size):
                owner = torch.arange(start, min(start + self.eval_batch_size, rows), device=self.device) // draws
                chunks.append(F.softmax(net.post(net.add_noise(h[owner])), dim=1).double().cpu())
            probs = torch.cat(chunks).view(len(group), draws, -1)  # rows are image-major
            means.append(probs.mean(1))
            squares.append((probs**2).mean(1))
            votes.append(F.one_hot(probs.argmax(2), probs.shape[2]).sum(1).double())
        return torch.cat(means).numpy(), torch.cat(squares).numpy(), torch.cat(votes).numpy()

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, Certificate]:
        """Prediction = argmax of the expected softmax; certificate from the SAME draws.

        With ``bound=clopper-pearson`` the certified scorer is the expected argmax (vote
        frequencies), so the prediction is the majority vote there, to certify what is predicted.

        The reference code (models/evaluate.py) also computes both from one set of draws. That is
        sound here because the confidence bounds hold for all classes at once (Bonferroni over
        both sides of every class), so picking the top class from these draws does not bias them.
        The certificate's label is the prediction; a point where the test fails is not certified.
        The guarantee holds with probability at least 1 - eta over the draws.
        """
        p = self.params
        mean, mean_sq, votes = self.expected_scores(x)
        top = (votes if p.bound == "clopper-pearson" else mean).argmax(axis=1)
        lower, upper = score_bounds(mean, mean_sq, votes, p.draws, p.eta, p.bound, top)
        if self.sensitivity is None:
            self.measure_sensitivity()
        radius = certified_radius(lower, upper, p.mechanism, p.L, p.epsilon, p.delta, self.sensitivity)
        labels = torch.from_numpy(top).long()
        certificate = Certificate(labels.clone(), torch.from_numpy(radius).float(), self.norm, confidence=1 - p.eta)
        return labels, certificate

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x)[0]

    def certify(self, x: torch.Tensor) -> Certificate:
        return self.evaluate(x)[1]

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "shape": torch.tensor(self.shape),
            "sensitivity": torch.tensor(self.sensitivity, dtype=torch.float64),
            "sensitivity_measured": torch.tensor(self.sensitivity_measured, dtype=torch.float64),
        }
        if self.autoencoder is not None:
            state["autoencoder"] = self.autoencoder.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build(tuple(int(s) for s in state["shape"]))
        self.model.load_state_dict(state["model"])
        if self.autoencoder is not None:
            self.autoencoder.load_state_dict(state["autoencoder"])
        self.sensitivity = float(state["sensitivity"])
        self.sensitivity_measured = float(state["sensitivity_measured"])
        self.net.eval()
