"""kakeyaturbo (KT1.0 / KT1.2): weighted PCA -> spherical K-means -> WHT + Lloyd-Max residual.

Re-implementation of the Rust crate described in ``specs/kakeya.md`` section 2, batched over every
block and head of a layer-stream and written once against ``xp`` (numpy or cupy).

Pipeline per block of ``block_size`` consecutive rows of the head-major ``[n_kv*T, D]`` matrix
(one head's 512 tokens when T is a multiple of 512):

1. PCA (2.4): f32 covariance, batched ``eigh`` (``xp.linalg.eigh``; on numpy torch's, one
   thread, see ``_cov_eigh``), eigenpairs sorted descending, ``d_eff`` =
   first count whose cumulative ``max(lambda, 0)`` reaches ``variance_ratio`` of the total. Mean and
   basis are rounded to the skeleton dtype (IEEE f16 by default) **before** use. Eigenvector signs
   are made canonical (largest-|.| component positive) so numpy and cupy agree. V streams use one
   layer-pooled fit (KT1.2 B'), K streams one fit per block.
2. Spherical K-means (2.5) on the coefficient directions: the first centre is the
   ``SmallRng(seed).gen_range(0..n_valid)``-th valid row, then farthest-first on signed cosine,
   then <= ``kmeans_max_iter`` Lloyd steps (``argmax |cos|``, sign-weighted mean, empty clusters
   keep their centre, stop when no assignment changes). Blocks that have converged drop out of
   the batch, so the batched result equals independent per-block runs.
3. Residual (2.6): ``res = c - t * centre_s``; ``rot = H (sigma * pad(res))`` with the unnormalised
   Sylvester Hadamard of length ``wht_len = next_pow2(d_eff)`` and ``sigma = sign_pattern(seed)``;
   ``z = rot * scale``; nearest Lloyd-Max index; LSB-first packed per row.
4. Decode (2.7): ``u = sigma * H(v * inv) / wht_len``;
   ``x_hat = mean + (t*centre_s + u[:d_eff]) @ basis``.

On CuPy the hot loops are kernels (``gpu.kakeyaturbo``): per-block mean + covariance (D <= 128),
the d_eff rule, K-means to convergence + residual code + packing (one launch, no host sync per
iteration) and the whole decode; two host syncs per encode (d_eff, K_eff), none per decode, and
chunks sized from free device memory bound every temporary. Shapes the kernels do not take
(d_pad > 64, k > 32, blocks > 512 rows; for decode D other than 16 or a multiple of 32) use the
array path below.

Variable ``d_eff`` across blocks is batched by zero-padding the coefficient space to the largest
``d_eff`` (basis rows beyond a block's ``d_eff`` are zero) and running one WHT of length
``next_pow2(max d_eff)``: the top-left ``n x n`` block of ``H_N`` is ``H_n`` and the sign pattern
is prefix-consistent, so the first ``wht_len_b`` coordinates are exactly block b's transform.

Bug switches (spec 5.7 / 5.8):

- ``wht_scale``: ``legacy_sqrtN`` uses ``scale = sqrt(wht_len)/||res||`` (Lloyd-Max inputs have
  variance ``wht_len`` and saturate; decoded residuals shrink); ``fixed`` uses ``1/||res||``.
  ``fixed`` also stores norm 0 for a zero residual (Rust stores 1, decoding a spurious residual).
- ``ip_decode`` (``inner_product`` metric, the K streams): ``legacy_unscaled`` decodes with
  ``inv = 1``, so the decoded residual has a fixed absolute norm (~2 legacy scale, ~1 fixed
  scale); Rust stores ``f16(||x||)`` there, which is never read, so we do not store it (the
  legacy byte columns still count it). ``fixed`` stores ``f16(1/scale)`` and decodes like the
  absorbed (mse) path. ``mse`` and ``linf`` are the same codec (2.7).

Bytes. ``nbytes`` counts exactly what this implementation stores (everything a decoder needs):

- skeleton: per PCA fit ``s*(D + d_eff*D)`` + 2 B (u16 ``d_eff``); per block ``s*K_eff*d_eff``
  (centres) + 1 B (u8 ``K_eff``); ``s`` = 2 (f16) or 4 (f32). Seed, bit width, K and block size
  are codec configuration, not stream data.
- codes: per row ``ceil(wht_len*b/8)`` packed residual + 2 B ``t`` (f16); per block the seg ids
  packed LSB-first at ``ceil(log2 max K_eff)`` bits (``ceil(block_size*w/8)`` B). The reserved
  ``alpha`` (always 0) is not stored.
- norms: 2 B (f16) per row where the decoder reads the norm (mse/linf, or inner_product with
  ``ip_decode: fixed``); 0 under ``legacy_unscaled``, whose norm is never read.
- tail: leftover rows (``n_kv*T mod block_size``) kept exact in bf16, ``2*rows*D``.

``legacy_nbytes`` reproduces the study's own accounting (Rust ``Code.nbytes = 4+6+packed``,
``Skeleton.nbytes``, shared PCA counted once, and the driver's ``tail_rows*D`` per stream, i.e.
the ``2*tail*D`` per layer that should have been ``4*tail*D``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from kvbench.backend import device_free_bytes, to_numpy
from kvbench.codecs.base import Codec, Encoded, bf16_round, register
from kvbench.codecs.gpu.kakeyaturbo import (
    kt_block_gram,
    kt_d_eff,
    kt_decode_blocks,
    kt_decode_ok,
    kt_encode_blocks,
    kt_encode_ok,
    kt_gram_ok,
    kt_pad,
)
from kvbench.codecs.linalg import batched_eigh, batched_gram
from kvbench.codecs.rng import first_gen_range, sign_pattern
from kvbench.codecs.wht import (
    KT_LLOYD_MAX,
    next_pow2,
    next_pow2_array,
    pack_bits,
    packed_nbytes,
    quantize_nearest,
    signed_hadamard,
    unpack_bits,
)
from kvbench.cpu_threads import join_chunks
from kvbench.errors import KvbenchError

EPS = float(np.finfo(np.float32).eps)  # Rust f32::EPSILON
METRICS = ("mse", "inner_product", "linf")
WHT_SCALES = ("legacy_sqrtN", "fixed")
IP_DECODES = ("legacy_unscaled", "fixed")
SKELETON_DTYPES = {"f16": 2, "f32": 4}

__all__ = [
    "KakeyaTurbo",
    "PcaFit",
    "estimate_k_ratio",
    "fit_pca",
    "fit_spherical_kmeans",
    "kt_code_nbytes",
    "kt_legacy_stream_bytes",
    "mean_block_mse",
    "pca_project",
    "pca_unproject",
]


# ----------------------------------------------------------------------------------------------
# Pure byte formulas (the study's accounting, spec 2.9 / 2.11)
# ----------------------------------------------------------------------------------------------


def kt_code_nbytes(d_eff, bit_width: int):
    """Rust ``Code.nbytes``: u32 seg_id + 3 x f16 (alpha, t, norm) + ``ceil(wht_len*b/8)``, for an
    int ``d_eff`` (an int) or a host int array of them (an int64 array)."""
    n = 4 + 6 + (next_pow2_array(d_eff) * int(bit_width) + 7) // 8
    return int(n) if np.ndim(d_eff) == 0 else n


def kt_legacy_stream_bytes(
    dim: int,
    d_effs,
    k_effs,
    rows_per_block,
    bit_width: int = 3,
    shared_d_eff: int | None = None,
    skeleton_bytes: int = 2,
    tail_rows: int = 0,
) -> dict[str, int]:
    """The study's bytes of one layer-stream from its per-block ``d_eff``/``K_eff`` values.

    ``shared_d_eff`` set: one pooled PCA (``d_effs`` ignored), counted once (KT1.2 V streams).
    ``rows_per_block``: an int (every block) or one count per block. ``tail`` is the driver's
    per-stream share of ``2*tail_rows*D`` per layer.
    """
    k_effs = np.asarray(k_effs, dtype=np.int64).reshape(-1)
    n_blocks = k_effs.size
    rows = np.asarray(rows_per_block, dtype=np.int64).reshape(-1)
    if np.ndim(rows_per_block) == 0:
        rows = np.repeat(rows, n_blocks)
    s = int(skeleton_bytes)
    if shared_d_eff is not None:
        de = np.full(n_blocks, int(shared_d_eff), dtype=np.int64)
        skel = s * (dim + int(shared_d_eff) * dim) if n_blocks else 0
        skel += int((s * k_effs * de).sum())
    else:
        de = np.asarray(d_effs, dtype=np.int64).reshape(-1)
        if de.size != n_blocks:
            raise ValueError(f"{de.size} d_eff values for {n_blocks} blocks")
        skel = int((s * (dim + de * dim + k_effs * de)).sum())
    if rows.size != n_blocks:
        raise ValueError(f"{rows.size} row counts for {n_blocks} blocks")
    per_row = kt_code_nbytes(de, bit_width)
    codes = int((rows * per_row).sum())
    tail = int(tail_rows) * dim
    return {"skeleton": skel, "codes": codes, "tail": tail, "total": skel + codes + tail}


def estimate_k_ratio(
    hd: int, d_eff: int, d_res: int, block: int = 512, k: int = 16, b: int = 3
) -> float:
    """The deff-outlier ablation's projected K ratio (spec 2.11), e.g. (128, 10, 0) -> 11.571."""
    per_row = 4 + 6 + packed_nbytes(next_pow2(d_eff), b) + 4 * d_res
    skel = 2 * (hd + d_eff * hd + k * d_eff)
    return 2 * hd / (per_row + skel / block)


def mean_block_mse(xp: ModuleType, x, x_hat, block_size: int = 512) -> float:
    """Rust ``mean_block_mse``: mean over full blocks of ``sum((x-x_hat)^2)/(block*D)`` (f64 sums).

    ``x``/``x_hat``: ``[n_kv, T, D]``; blocks are consecutive rows of the head-major flatten, the
    leftover rows are ignored (they were never encoded by the Rust code). NaN without full blocks.
    """
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    n_full = flat.shape[0] // block_size
    if n_full == 0:
        return float("nan")
    n = n_full * block_size
    err = (flat[:n] - x_hat.reshape(-1, d)[:n]).astype(xp.float32) ** 2
    per_block = err.reshape(n_full, block_size * d).astype(xp.float64).sum(axis=1)
    return float(to_numpy((per_block / (block_size * d)).mean()))


# ----------------------------------------------------------------------------------------------
# Batched building blocks (reusable by the ablations)
# ----------------------------------------------------------------------------------------------


class PcaFit:
    """A batch of P PCA fits. ``mean [P, D]`` and ``basis [P, Dp, D]`` hold the *rounded* values
    (f32 arrays; rows of ``basis`` at or beyond a fit's ``d_eff`` are zero); ``d_eff`` is a host
    int array ``[P]``; ``eigvals [P, D]`` descending (f32, xp)."""

    def __init__(self, mean, basis, d_eff: np.ndarray, eigvals):
        self.mean = mean
        self.basis = basis
        self.d_eff = d_eff
        self.eigvals = eigvals

    @property
    def d_pad(self) -> int:
        return int(self.basis.shape[1])


def _round_store(xp: ModuleType, a, skeleton_dtype: str):
    if skeleton_dtype == "f16":
        return a.astype(xp.float16).astype(xp.float32)
    return a.astype(xp.float32)


def _d_eff_from_eigvals(lam: np.ndarray, variance_ratio: float) -> np.ndarray:
    """Rust's rule on host f32 eigenvalues ``[P, D]`` sorted descending."""
    lam = np.maximum(np.asarray(lam, dtype=np.float32), np.float32(0))
    p, d = lam.shape
    cum = np.cumsum(lam, axis=1, dtype=np.float32)  # sequential, as the Rust loop
    total = cum[:, -1]
    ratio = np.float32(min(max(variance_ratio, 0.0), 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        hit = (cum / total[:, None]) >= ratio
    d_eff = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, d)
    d_eff = np.where(total > np.float32(EPS), d_eff, 1)
    return np.clip(d_eff, 1, d).astype(np.int64)


def _chunk(xp: ModuleType, n_items: int, item_bytes: int) -> int:
    """Items per pass so that one pass's temporaries stay within 1/8 of the free device memory
    (CuPy; NumPy does everything in one pass). Any input size then fits the device."""
    if xp is np:
        return max(1, n_items)
    return int(max(1, min(n_items, device_free_bytes(xp) // 8 // max(1, item_bytes))))


def _mean_gram(xp: ModuleType, x):
    """Row mean ``[P, D]`` and centred Gram matrix ``(x - mean)^T (x - mean)`` ``[P, D, D]`` of
    every batch entry of ``x: [P, n, D]`` on CuPy, in chunks that fit the device.

    Through ``kt_block_gram`` (one pass per 512-row run, no centred copy) where ``D``
    allows, array ops otherwise. One pooled entry (``P = 1``, V streams) is cut into 512-row runs
    whose means and Gram matrices are combined exactly (parallel-axis theorem); a plain
    ``mean(axis=1)`` over millions of rows is a slow CuPy reduction (0.39 s for 17M x 64).
    """
    p, n, d = x.shape
    if p > 1:
        mu = xp.empty((p, d), dtype=xp.float32)
        gram = xp.empty((p, d, d), dtype=xp.float32)
        step = _chunk(xp, p, 4 * n * d)
        ones = xp.ones((1, n), dtype=xp.float32)
        for s in range(0, p, step):
            xs = x[s : s + step]
            if kt_gram_ok(xp, d):
                mu[s : s + step], gram[s : s + step] = kt_block_gram(xp, xs.reshape(-1, d), n)
            else:  # the mean as one batched GEMV: mean(axis=1) is the slow strided reduction
                m = xp.matmul(ones, xs)[:, 0] / xp.float32(n)
                mu[s : s + step] = m
                xc = xs - m[:, None, :]
                gram[s : s + step] = batched_gram(xp, xc)
        return mu, gram
    rows = x[0]
    if not kt_gram_ok(xp, d):
        mu = xp.matmul(xp.ones((1, n), dtype=xp.float32), rows) / xp.float32(n)
        gram = xp.zeros((d, d), dtype=xp.float32)
        step = _chunk(xp, n, 4 * d)
        for s in range(0, n, step):
            xc = rows[s : s + step] - mu
            gram += batched_gram(xp, xc)
        return mu, gram[None]
    run = 512
    step = run * max(1, _chunk(xp, n, 4 * d) // run)
    means, gram = [], xp.zeros((1, d * d), dtype=xp.float32)
    for s in range(0, n, step):
        m, g = kt_block_gram(xp, rows[s : s + step], run)
        means.append(m)
        gram += xp.matmul(xp.ones((1, g.shape[0]), dtype=xp.float32), g.reshape(-1, d * d))
    means = xp.concatenate(means)
    cnt = xp.asarray(np.minimum(run, n - run * np.arange(means.shape[0])).astype(np.float32))
    mu = xp.matmul(cnt[None], means) / xp.float32(n)
    dev = means - mu
    gram = gram.reshape(d, d) + xp.matmul((dev * cnt[:, None]).T, dev)
    return mu, gram[None]


def _mean_cov_eigh(xp: ModuleType, x):
    """Row mean ``[P, D]`` of ``x: [P, n, D]`` and the eigenpairs (ascending) of its covariance
    ``(x - mean)^T (x - mean) / n``.

    On numpy both steps run in torch (CPU, MKL) on ONE thread when torch is importable: its
    batched ``eigh`` is 2-4x faster than numpy's, and single-threaded LAPACK is stable on busy
    machines (measured on 2 shared cores: 0.05 s for 16 x 256^2 on one thread, 0.07-12 s on two
    threads or through numpy/OpenBLAS, which spin against other processes). The input is copied
    into torch-allocated (64-byte aligned) memory so results do not depend on numpy's buffer
    alignment (MKL's kernels may). On CuPy mean and Gram matrix come from :func:`_mean_gram`.
    """
    n = x.shape[1]
    if xp is not np:
        mu, gram = _mean_gram(xp, x)
        cov = gram / xp.float32(n)
    else:
        mu = x.mean(axis=1)
        xc = x - mu[:, None, :]
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a project dependency
            torch = None
        if torch is not None:
            n_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t = torch.from_numpy(np.ascontiguousarray(xc, dtype=np.float32)).clone()
                cov = torch.matmul(t.transpose(1, 2), t) / n
                cov = (cov + cov.transpose(1, 2)) * 0.5
                lam, vec = torch.linalg.eigh(cov)
                return mu, lam.numpy(), vec.numpy()
            finally:
                torch.set_num_threads(n_threads)
        cov = xp.matmul(xc.transpose(0, 2, 1), xc) / xp.float32(n)
    cov = (cov + cov.transpose(0, 2, 1)) * xp.float32(0.5)
    # CuPy: the Jacobi kernel (D=64) or cuSOLVER's batched solver, by batched_eigh's auto rule
    return (mu, *batched_eigh(xp, cov))


def fit_pca(
    xp: ModuleType,
    x,
    variance_ratio: float,
    skeleton_dtype: str = "f16",
    d_eff_override=None,
) -> PcaFit:
    """Weighted (all weights 1) PCA of every batch entry of ``x: [P, n, D]`` f32 (spec 2.4).

    ``d_eff_override``: optional host ints ``[P]`` replacing the variance-ratio rule (ablations).
    """
    x = xp.asarray(x, dtype=xp.float32)
    p, n, d = x.shape
    mu, lam, vec = _mean_cov_eigh(xp, x)  # ascending; columns of vec = eigenvectors
    if d_eff_override is not None:
        d_eff = np.clip(np.asarray(d_eff_override, dtype=np.int64).reshape(p), 1, d)
    elif xp is np:
        d_eff = _d_eff_from_eigvals(lam[:, ::-1], variance_ratio)
    else:  # the same rule on the device: P ints to the host instead of P x D eigenvalues
        d_eff = to_numpy(kt_d_eff(xp, lam, variance_ratio)).astype(np.int64)
    lam = lam[:, ::-1]
    dp = int(d_eff.max())
    # the leading Dp eigenvectors as rows (descending): [P, Dp, D]
    basis = xp.ascontiguousarray(vec[:, :, ::-1][:, :, :dp].transpose(0, 2, 1))
    # canonical sign: the largest-|.| component of every eigenvector is positive
    idx = xp.argmax(xp.abs(basis), axis=2)  # [P, Dp]
    pick = xp.take_along_axis(basis, idx[:, :, None], axis=2)  # [P, Dp, 1]
    basis = basis * xp.where(pick < 0, xp.float32(-1), xp.float32(1))
    keep = xp.asarray(np.arange(dp)[None, :] < d_eff[:, None])  # [P, Dp]
    basis = xp.where(keep[:, :, None], basis, xp.float32(0))
    return PcaFit(
        mean=_round_store(xp, mu, skeleton_dtype),
        basis=xp.ascontiguousarray(_round_store(xp, basis, skeleton_dtype)),
        d_eff=d_eff,
        eigvals=xp.ascontiguousarray(lam),
    )


def pca_project(xp: ModuleType, x, fit: PcaFit):
    """``(x - mean) @ basis.T`` for ``x: [P, n, D]`` -> ``[P, n, Dp]`` (zeros beyond d_eff)."""
    return xp.matmul(x - fit.mean[:, None, :], fit.basis.transpose(0, 2, 1))


def pca_unproject(xp: ModuleType, c, fit: PcaFit):
    """``mean + c @ basis`` for ``c: [P, n, Dp]`` -> ``[P, n, D]``."""
    return fit.mean[:, None, :] + xp.matmul(c, fit.basis)


@lru_cache(maxsize=64)
def _first_table(seed: int, n: int) -> np.ndarray:
    """``SmallRng(seed).gen_range(0..v)`` for every ``v`` in ``0..n`` (0 for ``v = 0``): the valid
    row that seeds centre 0 of a block with ``v`` valid rows, as one lookup for all blocks."""
    table = np.array([0] + [first_gen_range(seed, v) for v in range(1, n + 1)], dtype=np.int64)
    table.flags.writeable = False
    return table


_KT_TABLES: dict[tuple, dict] = {}


def _kt_tables(xp: ModuleType, seed: int, rows: int, n_pad: int, bits: int) -> dict:
    """Device copies (cached) of what the kakeyaturbo kernels look up: the first-centre table,
    the sign pattern, the quantiser midpoints and the Lloyd-Max centroids."""
    key = (xp.cuda.Device().id, seed, rows, n_pad, bits)
    if key not in _KT_TABLES:
        c = np.asarray(KT_LLOYD_MAX[bits], dtype=np.float64)
        _KT_TABLES[key] = {
            "first": xp.asarray(_first_table(seed, rows).astype(np.int32)),
            "signs": xp.asarray(np.asarray(sign_pattern(seed, n_pad), dtype=np.float32)),
            "mids": xp.asarray(((c[1:] + c[:-1]) / 2).astype(np.float32)),  # quantize_nearest's
            "table": xp.asarray(c.astype(np.float32)),
        }
    return _KT_TABLES[key]


def fit_spherical_kmeans(
    xp: ModuleType,
    c,
    k: int,
    seed: int,
    max_iter: int,
):
    """Weighted spherical K-means (spec 2.5) of every block of ``c: [B, n, Dp]`` (zero padding ok).

    Returns ``(centres [B, K, Dp] f32 unrounded, k_eff host [B])``; centres at or beyond a
    block's ``K_eff`` are zero.
    """
    b, n, dp = c.shape
    nrm = xp.sqrt((c * c).sum(axis=-1))  # [B, n]
    valid = nrm > xp.float32(EPS)
    dirs = xp.where(valid[..., None], c / xp.where(valid, nrm, 1)[..., None], xp.float32(0))
    n_valid = to_numpy(valid.sum(axis=1)).astype(np.int64)
    n_any = to_numpy((xp.abs(c) > xp.float32(EPS)).any(axis=-1).sum(axis=1)).astype(np.int64)
    k_eff = np.minimum(k, np.maximum(n_any, 1)).astype(np.int64)

    # first centre: the gen_range(0..n_valid)-th valid row
    first = _first_table(seed, n)[n_valid]
    rank = xp.cumsum(valid.astype(xp.int64), axis=1)  # 1-based rank of each valid row
    first_row = xp.argmax(valid & (rank == xp.asarray(first)[:, None] + 1), axis=1)
    bidx = xp.arange(b)

    centres = xp.zeros((b, k, dp), dtype=xp.float32)
    c0 = dirs[bidx, first_row]  # [B, Dp] (zeros when no valid row)
    centres[:, 0] = c0
    maxcos = xp.matmul(dirs, c0[:, :, None])[..., 0]
    neg_inf = xp.float32(-np.inf)
    k_eff_x = xp.asarray(k_eff)
    for j in range(1, k):
        dist = xp.where(valid, xp.float32(1) - maxcos, neg_inf)
        far = xp.argmax(dist, axis=1)
        cj = dirs[bidx, far]
        active = (k_eff_x > j)[:, None]
        centres[:, j] = xp.where(active, cj, xp.float32(0))
        maxcos = xp.maximum(maxcos, xp.matmul(dirs, cj[:, :, None])[..., 0])

    # Lloyd. Centres at or beyond K_eff are zero vectors: |cos| = 0 never beats centre 0 under
    # first-wins argmax, and they never receive rows, so no mask is needed. Only blocks whose
    # assignments still change are carried on (gathered), which equals per-block early stops.
    karange = xp.arange(k)
    if xp is not np:
        _lloyd_masked(xp, dirs, valid, centres, karange, max_iter)
        return centres, k_eff
    assign = xp.zeros((b, n), dtype=xp.int64)
    act = xp.arange(b)
    d_a, v_a, c_a = dirs, valid, centres
    vf_a = valid.astype(xp.float32)
    for _ in range(max_iter):
        cos = xp.matmul(d_a, c_a.transpose(0, 2, 1))  # [Ba, n, K]
        new = xp.argmax(xp.abs(cos), axis=-1)
        changed = ((new != assign[act]) & v_a).any(axis=1)
        assign[act] = new
        keep = xp.nonzero(changed)[0]
        n_keep = int(keep.shape[0])
        if n_keep == 0:
            break
        if n_keep < int(act.shape[0]):
            act, d_a, v_a, vf_a, c_a = act[keep], d_a[keep], v_a[keep], vf_a[keep], c_a[keep]
            cos, new = cos[keep], new[keep]
        # row weight: sign(dir . c_old) of its assigned centre (sign(0) -> +1), 0 if invalid
        c_own = xp.take_along_axis(cos, new[..., None], axis=-1)[..., 0]
        sv = xp.where(c_own >= 0, vf_a, -vf_a)
        eq = new[..., None] == karange  # [Ba, n, K] assignment one-hot
        s = xp.matmul((eq * sv[..., None]).transpose(0, 2, 1), d_a)  # [Ba, K, Dp]
        nonempty = (eq & v_a[..., None]).any(axis=1)  # cluster weight > 0 (all weights 1)
        sn = xp.sqrt((s * s).sum(axis=-1))
        s = xp.where((sn > xp.float32(EPS))[..., None], s / xp.where(sn > 0, sn, 1)[..., None], s)
        c_a = xp.where(nonempty[..., None], s, c_a)
        centres[act] = c_a
    return centres, k_eff


def _lloyd_masked(xp: ModuleType, dirs, valid, centres, karange, max_iter: int, check_every=4):
    """The Lloyd loop of :func:`fit_spherical_kmeans` without a host sync per iteration (CuPy).

    A device flag ``run [Ba]`` freezes a block at its first iteration without a change: from
    then on its assignment and centres are never written, so extra iterations are no-ops and each
    block ends exactly where its own early stop would leave it. The host looks at the flags only
    every ``check_every`` iterations, to stop or to drop the finished blocks from the batch.
    ``centres [B, K, Dp]`` is updated in place.
    """
    b, n, _ = dirs.shape
    act = xp.arange(b)
    d_a, v_a, c_a = dirs, valid, centres
    vf_a = valid.astype(xp.float32)
    assign_a = xp.zeros((b, n), dtype=xp.int64)
    run = xp.ones(b, dtype=bool)
    it = 0
    while it < max_iter:
        for _ in range(min(check_every, max_iter - it)):
            cos = xp.matmul(d_a, c_a.transpose(0, 2, 1))  # [Ba, n, K]
            new = xp.argmax(xp.abs(cos), axis=-1)
            run = run & ((new != assign_a) & v_a).any(axis=1)
            assign_a = xp.where(run[:, None], new, assign_a)
            c_own = xp.take_along_axis(cos, new[..., None], axis=-1)[..., 0]
            sv = xp.where(c_own >= 0, vf_a, -vf_a)
            eq = new[..., None] == karange
            s = xp.matmul((eq * sv[..., None]).transpose(0, 2, 1), d_a)
            nonempty = (eq & v_a[..., None]).any(axis=1) & run[:, None]
            sn = xp.sqrt((s * s).sum(axis=-1))
            big = (sn > xp.float32(EPS))[..., None]
            s = xp.where(big, s / xp.where(sn > 0, sn, 1)[..., None], s)
            c_a = xp.where(nonempty[..., None], s, c_a)
            it += 1
        centres[act] = c_a
        keep = xp.nonzero(run)[0]
        n_keep = int(keep.shape[0])
        if n_keep == 0:
            break
        if n_keep < int(act.shape[0]):
            act, d_a, v_a, vf_a = act[keep], d_a[keep], v_a[keep], vf_a[keep]
            c_a, assign_a, run = c_a[keep], assign_a[keep], run[keep]


# ----------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------


@register
class KakeyaTurbo(Codec):
    family = "kakeyaturbo"
    COMPRESSES_SLIDING = False  # the drivers pass sliding-window layers through as bf16
    DEFAULTS: dict[str, Any] = {
        "block_size": 512,
        "variance_ratio": 0.95,
        "k": 16,
        "bit_width": 3,
        "rotation_seed": 0xCAFEBABE,  # K stream; V uses rotation_seed + 1 (as the drivers)
        "metric_k": "inner_product",
        "metric_v": "mse",
        "kmeans_max_iter": 32,
        "share_basis_k": False,
        "share_basis_v": True,  # KT1.2 B': one layer-pooled PCA for V
        "skeleton_dtype": "f16",  # IEEE half (KT1.2); f32 = KT1.0
        "wht_scale": "fixed",  # legacy_sqrtN | fixed
        "ip_decode": "fixed",  # legacy_unscaled | fixed
    }

    # -- parameters ------------------------------------------------------------------------
    def check_params(self) -> None:
        p = self.params

        def need_int(key, lo, hi=None):
            v = p[key]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise self._param_error(key, f"must be an integer, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
                raise self._param_error(key, f"must be {rng}, got {v}")
            p[key] = int(v)

        def need_enum(key, allowed):
            if p[key] not in allowed:
                raise self._param_error(key, f"must be one of {list(allowed)}, got {p[key]!r}")

        def need_bool(key):
            if not isinstance(p[key], (bool, np.bool_)):
                raise self._param_error(key, f"must be true or false, got {p[key]!r}")
            p[key] = bool(p[key])

        need_int("block_size", 2)
        need_int("k", 1, 256)  # seg ids are packed at <= 8 bits
        need_int("bit_width", 1, 4)
        need_int("rotation_seed", 0, 2**32 - 2)  # u32 in Rust, and V uses seed + 1
        need_int("kmeans_max_iter", 0)
        vr = p["variance_ratio"]
        if isinstance(vr, bool) or not isinstance(vr, (int, float, np.floating, np.integer)):
            raise self._param_error("variance_ratio", f"must be a number, got {vr!r}")
        if not (0.0 < float(vr) <= 1.0) or math.isnan(float(vr)):
            raise self._param_error("variance_ratio", f"must be in (0, 1], got {vr}")
        p["variance_ratio"] = float(vr)
        need_enum("metric_k", METRICS)
        need_enum("metric_v", METRICS)
        need_enum("skeleton_dtype", tuple(SKELETON_DTYPES))
        need_enum("wht_scale", WHT_SCALES)
        need_enum("ip_decode", IP_DECODES)
        need_bool("share_basis_k")
        need_bool("share_basis_v")

    def _stream_cfg(self, stream: str) -> dict[str, Any]:
        if stream not in ("k", "v"):
            raise KvbenchError(f"codec {self.name!r}: stream must be 'k' or 'v', got {stream!r}")
        p = self.params
        metric = p[f"metric_{stream}"]
        explicit = metric == "inner_product"
        return {
            "metric": metric,
            "seed": p["rotation_seed"] + (1 if stream == "v" else 0),
            "shared": p[f"share_basis_{stream}"],
            # does the decoder read the per-row norm? (absorbed path, or the fixed IP decode)
            "norm_used": (not explicit) or p["ip_decode"] == "fixed",
        }

    # -- encode ----------------------------------------------------------------------------
    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        xp = self.xp
        p = self.params
        cfg = self._stream_cfg(stream)
        x = xp.asarray(x, dtype=xp.float32)
        if x.ndim != 3:
            raise KvbenchError(f"codec {self.name!r}: expected [n_kv, T, D], got {x.shape}")
        n_kv, t_len, d = (int(s) for s in x.shape)
        bs = p["block_size"]
        flat = x.reshape(n_kv * t_len, d)
        n_full = flat.shape[0] // bs
        n_enc = n_full * bs
        meta: dict[str, Any] = {
            "stream": stream,
            **cfg,
            "block_size": bs,
            "n_blocks": n_full,
            "tail_rows": int(flat.shape[0] - n_enc),
            "dim": d,
            "bit_width": p["bit_width"],
            "skeleton_dtype": p["skeleton_dtype"],
        }
        arrays: dict[str, Any] = {"tail": bf16_round(xp, flat[n_enc:])}
        if n_full == 0:
            meta.update(d_eff=np.zeros(0, np.int64), k_eff=np.zeros(0, np.int64), seg_bits=0)
            return Encoded(shape=(n_kv, t_len, d), arrays=arrays, meta=meta)

        blocks = flat[:n_enc].reshape(n_full, bs, d)
        sd = p["skeleton_dtype"]
        if cfg["shared"]:
            fit = fit_pca(xp, flat[:n_enc][None], p["variance_ratio"], sd)
            d_eff = np.repeat(fit.d_eff, n_full)
        else:
            fit = fit_pca(xp, blocks, p["variance_ratio"], sd)
            d_eff = fit.d_eff
        dp = fit.d_pad
        wht = next_pow2_array(d_eff)  # per block
        n_pad = next_pow2(dp)
        if kt_encode_ok(xp, dp, p["k"], bs, p["bit_width"]):
            codes, seg, centres_r, k_eff = self._code_blocks_fused(blocks, fit, d_eff, cfg)
        else:
            codes, seg, centres_r, k_eff = self._code_blocks(blocks, fit, wht, cfg)
        arrays.update(codes)

        seg_bits = int(k_eff.max() - 1).bit_length()
        if seg_bits:
            arrays["seg_packed"] = pack_bits(
                xp, seg.astype(xp.uint8), seg_bits
            )  # [B, ceil(bs*w/8)]
        store = xp.float16 if sd == "f16" else xp.float32
        arrays["mean"] = fit.mean.astype(store)
        arrays["basis"] = fit.basis.astype(store)
        arrays["centres"] = centres_r.astype(store)
        meta.update(
            d_eff=d_eff,
            pca_d_eff=fit.d_eff,
            k_eff=k_eff,
            wht_len=wht,
            wht_pad=n_pad,
            d_pad=dp,
            seg_bits=seg_bits,
        )
        return Encoded(shape=(n_kv, t_len, d), arrays=arrays, meta=meta)

    def _code_blocks(self, blocks, fit: PcaFit, wht: np.ndarray, cfg: dict):
        """Projection, K-means and residual code of every block ``[B, bs, D]`` as array ops
        (NumPy, and CuPy shapes the kernels do not take). Returns ``(codes, seg [B, bs], rounded
        centres [B, K, Dp], host k_eff)``; ``codes``: ``res_packed``, ``t`` (and ``norm``)."""
        xp = self.xp
        p = self.params
        n_full, bs, d = blocks.shape
        if cfg["shared"]:
            coeffs = pca_project(xp, blocks.reshape(1, n_full * bs, d), fit).reshape(n_full, bs, -1)
        else:
            coeffs = pca_project(xp, blocks, fit)
        dp = fit.d_pad

        centres, k_eff = fit_spherical_kmeans(xp, coeffs, p["k"], cfg["seed"], p["kmeans_max_iter"])
        centres_r = _round_store(xp, centres, p["skeleton_dtype"])

        # assign_and_project with the stored (rounded) centres
        proj = xp.matmul(coeffs, centres_r.transpose(0, 2, 1))  # [B, bs, K]
        cmask = xp.asarray(np.arange(p["k"])[None, :] < k_eff[:, None])
        seg = xp.argmax(xp.where(cmask[:, None, :], xp.abs(proj), xp.float32(-np.inf)), axis=-1)
        t = xp.take_along_axis(proj, seg[..., None], axis=-1)[..., 0]
        small = (coeffs * coeffs).sum(axis=-1) <= xp.float32(EPS)
        seg = xp.where(small, 0, seg)
        t = xp.where(small, xp.float32(0), t)
        cen_rows = xp.take_along_axis(centres_r, seg[..., None], axis=1)  # [B, bs, Dp]
        res = coeffs - t[..., None] * cen_rows
        all_small = (xp.abs(coeffs) <= xp.float32(EPS)).all(axis=-1)
        res = xp.where(all_small[..., None], xp.float32(0), res)

        # residual coding
        n_pad = next_pow2(dp)
        m = signed_hadamard(xp, sign_pattern(cfg["seed"], n_pad), n_rows=dp)  # [Dp, N]
        rot = xp.matmul(res, m)  # [B, bs, N]
        res_norm = xp.sqrt((res * res).sum(axis=-1))
        ok = res_norm > xp.float32(EPS)
        safe = xp.where(ok, res_norm, xp.float32(1))
        if p["wht_scale"] == "legacy_sqrtN":
            num = xp.asarray(np.sqrt(wht.astype(np.float32)))[:, None]
        else:
            num = xp.float32(1)
        scale = xp.where(ok, num / safe, xp.float32(1)).astype(xp.float32)
        z = rot * scale[..., None]
        q = quantize_nearest(xp, z, KT_LLOYD_MAX[p["bit_width"]])
        coord_ok = xp.asarray(np.arange(n_pad)[None, :] < wht[:, None])  # [B, N]
        q = xp.where(coord_ok[:, None, :], q, xp.uint8(0))
        codes = {"res_packed": pack_bits(xp, q, p["bit_width"])}  # [B, bs, ceil(N*b/8)]
        codes["t"] = t.astype(xp.float16)
        if cfg["norm_used"]:
            inv = xp.float32(1) / xp.maximum(scale, xp.float32(EPS))
            if p["wht_scale"] == "fixed":
                # Rust stores 1/scale = 1 for a zero residual, which decodes to a spurious
                # residual of norm ~0.25 (its all-zero z maps to the centroid next to 0);
                # the corrected codec stores 0 there.
                inv = xp.where(ok, inv, xp.float32(0))
            codes["norm"] = inv.astype(xp.float16)
        return codes, seg, centres_r, k_eff

    def _kt_encode_options(self, cfg: dict) -> dict[str, Any]:
        """Keyword arguments of ``kt_encode_blocks`` for a stream configured as ``cfg``."""
        p = self.params
        return {
            "k": p["k"],
            "bits": p["bit_width"],
            "max_iter": p["kmeans_max_iter"],
            "round16": p["skeleton_dtype"] == "f16",
            "legacy_scale": p["wht_scale"] == "legacy_sqrtN",
            "norm_mode": (2 if p["wht_scale"] == "fixed" else 1) if cfg["norm_used"] else 0,
        }

    def _code_blocks_fused(self, blocks, fit: PcaFit, d_eff: np.ndarray, cfg: dict):
        """:meth:`_code_blocks` on CuPy: per chunk of blocks one projection GEMM and one
        ``kt_encode_blocks`` launch (K-means to convergence, residual code, packing); one host
        sync, for ``K_eff``. Chunks bound the temporaries (any input size fits the device)."""
        xp = self.xp
        p = self.params
        n_full, bs, d = blocks.shape
        dp = fit.d_pad
        dp4 = kt_pad(dp)
        tabs = _kt_tables(xp, cfg["seed"], bs, next_pow2(dp), p["bit_width"])
        bt = xp.zeros((fit.basis.shape[0], d, dp4), dtype=xp.float32)  # zero columns >= d_pad
        bt[:, :, :dp] = fit.basis.transpose(0, 2, 1)
        d_eff_dev = xp.asarray(d_eff.astype(np.int32))
        opts = self._kt_encode_options(cfg)
        parts = []
        step = _chunk(xp, n_full, 4 * bs * (2 * d + dp4))
        for s in range(0, n_full, step):
            blk = blocks[s : s + step]
            if cfg["shared"]:
                coef = xp.matmul((blk - fit.mean[0]).reshape(-1, d), bt[0]).reshape(-1, bs, dp4)
            else:
                coef = xp.matmul(blk - fit.mean[s : s + step, None, :], bt[s : s + step])
            parts.append(
                kt_encode_blocks(
                    xp,
                    coef,
                    tabs["first"],
                    d_eff_dev[s : s + step],
                    tabs["signs"],
                    tabs["mids"],
                    **opts,
                )
            )
        out = join_chunks(xp, parts)
        codes = {"res_packed": out["packed"], "t": out["t"]}
        if opts["norm_mode"]:
            codes["norm"] = out["norm"]
        k_eff = to_numpy(out["k_eff"]).astype(np.int64)
        return codes, out["seg"], xp.ascontiguousarray(out["centres"][:, :, :dp]), k_eff

    # -- decode ----------------------------------------------------------------------------
    def decode_coefficients(self, enc: Encoded):
        """PCA-space decode of the full blocks: ``(c_hat, r_hat)``, both ``[B, bs, Dp]``.

        ``r_hat`` is the decoded residual (spec 2.7 ``u[:d_eff]``), ``c_hat = t*centre_s + r_hat``.
        """
        xp = self.xp
        meta = enc.meta
        n_full = meta["n_blocks"]
        bs = meta["block_size"]
        b = meta["bit_width"]
        n_pad = meta["wht_pad"]
        dp = meta["d_pad"]
        wht = meta["wht_len"]
        d_eff = meta["d_eff"]

        q = unpack_bits(xp, enc.arrays["res_packed"], b, n_pad)  # [B, bs, N]
        table = xp.asarray(np.asarray(KT_LLOYD_MAX[b], dtype=np.float32))
        v = table[q.astype(xp.int64)]
        coord_ok = xp.asarray(np.arange(n_pad)[None, :] < wht[:, None])
        v = xp.where(coord_ok[:, None, :], v, xp.float32(0))
        if meta["norm_used"]:
            v = v * enc.arrays["norm"].astype(xp.float32)[..., None]
        m = signed_hadamard(xp, sign_pattern(meta["seed"], n_pad), n_rows=dp)  # [Dp, N]
        u = xp.matmul(v, m.T) / xp.asarray(wht.astype(np.float32))[:, None, None]
        keep = xp.asarray(np.arange(dp)[None, :] < d_eff[:, None])
        r_hat = xp.where(keep[:, None, :], u, xp.float32(0))

        centres = enc.arrays["centres"].astype(xp.float32)
        if meta["seg_bits"]:
            seg = unpack_bits(xp, enc.arrays["seg_packed"], meta["seg_bits"], bs).astype(xp.int64)
        else:
            seg = xp.zeros((n_full, bs), dtype=xp.int64)
        cen_rows = xp.take_along_axis(centres, seg[..., None], axis=1)
        c_hat = enc.arrays["t"].astype(xp.float32)[..., None] * cen_rows + r_hat
        return c_hat, r_hat

    def decode(self, enc: Encoded):
        xp = self.xp
        meta = enc.meta
        n_kv, t_len, d = enc.shape
        tail = enc.arrays["tail"].astype(xp.float32)
        n_full = meta["n_blocks"]
        if n_full == 0:
            return tail.reshape(n_kv, t_len, d)
        bs = meta["block_size"]
        dp = meta["d_pad"]
        a = enc.arrays
        if kt_decode_ok(xp, dp, int(a["centres"].shape[1]), d, meta["bit_width"]):
            # one kernel: unpack, centroids, FWHT, t * centre and unprojection, into the output
            out = xp.empty((n_kv * t_len, d), dtype=xp.float32)
            n_enc = n_full * bs
            tabs = _kt_tables(xp, meta["seed"], bs, meta["wht_pad"], meta["bit_width"])
            kt_decode_blocks(
                xp,
                a["res_packed"],
                a["t"],
                a["norm"] if meta["norm_used"] else None,
                a.get("seg_packed"),
                meta["seg_bits"],
                a["centres"],
                a["basis"],
                a["mean"],
                xp.asarray(np.asarray(meta["d_eff"], dtype=np.int32)),
                tabs["signs"],
                tabs["table"],
                out[:n_enc],
            )
            out[n_enc:] = tail
            return out.reshape(n_kv, t_len, d)
        c_hat, _ = self.decode_coefficients(enc)
        mean = enc.arrays["mean"].astype(xp.float32)
        basis = enc.arrays["basis"].astype(xp.float32)
        if meta["shared"]:
            x_hat = mean[0] + xp.matmul(c_hat.reshape(n_full * bs, dp), basis[0])
        else:
            x_hat = (mean[:, None, :] + xp.matmul(c_hat, basis)).reshape(n_full * bs, d)
        out = xp.concatenate((x_hat.astype(xp.float32), tail), axis=0)
        return out.reshape(n_kv, t_len, d)

    # -- bytes -----------------------------------------------------------------------------
    def nbytes(self, enc: Encoded) -> dict[str, int]:
        meta = enc.meta
        d = meta["dim"]
        tail = 2 * meta["tail_rows"] * d
        if meta["n_blocks"] == 0:
            return {"skeleton": 0, "codes": 0, "norms": 0, "tail": tail}
        s = SKELETON_DTYPES[meta["skeleton_dtype"]]
        bs = meta["block_size"]
        d_eff = np.asarray(meta["d_eff"], dtype=np.int64)
        k_eff = np.asarray(meta["k_eff"], dtype=np.int64)
        pca_d = np.asarray(meta["pca_d_eff"], dtype=np.int64)
        wht = np.asarray(meta["wht_len"], dtype=np.int64)
        skeleton = int((s * (d + pca_d * d) + 2).sum())
        skeleton += int((s * k_eff * d_eff + 1).sum())
        codes = int((bs * ((wht * meta["bit_width"] + 7) // 8 + 2)).sum())  # packed_nbytes + t
        codes += meta["n_blocks"] * packed_nbytes(bs, meta["seg_bits"]) if meta["seg_bits"] else 0
        norms = 2 * bs * meta["n_blocks"] if meta["norm_used"] else 0
        return {"skeleton": skeleton, "codes": codes, "norms": norms, "tail": tail}

    def legacy_nbytes(self, enc: Encoded) -> dict[str, int]:
        meta = enc.meta
        lb = kt_legacy_stream_bytes(
            meta["dim"],
            meta["d_eff"],
            meta["k_eff"],
            meta["block_size"],
            bit_width=meta["bit_width"],
            shared_d_eff=int(meta["pca_d_eff"][0]) if meta["shared"] and meta["n_blocks"] else None,
            skeleton_bytes=SKELETON_DTYPES[meta["skeleton_dtype"]],
            tail_rows=meta["tail_rows"],
        )
        return {
            "legacy_kt_bytes": lb["total"],
            "legacy_kt_skeleton_bytes": lb["skeleton"],
            "legacy_kt_codes_bytes": lb["codes"],
            "legacy_kt_tail_bytes": lb["tail"],
        }
