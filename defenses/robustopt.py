"""RobustOpt (Wong & Kolter 2018): training on, and certification with, the dual network of the
convex outer adversarial polytope, through the authors' own package ``convex-adversarial``."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError
from bench.registry import DEFENSES
from bench.progress import progress
from bench.training import TrainConfig, batches
from bench.types import Norm
from bench.defenses.base import Certificate, Defense

# The library's dual layers for exactly these modules; anything else (BatchNorm, residual blocks,
# pooling) is refused with one line rather than certified wrongly.
SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)


def _import_convex_adversarial():
    try:
        import convex_adversarial
    except ImportError:
        raise BenchError("defense robustopt needs convex-adversarial; pip install convex-adversarial==0.4.4") from None
    return convex_adversarial


def _exact_conv(conv: nn.Conv2d, size: tuple[int, int]) -> list[nn.Module]:
    """``conv`` as layers whose transposes convex-adversarial gets right.

    The library transposes a convolution without ``output_padding``, so it fails where the stride
    leaves a remainder (3x3/2 pad 1 on 8x8, 5x5/2 pad 2 on 28x28): there the last padding row and
    column are never read. Such a conv equals an asymmetric zero padding (a fixed one-hot conv)
    followed by the same weights without padding.
    """
    remainders = [(n + 2 * p - k) % s for n, p, k, s in zip(size, conv.padding, conv.kernel_size, conv.stride)]
    if not any(remainders):
        return [conv]
    channels = conv.in_channels
    pad = nn.Conv2d(channels, channels, [r + 1 for r in remainders], padding=conv.padding)
    pad.weight.data = torch.zeros_like(pad.weight)
    pad.weight.data[range(channels), range(channels), 0, 0] = 1.0  # output (i, j) = padded input (i, j)
    pad.bias.data = torch.zeros_like(pad.bias)
    pad.requires_grad_(False)
    unpadded = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, stride=conv.stride)
    unpadded.weight, unpadded.bias = conv.weight, conv.bias  # shared: training updates the zoo model
    return [pad.to(conv.weight.device), unpadded]


def _bounded_layers(model: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """The layers the dual network walks, and the zoo model's normalisation (None for an outside
    ``nn.Sequential``, whose inputs are the [0,1] pixels themselves)."""
    if all(hasattr(model, name) for name in ("normalize", "stem", "body")):
        body = list(model.body) if isinstance(model.body, nn.Sequential) else [model.body]
        layers, normalize = [model.stem, *body], model.normalize
    elif isinstance(model, nn.Sequential):
        layers, normalize = list(model), None
    else:
        raise BenchError(
            f"robustopt bounds the network layer by layer (convex-adversarial's dual network): it needs a zoo "
            f"model or an nn.Sequential of Conv2d/Linear/ReLU/Flatten, got {type(model).__name__}"
        )
    unsupported = [type(layer).__name__ for layer in layers if not isinstance(layer, SUPPORTED_LAYERS)]
    if unsupported:
        raise BenchError(
            f"robustopt (convex-adversarial) supports only Conv2d/Linear/ReLU/Flatten layers, not "
            f"{unsupported[0]}; use --model wk-small, digits-cnn or mnist-cnn, or such an nn.Sequential"
        )
    for layer in layers:
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1) or layer.bias is None):
            raise BenchError("robustopt supports only plain convolutions with a bias (no groups, no dilation)")
        if isinstance(layer, nn.Linear) and layer.bias is None:
            raise BenchError("robustopt supports only linear layers with a bias")
    if not isinstance(layers[-1], nn.Linear):
        raise BenchError(f"robustopt needs a network that ends with a Linear layer (the logits), not {type(layers[-1]).__name__}")
    return layers, normalize


def dual_sequential(model: nn.Module, shape: tuple[int, ...]) -> nn.Sequential:
    """The model as the flat ``nn.Sequential`` the dual network accepts, sharing its parameters,
    for inputs of ``shape`` (C, H, W): a zoo model, or an outside ``nn.Sequential`` of supported layers.

    A zoo model's normalisation becomes a fixed 1x1 convolution in front: folding it into the
    first conv's bias instead would be wrong at zero-padded borders.
    """
    layers, normalize = _bounded_layers(model)
    sequence: list[nn.Module] = []
    device = next(model.parameters()).device
    if normalize is not None:
        mean = normalize.mean.flatten()
        std = normalize.std.flatten()
        fixed = nn.Conv2d(len(mean), len(mean), 1).to(mean.device)
        fixed.weight.data = torch.diag(1 / std).view(len(mean), len(mean), 1, 1)
        fixed.bias.data = -mean / std
        fixed.requires_grad_(False)
        sequence.append(fixed)
    with torch.no_grad():
        activation = torch.zeros(1, *shape, device=device)
        for layer in layers:
            sequence += _exact_conv(layer, activation.shape[2:]) if isinstance(layer, nn.Conv2d) else [layer]
            activation = layer(activation)
    return nn.Sequential(*sequence)


def upper_margins(
    net: nn.Sequential, x: torch.Tensor, labels: torch.Tensor, epsilon: float | torch.Tensor, norm: Norm, proj: int = 0
) -> torch.Tensor:
    """Upper bounds on ``z_j - z_label`` over the epsilon ball for every class j (column ``label`` is 0).

    ``epsilon`` may be one value or one per input. ``proj > 0`` uses the library's random
    projections (Cauchy for L-inf, Gaussian for L2): an estimate for training, not a certificate.
    """
    convex_adversarial = _import_convex_adversarial()
    if proj > 0:
        norm_type = "l1_median" if norm == "linf" else "l2_normal"
    else:
        norm_type = "l1" if norm == "linf" else "l2"
    # A one-channel batch can carry channels-last strides; convolutions then answer channels-last
    # and the library's reshape (a ``view``) fails, so give it the standard layout.
    x = x.clone(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        # Raised when a projected ReLU layer has no unstable unit: harmless, the layer is exact then.
        warnings.filterwarnings("ignore", message="ReLU projection has no origin crossing", category=UserWarning)
        dual = convex_adversarial.DualNetwork(net, x, epsilon, proj=proj if proj > 0 else None, norm_type=norm_type)
    if torch.is_tensor(epsilon) and norm == "linf":
        # convex-adversarial 0.4.4 broadcasts a per-input epsilon correctly in the bounds computed
        # above but not in the L-inf input objective (it needs shape (batch, 1, 1) there).
        dual.dual_net[0].epsilon = epsilon.view(-1, 1, 1)
    eye = torch.eye(net[-1].out_features, dtype=x.dtype, device=x.device)
    return -dual(eye[labels].unsqueeze(1) - eye.unsqueeze(0))


@DEFENSES.register("robustopt")
class RobustOpt(Defense):
    """Wong & Kolter's provable defense: robust training on the dual bound, exact certificates."""

    certifies = True
    # Exact dual bounds cost grows with the hidden units of each ReLU layer: Wong & Kolter's small
    # net (256 units after the first conv on 8x8 digits) trains in minutes, digits-cnn (2,048) does not.
    default_model = "wk-small"

    @dataclass
    class Params:
        norm: Literal["linf", "l2"] = "linf"
        epsilon: float = 0.1
        # Epsilon grows linearly from start_epsilon over the first ramp_epochs (Wong & Kolter).
        start_epsilon: float = 0.01
        ramp_epochs: float = 10.0
        # Random projections for training bounds (0 = exact); Wong & Kolter used 50 on MNIST convs.
        # On digits (64 inputs) 32 trains (benchmarks/bench_defaults.py, at the table's lr 0.01);
        # 16 trained poorly; exact bounds cost 4x. Certificates are always exact.
        proj: int = 32
        # Certified radius by bisection on [0, max_radius] (0 = 2 * epsilon, so the first probe is
        # epsilon itself); the radius reported is the largest value proved, a lower bound.
        max_radius: float = 0.0
        bisection_steps: int = 6
        # The exact bound's cost per image grows with the batch on CPU (docs/comparison-defenses.md).
        certify_batch_size: int = 16

        def check(self) -> None:
            if not (self.epsilon > 0 and self.start_epsilon >= 0 and self.ramp_epochs >= 0 and self.proj >= 0
                    and self.max_radius >= 0 and self.bisection_steps >= 1 and self.certify_batch_size >= 1):
                raise BenchError("robustopt parameters need epsilon > 0, start_epsilon >= 0, ramp_epochs >= 0, proj >= 0, "
                                 f"max_radius >= 0, bisection_steps >= 1, certify_batch_size >= 1; got {self}")

    params: Params  # this defense's parameters (``Defense.params``)

    @classmethod
    def check_model(cls, model: nn.Module, params: Params) -> None:
        _bounded_layers(model)

    @classmethod
    def training_cost(cls, params) -> float:
        # The dual network's bound propagates 1 + proj columns per image (exact bounds: far more);
        # measured on MNIST with proj 50: 13x a plain training step (bench.overhead).
        return 1.0 + (params.proj / 4 if params.proj else 100.0)

    def __init__(self, model, params=None, device: str = "cpu"):
        super().__init__(model, params, device)
        self.params.check()
        self._nets: dict[tuple[int, ...], nn.Sequential] = {}
        self._step = 0
        self._ramp_steps = 0

    def dual_net(self, x: torch.Tensor) -> nn.Sequential:
        """The model as the library's ``nn.Sequential`` for inputs shaped like ``x``."""
        shape = tuple(x.shape[1:])
        if shape not in self._nets:
            self._nets[shape] = dual_sequential(self.model, shape)
        return self._nets[shape]

    def fit(self, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
        self._step = 0
        self._ramp_steps = round(self.params.ramp_epochs * math.ceil(len(x) / config.batch_size))
        super().fit(x, y, config)

    def current_epsilon(self) -> float:
        p = self.params
        if self._step >= self._ramp_steps:
            return p.epsilon
        start = min(p.start_epsilon, p.epsilon)
        return start + (p.epsilon - start) * self._step / self._ramp_steps

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bounds = upper_margins(self.dual_net(x), x, y, self.current_epsilon(), self.params.norm, self.params.proj)
        return F.cross_entropy(bounds, y)

    def after_step(self) -> None:
        self._step += 1

    @torch.no_grad()
    def certified(self, x: torch.Tensor, labels: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
        """Whether the exact dual bound proves ``labels`` at ``epsilon`` (one value or one per input)."""
        bounds = upper_margins(self.dual_net(x), x, labels, epsilon, self.params.norm)
        bounds[torch.arange(len(labels)), labels] = -1.0  # the label's own margin is 0 by construction
        return (bounds < 0).all(1)

    @torch.no_grad()
    def certify(self, x: torch.Tensor) -> Certificate:
        """The predicted label, and the largest radius (by bisection) at which the dual bound proves it.

        The guarantee is exact (the dual bound is a proof); a point where no positive radius is
        proved is not certified."""
        self.model.eval()
        labels = self.predict(x)
        max_radius = self.params.max_radius or 2 * self.params.epsilon
        radii = []
        for index in progress(batches(len(x), self.params.certify_batch_size), "robustopt certification", unit="batch"):
            xb, lb = x[index].to(self.device), labels[index].to(self.device)
            low = torch.zeros(len(index), device=self.device)
            high = torch.full((len(index),), max_radius, device=self.device)
            for _ in range(self.params.bisection_steps):
                middle = (low + high) / 2
                proved = self.certified(xb, lb, middle)
                low = torch.where(proved, middle, low)
                high = torch.where(proved, high, middle)
            radii.append(low.cpu())
        return Certificate(labels, torch.cat(radii) if radii else torch.zeros(0), self.params.norm)
