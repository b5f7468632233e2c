"""Scalar codebooks for rotated unit-vector coordinates, modelled as N(0, 1/d) (TurboQuant+).

Three tables (spec turboquant.md 2.2, 6 items 6-7), all sorted ascending, float64, host-side:

``prototype_centroids(b, d)``
    Exactly the prototype's ``optimal_centroids`` (turboquant_plus ``codebook.py`` at 422324e):
    b=1 ``+-sqrt(2/(pi d))``; b=2 the rounded paper constants
    ``[-1.51, -0.453, 0.453, 1.51]/sqrt(d)``;
    b>=3 Lloyd on N(0, sigma^2), sigma = 1/sqrt(d), started from the equal-probability bins and
    stopped after exactly 100 iterations (b=4 is therefore *not* converged: outer value 2.7177
    sigma, not Lloyd-Max's 2.7326 sigma). Reproduces the spec's measured values to ~1e-6.
``lloyd_max_centroids(b, d)``
    The converged Gaussian Lloyd-Max quantiser (same iteration, run until it stops moving).
``equal_mass_centroids(b, d)``
    The zero-iteration initialisation (conditional means of the 2^b equal-probability bins):
    the llama.cpp fork's turbo4 table is this at d=128.

No scipy: the normal cdf/sf come from ``math.erfc`` and the quantile from Acklam's rational
approximation polished with Halley steps (|error| ~1e-15 relative). Results are cached.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

__all__ = [
    "equal_mass_centroids",
    "lloyd_max_centroids",
    "norm_cdf",
    "norm_pdf",
    "norm_ppf",
    "norm_sf",
    "prototype_centroids",
]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def norm_pdf(x: float) -> float:
    """Standard normal density (0 at +-inf)."""
    if math.isinf(x):
        return 0.0
    return _INV_SQRT2PI * math.exp(-0.5 * x * x)


def norm_cdf(x: float) -> float:
    """Standard normal P(X <= x), accurate in the lower tail (erfc, no cancellation)."""
    return 0.5 * math.erfc(-x / _SQRT2)


def norm_sf(x: float) -> float:
    """Standard normal P(X > x), accurate in the upper tail."""
    return 0.5 * math.erfc(x / _SQRT2)


# Acklam's coefficients for the inverse normal cdf (relative error < 1.15e-9 before polishing).
_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)


def norm_ppf(p: float) -> float:
    """Standard normal quantile for 0 < p < 1 (+-inf at 0 and 1)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2.0 * math.log(p))
        x = (((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    elif p <= 1.0 - lo:
        q = p - 0.5
        r = q * q
        x = (
            (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5])
            * q
            / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0)
        )
    else:
        q = math.sqrt(-2.0 * math.log1p(-p))
        x = -(((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    # Halley refinement on F(x) - p; use the tail that has no cancellation.
    for _ in range(3):
        e = norm_cdf(x) - p if x <= 0 else (1.0 - p) - norm_sf(x)
        u = e / max(norm_pdf(x), 1e-300)
        x = x - u / (1.0 + 0.5 * x * u)
    return x


def _cond_mean(sigma: float, a: float, b: float) -> float:
    """E[X | a < X < b] for X ~ N(0, sigma^2) (prototype: ``_gaussian_conditional_expectation``)."""
    a_std = a / sigma if math.isfinite(a) else a
    b_std = b / sigma if math.isfinite(b) else b
    if not math.isfinite(a_std):
        prob = norm_cdf(b_std)
    elif not math.isfinite(b_std):
        prob = norm_sf(a_std)
    else:
        prob = norm_cdf(b_std) - norm_cdf(a_std)
    if prob < 1e-15:
        if math.isfinite(a) and not math.isfinite(b):
            return a + sigma
        if not math.isfinite(a) and math.isfinite(b):
            return b - sigma
        if math.isfinite(a) and math.isfinite(b):
            return (a + b) / 2.0
        return 0.0
    return sigma * (norm_pdf(a_std) - norm_pdf(b_std)) / prob


def _bin_means(sigma: float, boundaries: list[float]) -> list[float]:
    edges = [-math.inf, *boundaries, math.inf]
    return [_cond_mean(sigma, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _lloyd(n: int, sigma: float, n_iter: int | None) -> list[float]:
    """Lloyd on N(0, sigma^2) from the equal-probability bins; ``n_iter=None`` = to convergence."""
    # The prototype calls norm.ppf(linspace(0, 1, n+1)[1:-1], scale=sigma) = ppf(q) * sigma.
    qs = np.linspace(0.0, 1.0, n + 1)[1:-1]
    boundaries = [norm_ppf(float(q)) * sigma for q in qs]
    c = _bin_means(sigma, boundaries)
    it = 0
    while n_iter is None or it < n_iter:
        boundaries = [(c[i] + c[i + 1]) / 2.0 for i in range(n - 1)]
        new = _bin_means(sigma, boundaries)
        it += 1
        moved = max(abs(x - y) for x, y in zip(new, c, strict=True))
        c = new
        if n_iter is None and (moved <= 1e-14 * sigma or it >= 50_000):
            break
    return sorted(c)


def _check(b: int, d: int) -> None:
    if not 1 <= int(b) <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {b}")
    if int(d) < 1:
        raise ValueError(f"codebook dimension must be >= 1, got {d}")


@cache
def _prototype(b: int, d: int) -> tuple[float, ...]:
    if b == 1:
        c = math.sqrt(2.0 / (math.pi * d))
        return (-c, c)
    if b == 2:
        return tuple((np.array([-1.51, -0.453, 0.453, 1.51]) / np.sqrt(d)).tolist())
    return tuple(_lloyd(1 << b, 1.0 / math.sqrt(d), 100))


@cache
def _converged(b: int, d: int) -> tuple[float, ...]:
    return tuple(_lloyd(1 << b, 1.0 / math.sqrt(d), None))


@cache
def _equal_mass(b: int, d: int) -> tuple[float, ...]:
    return tuple(_lloyd(1 << b, 1.0 / math.sqrt(d), 0))


def prototype_centroids(b: int, d: int) -> np.ndarray:
    """The TurboQuant+ prototype's ``optimal_centroids(b, d)`` (100 Lloyd iterations for b>=3)."""
    _check(b, d)
    return np.array(_prototype(int(b), int(d)), dtype=np.float64)


def lloyd_max_centroids(b: int, d: int) -> np.ndarray:
    """Converged Gaussian Lloyd-Max centroids for N(0, 1/d)."""
    _check(b, d)
    return np.array(_converged(int(b), int(d)), dtype=np.float64)


def equal_mass_centroids(b: int, d: int) -> np.ndarray:
    """Conditional means of the 2^b equal-probability bins of N(0, 1/d) (Lloyd's start point)."""
    _check(b, d)
    return np.array(_equal_mass(int(b), int(d)), dtype=np.float64)
