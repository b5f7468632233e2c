"""kvbench.codecs.linalg: batched_eigh / batched_covariance on NumPy, and the CuPy kernels.

The GPU tests (``-m gpu``) skip with a reason when CuPy or a CUDA GPU is unavailable. They draw
fresh covariance-like SPD matrices, poison the outputs, and compare with NumPy float64 ``eigh``:
eigenvalues within 1e-4 of the largest, ``||V diag(w) V^T - A|| / ||A|| < 1e-5``,
``||V^T V - I||_F < 1e-4``.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvbench.backend import _cupy_or_none
from kvbench.codecs import linalg
from kvbench.codecs.linalg import (
    JACOBI_PLANS,
    JacobiPlan,
    _jacobi_cupy,
    batched_covariance,
    batched_eigh,
    cusolver_batched_ok,
)


def spd_stack(rng: np.random.Generator, nb: int, d: int, n: int = 512) -> np.ndarray:
    """Covariances of ``[n, d]`` blocks with a strongly decaying spectrum (float32)."""
    out = np.empty((nb, d, d), dtype=np.float32)
    i = np.arange(d)
    for b in range(nb):
        decay = np.exp(-8.0 * i / d) if b % 2 == 0 else (i + 1.0) ** -1.0
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        x = (rng.standard_normal((n, d)) * decay) @ q
        out[b] = x.T @ x / n
    return out


def assert_eigh_ok(a, w, v, rec_tol: float = 1e-5, orth_tol: float = 1e-4) -> None:
    a64 = a.astype(np.float64)
    w = np.asarray(w, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    assert np.isfinite(w).all() and np.isfinite(v).all()
    assert (np.diff(w, axis=-1) >= 0).all(), "eigenvalues not ascending"
    w_ref = np.linalg.eigh(a64)[0]
    scale = np.abs(w_ref).max(axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    assert (np.abs(w - w_ref) / scale).max() < 1e-4
    rec = v @ (w[..., :, None] * np.swapaxes(v, -1, -2)) - a64
    na = np.linalg.norm(a64, axis=(-2, -1))
    nrec = np.linalg.norm(rec, axis=(-2, -1))
    assert (nrec <= rec_tol * np.where(na > 0, na, 1.0)).all(), nrec.max()
    eye = np.eye(a.shape[-1])
    orth = np.linalg.norm(np.swapaxes(v, -1, -2) @ v - eye, axis=(-2, -1))
    assert orth.max() < orth_tol, orth.max()


# --------------------------------------------------------------------------------------- CPU


def test_numpy_path_is_numpy_eigh():
    rng = np.random.default_rng(0)
    a = spd_stack(rng, 3, 16)
    w, v = batched_eigh(np, a)
    w_ref, v_ref = np.linalg.eigh(a)
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(v, v_ref)
    assert w.dtype == np.float32 and v.dtype == np.float32
    assert_eigh_ok(a, w, v)
    w2, _ = batched_eigh(np, a[0])  # a single matrix works too
    np.testing.assert_array_equal(w2, w_ref[0])


@pytest.mark.parametrize("shape", [(4, 8, 6), (8,), (), (2, 3, 5, 4)])
def test_non_square_is_rejected(shape):
    with pytest.raises(ValueError, match="square"):
        batched_eigh(np, np.zeros(shape, dtype=np.float32))


def test_bad_arguments():
    a = np.eye(4, dtype=np.float32)[None]
    with pytest.raises(ValueError, match="method"):
        batched_eigh(np, a, method="qr")
    for method in ("jacobi", "cusolver"):
        with pytest.raises(ValueError, match="CuPy"):
            batched_eigh(np, a, method=method)
    with pytest.raises(ValueError, match="max_sweeps"):
        batched_eigh(np, a, max_sweeps=-1)


def test_plans_are_valid():
    from kvbench.codecs.linalg import _check_plan, jacobi_plan

    for d, plan in JACOBI_PLANS.items():
        assert isinstance(plan, JacobiPlan)
        assert _check_plan(d, plan) <= 227 * 1024
    assert jacobi_plan(96).mode in ("smem", "log")
    for d in (3, 7, 512, 1024):
        with pytest.raises(ValueError):
            jacobi_plan(d)
    with pytest.raises(ValueError, match="regs"):
        _check_plan(96, JacobiPlan("regs", False, 256))


def test_batched_covariance_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50, 7)).astype(np.float32) + 5.0
    cov = batched_covariance(np, x)
    x64 = x.astype(np.float64)
    xc = x64 - x64.mean(axis=1, keepdims=True)
    ref = np.einsum("bni,bnj->bij", xc, xc) / 50
    assert cov.dtype == np.float32 and cov.shape == (3, 7, 7)
    np.testing.assert_allclose(cov, ref, rtol=1e-5, atol=1e-5)
    raw = batched_covariance(np, x, mean=False)
    np.testing.assert_allclose(raw, np.einsum("bni,bnj->bij", x64, x64) / 50, rtol=1e-5)
    with pytest.raises(ValueError):
        batched_covariance(np, np.zeros(5, dtype=np.float32))


# --------------------------------------------------------------------------------------- GPU

_CP = _cupy_or_none()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_CP is None, reason="needs CuPy and a CUDA GPU (none usable here)")


@gpu
@needs_gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("method", ["auto", "cusolver", "jacobi"])
def test_gpu_eigh_matches_float64(d, method):
    cp = _CP
    if method == "cusolver":
        _needs_cusolver(cp)
    rng = np.random.default_rng(d)
    a = spd_stack(rng, 6, d)
    w, v = batched_eigh(cp, cp.asarray(a), method=method)
    assert w.shape == (6, d) and v.shape == (6, d, d)
    assert w.dtype == cp.float32 and v.dtype == cp.float32
    # cuSOLVER's batched solver: eigenvalues ~7e-7, reconstruction up to ~1e-5 relative (H100)
    assert_eigh_ok(a, cp.asnumpy(w), cp.asnumpy(v), rec_tol=3e-5)


def _needs_cusolver(cp):
    if not cusolver_batched_ok(cp):
        pytest.skip("this CUDA runtime's cuSOLVER has no cusolverDnXsyevBatched")


@gpu
@needs_gpu
def test_gpu_cusolver_reads_lower_triangle():
    """cuSOLVER path: only the lower triangle counts (as numpy); identity, diagonal and zero
    matrices come out right."""
    cp = _CP
    _needs_cusolver(cp)
    rng = np.random.default_rng(5)
    d = 96
    a = spd_stack(rng, 7, d)
    a[0] = np.eye(d)
    a[1] = np.diag(rng.standard_normal(d))
    a[2] = 0.0
    a[3][np.triu_indices(d, 1)] = 123.0
    w, v = batched_eigh(cp, cp.asarray(a), method="cusolver")
    sym = np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)
    assert_eigh_ok(sym, cp.asnumpy(w), cp.asnumpy(v), rec_tol=3e-5)


@gpu
@needs_gpu
def test_gpu_cusolver_chunks(monkeypatch):
    """A batch split under a tiny workspace cap (one matrix a call) decomposes as well as one
    call, with the same eigenvalues to float rounding."""
    cp = _CP
    _needs_cusolver(cp)
    a = cp.asarray(spd_stack(np.random.default_rng(8), 5, 128))
    w, _ = batched_eigh(cp, a, method="cusolver")
    monkeypatch.setattr(linalg, "_SYEVB_WORKSPACE_MAX", 1)
    w1, v1 = batched_eigh(cp, a, method="cusolver")
    assert_eigh_ok(cp.asnumpy(a), cp.asnumpy(w1), cp.asnumpy(v1), rec_tol=3e-5)
    cp.testing.assert_allclose(w1, w, rtol=1e-5, atol=1e-6 * float(cp.abs(w).max()))


@gpu
@needs_gpu
def test_gpu_auto_falls_back_without_cusolver(monkeypatch):
    """Where libcusolver lacks the batched solver, auto takes the Jacobi kernel (D in the plans)
    or cupy.linalg.eigh (other D), and method="cusolver" says what is missing."""
    cp = _CP
    monkeypatch.setitem(linalg._SYEVB, cp.cuda.Device().id, (None, None))
    rng = np.random.default_rng(6)
    a = spd_stack(rng, 3, 128)
    w, v = batched_eigh(cp, cp.asarray(a))
    wj, vj = batched_eigh(cp, cp.asarray(a), method="jacobi")
    cp.testing.assert_array_equal(w, wj)
    cp.testing.assert_array_equal(v, vj)
    b = spd_stack(rng, 2, 48)
    w, v = batched_eigh(cp, cp.asarray(b))
    assert_eigh_ok(b, cp.asnumpy(w), cp.asnumpy(v), rec_tol=1e-3, orth_tol=1e-2)
    with pytest.raises(ValueError, match="cuSOLVER"):
        batched_eigh(cp, cp.asarray(a), method="cusolver")


@gpu
@needs_gpu
@pytest.mark.parametrize("d", sorted(JACOBI_PLANS))
def test_gpu_kernel_writes_every_output(d):
    """Poisoned outputs, fresh inputs, special matrices (identity, diagonal, zero, garbage upper
    triangle: only the lower one counts, as numpy)."""
    cp = _CP
    rng = np.random.default_rng(100 + d)
    a = spd_stack(rng, 8, d)
    a[0] = np.eye(d)
    a[1] = np.diag(rng.standard_normal(d))
    a[2] = 0.0
    a[3][np.triu_indices(d, 1)] = 123.0
    w = cp.full((8, d), cp.nan, dtype=cp.float32)
    v = cp.full((8, d, d), cp.nan, dtype=cp.float32)
    sweeps = cp.full(8, -1, dtype=cp.int32)
    _jacobi_cupy(cp, cp.asarray(a), w, v, JACOBI_PLANS[d], 1e-6, 20, sweeps)
    sym = np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)
    assert_eigh_ok(sym, cp.asnumpy(w), cp.asnumpy(v))
    s = cp.asnumpy(sweeps)
    assert s[0] == s[1] == s[2] == 0 and (s[3:] > 0).all() and (s <= 20).all()


@gpu
@needs_gpu
@pytest.mark.parametrize(
    "d, plan",
    [
        (64, JacobiPlan("smem", False, 128)),
        (64, JacobiPlan("smem", False, 256)),
        (64, JacobiPlan("regs", False, 256)),
        (64, JacobiPlan("log", True, 256, 16, 128)),
        (96, JacobiPlan("smem", False, 256)),  # NT % (D/2) != 0: the general loop
        (128, JacobiPlan("smem", True, 512)),
        (128, JacobiPlan("smem", False, 1024)),
        (128, JacobiPlan("regs", False, 1024)),
        (128, JacobiPlan("log", True, 256, 32, 256)),
        (256, JacobiPlan("log", True, 512, 32, 256)),
    ],
)
def test_gpu_other_plans(d, plan):
    cp = _CP
    rng = np.random.default_rng(7 * d + plan.threads)
    a = spd_stack(rng, 5, d)
    w = cp.full((5, d), cp.nan, dtype=cp.float32)
    v = cp.full((5, d, d), cp.nan, dtype=cp.float32)
    _jacobi_cupy(cp, cp.asarray(a), w, v, plan, 1e-6, 20)
    assert_eigh_ok(a, cp.asnumpy(w), cp.asnumpy(v))


@gpu
@needs_gpu
def test_gpu_leading_dims_and_fallback():
    cp = _CP
    rng = np.random.default_rng(3)
    a = spd_stack(rng, 6, 64).reshape(2, 3, 64, 64)
    w, v = batched_eigh(cp, cp.asarray(a))
    assert w.shape == (2, 3, 64) and v.shape == (2, 3, 64, 64)
    assert_eigh_ok(a, cp.asnumpy(w), cp.asnumpy(v))
    b = spd_stack(rng, 2, 48)  # stock cupy.linalg.eigh (syevj), which
    w, v = batched_eigh(cp, cp.asarray(b), method="stock")  # was measured ~2e-5 / 1e-4
    assert_eigh_ok(b, cp.asnumpy(w), cp.asnumpy(v), rec_tol=1e-3, orth_tol=1e-2)
    w0, v0 = batched_eigh(cp, cp.zeros((0, 64, 64), dtype=cp.float32))
    assert w0.shape == (0, 64) and v0.shape == (0, 64, 64)


@gpu
@needs_gpu
def test_gpu_batched_covariance():
    cp = _CP
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 512, 64)).astype(np.float32) + 3.0
    cov = batched_covariance(cp, cp.asarray(x))
    np.testing.assert_allclose(cp.asnumpy(cov), batched_covariance(np, x), rtol=1e-4, atol=1e-5)
