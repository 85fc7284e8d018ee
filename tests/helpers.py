"""Float tolerances derived from the arithmetic, for tests to share (``from helpers import ...``).

A tolerance states how far a computed number may be from the exact one *because of rounding*:
the dtype's machine epsilon times the size of the computation. Never a number one CPU printed:
another CPU, thread count or BLAS sums in another order, and any order must pass.

Rounding error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
section 3.1): with unit roundoff u = eps / 2, a sum or dot product of n terms computed in any
order satisfies |fl(s) - s| <= gamma_n * sum |terms|, gamma_n = n u / (1 - n u) <= n eps while
n u <= 1/2. Each further elementwise operation (a division, a scaling) adds one term to n.
"""
from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23, about 1.19e-7
FLOAT64_EPS = torch.finfo(torch.float64).eps  # 2**-52, about 2.22e-16


def float_sum_tolerance(n_terms: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative error bound of a sum (or dot product) of ``n_terms`` terms in ``dtype``, relative
    to the sum of the terms' absolute values: n * eps (>= gamma_n; see the module docstring)."""
    eps = torch.finfo(dtype).eps
    if not 0 < n_terms * eps <= 1:
        raise ValueError(f"{n_terms} terms: no useful rounding bound in {dtype}")
    return n_terms * eps


def float32_sum_tolerance(n_terms: int) -> float:
    """``float_sum_tolerance`` in float32: n_terms * 2**-23."""
    return float_sum_tolerance(n_terms, torch.float32)


def float64_sum_tolerance(n_terms: int) -> float:
    """``float_sum_tolerance`` in float64: n_terms * 2**-52."""
    return float_sum_tolerance(n_terms, torch.float64)


def perturbation_tolerance(epsilon: float, norm: str, n_pixels: int) -> float:
    """How far float32 rounding may take the measured ||x_adv - x|| above an attack's budget
    ``epsilon``, pixels in [0, 1]. Projecting onto the ball computes a norm (n_pixels terms) and
    scales; x_adv = x + delta is rounded once per pixel (<= eps/2 * (1 + |delta_i|) absolute) and the
    measurement x_adv - x once more; measuring the norm sums n_pixels terms again. l-inf has no sum."""
    per_pixel = float32_sum_tolerance(2) * (1 + epsilon)  # x + delta, then x_adv - x
    if norm == "linf":
        return epsilon * float32_sum_tolerance(2) + per_pixel  # epsilon itself rounded to float32, clipping
    if norm == "l2":
        return epsilon * float32_sum_tolerance(2 * n_pixels + 2) + n_pixels**0.5 * per_pixel
    if norm == "l1":
        return epsilon * float32_sum_tolerance(2 * n_pixels + 2) + n_pixels * per_pixel
    raise ValueError(f"unknown norm {norm!r}")


def forward_tolerance(model, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise bound on the rounding error (in ``dtype``) of the logits ``model(x)`` of a zoo model whose
    stem and body are Conv2d / Linear / ReLU / Flatten: gamma_N (|W_L| ... |W_1| |normalised x| +
    the |bias| terms), N the sum over layers of (fan-in + 1), plus 2 for the normalisation (to first
    order; Higham, section 3.5: products of matrices). ReLU and Flatten add no rounding. The
    magnitudes are propagated in float64 with |weights| and |biases|; pass ``x.abs() + epsilon``
    to cover inputs within epsilon of x (bounds over a ball involve the same magnitudes)."""
    import torch.nn.functional as F
    from torch import nn

    h = (x.double().abs() + model.normalize.mean.double().abs()) / model.normalize.std.double()
    n_terms = 2
    for layer in [model.stem, *model.body]:
        bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().double().abs()
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(h, layer.weight.detach().double().abs(), bias, layer.stride, layer.padding)
            n_terms += layer.weight[0].numel() + 1
        elif isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight.detach().double().abs(), bias)
            n_terms += layer.in_features + 1
        elif isinstance(layer, (nn.ReLU, nn.Flatten)):
            h = layer(h)  # the identity on magnitudes (ReLU), a reshape (Flatten)
        else:
            raise TypeError(f"float32_forward_tolerance: no rounding model for {type(layer).__name__}")
    # A worst case: on a randomly initialised digits-cnn it is about 1e6 eps times the logits,
    # so compare in float64 (``float64_compute``) where a tight check is wanted.
    return float_sum_tolerance(n_terms, dtype) * h


class float64_compute:
    """``with float64_compute():`` new tensors and modules default to float64 (tensors a library
    creates inside, too), restored after; to compare two computations with float64 tolerances."""

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)
