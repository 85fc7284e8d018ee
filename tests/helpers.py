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
