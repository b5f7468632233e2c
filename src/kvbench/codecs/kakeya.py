"""KV1: the Kakeya codec (PCA -> temporal direction -> spherical K-means -> sparse residual).

Spec: ``specs/kakeya.md`` §1 (algorithm and bytes), §5 (bugs). Every block (and, with
``pool_heads=False``, every head of every block) is one *problem* of ``N`` rows; problems are
batched along a leading axis ``P``, in chunks sized to a memory budget (:data:`CHUNK_BYTES`).
Blocks with different ``d_eff`` share one padded coefficient width ``d_max``: basis rows,
coefficient columns, centre columns and ``t_dir`` entries beyond a problem's own ``d_eff`` are
exactly zero, which leaves every dot product, norm, cosine and arg-max of that problem unchanged.
K-means stops per problem (masks), so a block's result does not depend on the blocks batched with
it, nor on the chunking. Encoding is two passes over the chunks: the PCAs (which fix ``d_max``),
then the codes.

Layout of one layer-stream ``x: [n_kv, T, D]``:

- ``n_blocks = max((T - R) // B, 0)``; tokens ``[0, n_blocks*B)`` are compressed, the rest is an
  exact bf16 tail.
- ``pool_heads=True`` (legacy, spec §1.2): problem ``b`` = rows of all heads of block ``b``,
  head-major, ``N = n_kv*B``. ``pool_heads=False``: problem ``h*n_blocks + b`` = head ``h`` of
  block ``b``, ``N = B``. ``enc.meta['d_eff']`` lists d_eff per problem in this order.

Design choices:

- PCA: eigh of the ``D x D`` Gram of the centred rows (batched). The Gram is one batched float32
  matmul; the eigen-decomposition runs in float64 (as fast as float32 with LAPACK, orthonormal to
  ~1e-15). Eigenvectors are sign-canonicalised (largest-|.| entry positive), so the stored basis
  does not depend on the LAPACK/cuSOLVER sign convention (the sign never changes a reconstruction).
  d_eff equals the float64-SVD route on the KV-like test data.
- ``tdir_mode='first_pc'`` is the corrected default. The spec's temporal direction is the
  normalised mean of already-centred coefficients, i.e. float32 round-off noise (§5.1): a random
  unit vector of the PCA subspace that differs between BLAS builds, whose exact scalar ``alpha``
  captures on average ``1/d_eff`` of the block variance. ``e_0`` (the first principal direction) is
  deterministic and is the single direction that captures the most variance, so the one exact
  scalar per row removes the most error, at identical bytes (8-10% lower MSE than
  ``legacy_noise`` on synthetic KV-like data). ``none`` drops alpha and t_dir (fewer bytes,
  legacy-like MSE).
- ``store='packed'`` is the corrected default (§5.2): bf16 skeleton and per-row scalars/values,
  u8 seg id (K_act <= 256, else u16), u8 residual indices when ``d_eff <= 256`` (u16 otherwise), no
  indices at all when the residual is dense (``d_eff <= d_res``: the index list is implied), plus a
  4-byte per-block header (u16 d_eff, u16 K_act) that a decoder needs. Mean and basis are rounded
  right after the PCA, so K-means and the codes live in the stored coefficient space; each later
  rounding is fed forward (alpha is rounded before the perpendicular part is formed, t before the
  residual), so the residual absorbs the earlier roundings and decode reproduces what is stored.
  (``legacy_noise`` is meant for the f32 store; with ``packed`` its direction comes from the
  mean's bf16 rounding.)
- K-means speed: signed cosines are laid out ``[P, K, N]`` so the arg-max is a max over the middle
  axis; on NumPy, member sums are updated with the rows that changed cluster only (float64);
  the working set is re-compacted as problems converge; a state that repeats exactly (the
  empty-cluster rule can make the loop cycle until ``max_iter``, e.g. for d_eff = 2 blocks) ends
  the loop for that problem with the state and iteration count that ``max_iter`` would give.
- CuPy: the K-means loop, the per-row codes, the temporal split with the row norms and unit rows,
  and the decoder (coefficient rows, basis product, mean, into the output in one pass) are device
  kernels (``gpu.kakeya_kv1``: one thread block per problem, no host sync inside the loop); the
  Gram goes to cuBLAS with a transpose flag (``linalg.batched_gram``: no transposed copy); the
  legacy t_dir mean is a batched GEMV (CuPy's mean over axis 1 is slow). The array path remains
  for shapes the kernels do not take (more than 32 centres, ``d_res`` 0 or above 16; decode:
  head_dim not a multiple of 16). The kernels read rows as float4, so on that path the working
  coefficient width is ``d_max`` rounded up to a multiple of 4 (zero columns; stored arrays keep
  ``d_max``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from kvbench.backend import device_free_bytes
from kvbench.codecs.base import Codec, Encoded, bf16_round, register
from kvbench.codecs.gpu.kakeya_kv1 import (
    kv1_codes,
    kv1_coeffs,
    kv1_decode,
    kv1_decode_ok,
    kv1_fused_ok,
    kv1_kmeans,
    kv1_row_norms,
    kv1_split,
    kv1_sub_outer,
)
from kvbench.codecs.linalg import batched_eigh, batched_gram, float32_eigh_ok
from kvbench.cpu_threads import map_chunks, workers
from kvbench.errors import KvbenchError

TDIR_MODES = ("legacy_noise", "first_pc", "none")
STORES = ("f32", "packed")
#: Row-norm threshold of the spec (valid K-means rows, legacy t_dir test) and normalize eps.
EPS = 1e-8
#: Working-memory budget of one chunk of problems in bytes; ``None``: 60% of the device's free
#: memory (CuPy) or 1 GiB (NumPy). Problems are independent: the chunking never changes a result.
CHUNK_BYTES: int | None = None


# ----------------------------------------------------------------------------------------------
# byte formulas (pure integer arithmetic, usable without any data)


def kv1_f32_block_bytes(
    d_eff: int, n_rows: int, head_dim: int, k_act: int, d_res: int, tdir: bool = True
) -> tuple[int, int]:
    """``(skeleton, encoded)`` bytes of one block in the f32 store as measured (spec §1.6).

    skeleton = 4*(d_eff*D + D + d_eff + K_act*d_eff); encoded = N*(16 + 12*r'), r' = min(d_res,
    d_eff) (int64 seg id, f32 alpha and t, f32 values + int64 indices). Without a temporal
    direction (``tdir=False``) t_dir and alpha are not stored.
    """
    r = min(d_res, d_eff)
    skel = 4 * (d_eff * head_dim + head_dim + (d_eff if tdir else 0) + k_act * d_eff)
    enc = n_rows * (8 + (4 if tdir else 0) + 4 + 12 * r)
    return skel, enc


def packed_block_bytes(
    d_eff: int, n_rows: int, head_dim: int, k_act: int, d_res: int, tdir: bool = True
) -> tuple[int, int]:
    """``(skeleton, codes)`` bytes of one block in the packed store.

    skeleton = 4 (u16 d_eff + u16 K_act header) + 2*(d_eff*D + D + d_eff + K_act*d_eff) (bf16);
    per row: seg id u8 (u16 if K_act > 256), bf16 alpha, bf16 t, r' bf16 values and r' indices of
    u8 (d_eff <= 256) or u16, where the indices are omitted when r' == d_eff (dense residual).
    """
    r = min(d_res, d_eff)
    skel = 4 + 2 * (d_eff * head_dim + head_dim + (d_eff if tdir else 0) + k_act * d_eff)
    seg_w = 1 if k_act <= 256 else 2
    idx_w = 0 if r == d_eff else (1 if d_eff <= 256 else 2)
    row = seg_w + (2 if tdir else 0) + 2 + r * (2 + idx_w)
    return skel, n_rows * row


# ----------------------------------------------------------------------------------------------
# batched building blocks (xp = numpy or cupy)


def n_compressed_blocks(tokens: int, block_size: int, residual_length: int) -> int:
    """``max((T - R) // B, 0)`` (spec §1.2)."""
    return max((tokens - residual_length) // block_size, 0)


def chunk_ranges(xp: ModuleType, n_problems: int, per_problem: int) -> list[tuple[int, int]]:
    """Near-equal ranges of problems whose working sets (``per_problem`` bytes each) fit the
    chunk budget :data:`CHUNK_BYTES`."""
    budget = CHUNK_BYTES
    if budget is None:
        budget = 1 << 30 if xp is np else device_free_bytes(xp) * 3 // 5
    n = max(1, -(-n_problems * per_problem // max(budget, 1)))
    if xp is np:  # at least one chunk per CPU thread (map_chunks runs them in parallel)
        n = max(n, workers())
    n = min(n, max(n_problems, 1))
    step = -(-n_problems // n)
    return [(s, min(s + step, n_problems)) for s in range(0, n_problems, step)]


def block_view(x, n_blocks: int, block_size: int):
    """``[n_kv, T, D]`` -> view ``[n_kv, n_blocks, B, D]`` of the compressed prefix."""
    n_kv, _, d = x.shape
    return x[:, : n_blocks * block_size].reshape(n_kv, n_blocks, block_size, d)


def _head_pieces(n_blocks: int, p0: int, p1: int):
    """Problems ``p0..p1`` of the per-head layout (``h * n_blocks + b``) as ``(h, b0, b1)``."""
    for h in range(p0 // n_blocks, (p1 - 1) // n_blocks + 1):
        yield h, max(p0 - h * n_blocks, 0), min(p1 - h * n_blocks, n_blocks)


def problem_rows(xp: ModuleType, blocks, p0: int, p1: int, pool_heads: bool):
    """Problems ``p0..p1`` of ``blocks [n_kv, nb, B, D]`` as ``[p1 - p0, N, D]`` float32 (a view
    of ``blocks`` where the layout allows)."""
    n_kv, nb, B, d = blocks.shape
    if pool_heads:
        rows = blocks[:, p0:p1].transpose(1, 0, 2, 3).reshape(p1 - p0, n_kv * B, d)
    else:
        pieces = [blocks[h, b0:b1] for h, b0, b1 in _head_pieces(nb, p0, p1)]
        rows = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces)
    return xp.ascontiguousarray(rows, dtype=xp.float32)


def centred_rows(xp: ModuleType, blocks, p0: int, p1: int, pool_heads: bool, mean=None):
    """``(Xc, mean)``: problems ``p0..p1`` minus their row mean (or the given ``mean [n, D]``).
    CuPy reads the head-pooled layout through its strided view (no gathered copy of the rows)."""
    if xp is np or not pool_heads:
        X = problem_rows(xp, blocks, p0, p1, pool_heads)
        mean = X.mean(axis=1) if mean is None else mean
        return X - mean[:, None, :], mean
    V = blocks[:, p0:p1].transpose(1, 0, 2, 3)  # [n, n_kv, B, D]
    if mean is None:
        mean = V.mean(axis=(1, 2), dtype=xp.float32)
    Xc = xp.empty(V.shape, dtype=xp.float32)
    xp.subtract(V, mean[:, None, None, :], out=Xc)
    n, h, B, d = V.shape
    return Xc.reshape(n, h * B, d), mean


def put_problems(xp: ModuleType, blocks, p0: int, p1: int, pool_heads: bool, rows, mean):
    """Inverse of :func:`problem_rows`: write ``rows [p1 - p0, N, D] + mean [p1 - p0, D]`` into
    ``blocks``."""
    n_kv, nb, B, d = blocks.shape
    if pool_heads:
        out = blocks[:, p0:p1].transpose(1, 0, 2, 3)
        xp.add(rows.reshape(p1 - p0, n_kv, B, d), mean[:, None, None, :], out=out)
        return
    for h, b0, b1 in _head_pieces(nb, p0, p1):
        q = h * nb + b0 - p0
        xp.add(rows[q : q + b1 - b0], mean[q : q + b1 - b0, None, :], out=blocks[h, b0:b1])


def fit_pca(xp: ModuleType, Xc, variance_ratio: float):
    """Batched PCA of the centred rows ``Xc: [P, N, D]`` (spec §1.3 step 2).

    Returns ``basis [P, d_max, D]`` float32 (orthonormal rows; rows >= d_eff are zero) and
    ``d_eff [P]`` (host int64): the first 1-based i whose cumulative variance share is >=
    variance_ratio (len(S) = min(N, D) if none), clamped to [2, D]. Route: the D x D Gram by one
    batched float32 matmul, eigh in float64, eigenvectors sign-canonicalised.
    """
    P, N, D = Xc.shape
    gram = batched_gram(xp, Xc)
    if float32_eigh_ok(xp, D):
        # CuPy: the batched float32 Jacobi kernel or cuSOLVER's batched solver (~1e-5 relative
        # reconstruction error or better, and 10-100x faster than cupy.linalg.eigh in float64 on
        # a stack); eigenvalues widened to float64 for the cumulative-variance rule, as on NumPy
        w, V = batched_eigh(xp, gram)
        w = w.astype(xp.float64)
    else:
        w, V = xp.linalg.eigh(gram.astype(xp.float64))  # ascending
    w = xp.maximum(w[:, ::-1], 0.0)
    total = xp.maximum(w.sum(axis=1), EPS)
    reached = xp.cumsum(w, axis=1) / total[:, None] >= variance_ratio
    first = xp.argmax(reached.astype(xp.int8), axis=1) + 1
    d_eff = xp.where(reached.any(axis=1), first, min(N, D))
    d_eff = np.clip(_host(d_eff).astype(np.int64), 2, D)
    d_max = int(d_eff.max())
    basis = V[:, :, ::-1][:, :, :d_max].transpose(0, 2, 1)  # [P, d_max, D]
    # canonical sign: the largest-|.| entry of every basis row is positive
    piv = xp.argmax(xp.abs(basis), axis=2)
    sign = xp.sign(xp.take_along_axis(basis, piv[:, :, None], axis=2))
    sign = xp.where(sign == 0, 1.0, sign)
    rowmask = xp.asarray(np.arange(d_max)[None, :] < d_eff[:, None])
    basis = xp.where(rowmask[:, :, None], basis * sign, 0.0).astype(xp.float32)
    return xp.ascontiguousarray(basis), d_eff


def temporal_direction(xp: ModuleType, A, mode: str):
    """``t_dir [P, d_max]`` (spec §1.3 step 4); ``None`` for ``mode='none'``."""
    P, _, d_max = A.shape
    if mode == "none":
        return None
    e0 = xp.zeros((P, d_max), dtype=xp.float32)
    e0[:, 0] = 1.0
    if mode == "first_pc":
        return e0
    # round-off noise: the rows of A are already centred (spec §5.1); CuPy: one batched GEMV (its
    # strided mean over axis 1 is a slow reduction)
    if xp is np:
        m = A.mean(axis=1)
    else:
        m = xp.matmul(xp.ones((1, A.shape[1]), dtype=xp.float32), A)[:, 0] / xp.float32(A.shape[1])
    nrm = xp.sqrt((m * m).sum(axis=1))
    ok = nrm > EPS
    return xp.where(ok[:, None], m / xp.where(ok, nrm, 1.0)[:, None], e0).astype(xp.float32)


def split_temporal(xp: ModuleType, A, tdir, mode: str, round_alpha: bool):
    """``alpha = A t_dir`` (optionally bf16-rounded) and ``P = A - alpha t_dir^T``."""
    if tdir is None:
        return None, A
    if mode == "first_pc":  # t_dir = e_0 exactly: same values as the general formula, cheaper
        alpha = A[:, :, 0].copy()
        if round_alpha:
            alpha = bf16_round(xp, alpha)
        Pp = A.copy()
        Pp[:, :, 0] -= alpha
        return alpha, Pp
    if xp is np:
        alpha = xp.einsum("pnd,pd->pn", A, tdir)
    else:  # CuPy's einsum here is a slow generic path; one batched GEMV and one fused kernel
        alpha = xp.matmul(A, tdir[:, :, None])[:, :, 0]
    if round_alpha:
        alpha = bf16_round(xp, alpha)
    if xp is np:
        return alpha, A - alpha[:, :, None] * tdir[:, None, :]
    return alpha, kv1_sub_outer(xp, A, alpha, tdir)


def _row_norms(xp: ModuleType, v):
    return xp.sqrt(xp.einsum("pnd,pnd->pn", v, v)) if xp is np else kv1_row_norms(xp, v)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _normalize_rows(xp: ModuleType, v):
    """``F.normalize(v, dim=-1, eps=1e-8)``."""
    nrm = xp.sqrt((v * v).sum(axis=-1, keepdims=True))
    return v / xp.maximum(nrm, EPS)


def _argmax_k(xp: ModuleType, S, valid):
    """First-index arg-max over axis 1 of ``S [W, K, N]``, and its one-hot ``[W, K, N]`` f32.

    Fast path: ``max`` over the (middle) centre axis, an equality one-hot, and one small matmul
    that yields, per row, the sum of the arg-max indices and their count. Rows whose count is not
    1 (ties, or invalid all-zero rows) are redone with ``argmax`` (first index on ties); the
    one-hot of an invalid row is zero, so it never joins a cluster.
    """
    K = S.shape[1]
    m = S.max(axis=1)
    oh = (m[:, None, :] == S).astype(xp.float32)
    probe = xp.stack([xp.arange(K, dtype=xp.float32), xp.ones(K, dtype=xp.float32)])
    ic = xp.matmul(probe, oh)  # [W, 2, N]: index sum, count
    idx = ic[:, 0].astype(xp.int64)
    bad = ic[:, 1] != 1
    if bool(bad.any()):
        w, n = xp.nonzero(bad)
        j = xp.argmax(S[w, :, n], axis=1)
        idx[w, n] = j
        oh[w, :, n] = 0.0
        oh[w, j, n] = valid[w, n].astype(xp.float32)
    return idx, oh


def _farthest_first(xp: ModuleType, UT, valid, k_act, K: int):
    """Deterministic farthest-first init on signed cosine (spec §1.3 step 7), batched.

    ``UT [P, d, N]``. Centre 0 = first valid row; centre k = the valid row whose max cosine to
    centres 0..k-1 is smallest (first index on ties). Centres k >= k_act[p] stay zero.
    """
    P, d, N = UT.shape
    pi = xp.arange(P)
    C = xp.zeros((P, K, d), dtype=xp.float32)
    first = xp.argmax(valid.astype(xp.int8), axis=1)
    C[:, 0] = UT[pi, :, first]
    maxcos = xp.matmul(C[:, :1], UT)[:, 0]
    k_act_x = xp.asarray(k_act)
    for k in range(1, K):
        use = k < k_act_x
        j = xp.argmin(xp.where(valid, maxcos, xp.inf), axis=1)
        ck = xp.where(use[:, None], UT[pi, :, j], 0.0)
        C[:, k] = ck
        cos = xp.matmul(ck[:, None, :], UT)[:, 0]
        maxcos = xp.where(use[:, None], xp.maximum(maxcos, cos), maxcos)
    return C


def _empty_cluster_pass(xp, UTe, valid, C_old, S_old, se, assign, k_act_x, bias):
    """Sequential centre update of spec §1.3 step 7 for the problems that have an empty cluster.

    Clusters are visited in order k = 0..K-1 (batched over these problems): a non-empty cluster
    takes the normalised mean of its current members; an empty one (k < K_act) takes the valid
    direction with the smallest max-cosine to the current, partly updated, centres (all K_act of
    them), and that row is moved to k (which may empty a later cluster). ``S_old`` holds the
    cosines to ``C_old`` and ``se`` the member sums/counts of ``assign``; rows of the cosine
    matrix are refreshed lazily (only before a refill), and a moved row is subtracted from its
    old cluster's sums, so a pass costs a few matrix-vector products.
    """
    P, d1, N = UTe.shape
    d = d1 - 1
    UT = UTe[:, :d]
    K = C_old.shape[1]
    pi = xp.arange(P)
    C = C_old.copy()
    S = S_old.copy()
    se = se.copy()
    assign = assign.copy()
    fresh = 0  # rows < fresh of S are up to date with C
    for k in range(K):
        cnt = se[:, k, d]
        mean = (se[:, k, :d] / xp.maximum(cnt, 1.0)[:, None]).astype(xp.float32)
        C[:, k] = xp.where((cnt > 0)[:, None], _normalize_rows(xp, mean), C[:, k])
        empty = (cnt == 0) & (k < k_act_x)
        if not bool(empty.any()):
            continue
        if fresh < k:  # centres fresh..k-1 were updated since the cosines were formed
            S[:, fresh:k] = xp.matmul(C[:, fresh:k], UT)
            if bias is not None:
                S[:, fresh:k] += bias[:, fresh:k]
        far = xp.argmin(xp.where(valid, S.max(axis=1), xp.inf), axis=1)
        C[:, k] = xp.where(empty[:, None], UT[pi, :, far], C[:, k])
        src = assign[pi, far]
        assign[pi, far] = xp.where(empty, k, src)
        row = UTe[pi, :, far].astype(se.dtype) * empty[:, None]
        se[pi, src] -= row
        se[pi, k] += row
        fresh = k  # row k of S still holds the old centre k
    return C, assign, se


def spherical_kmeans(xp: ModuleType, U, valid, k_act, max_iter: int):
    """Batched spherical K-means with signed cosine (spec §1.3 steps 6-7).

    ``U [P, N, d]``: unit directions (zero rows where not valid); ``valid [P, N]`` bool;
    ``k_act [P]`` host ints (centres per problem, >= 1). The caller excludes problems with fewer
    than 2 valid rows. Each problem stops on its own as soon as its assignment no longer changes,
    so the result equals running every problem alone. Returns ``centres [P, K, d]`` (rows >= k_act
    zero), ``assign [P, N]`` and the Lloyd iterations per problem (host ints).
    """
    P, N, d = U.shape
    UTe = xp.empty((P, d + 1, N), dtype=xp.float32)
    UTe[:, :d] = U.transpose(0, 2, 1)
    UTe[:, d] = valid
    return _kmeans_t(xp, UTe, valid, k_act, max_iter)


def _kmeans_t(xp: ModuleType, UTe, valid, k_act, max_iter: int):
    """:func:`spherical_kmeans` on ``UTe [P, d+1, N]`` = directions transposed + a validity row."""
    k_act = np.asarray(k_act, dtype=np.int64)
    P, d1, N = UTe.shape
    d = d1 - 1
    K = int(k_act.max()) if P else 1
    C = _farthest_first(xp, UTe[:, :d], valid, k_act, K)
    assign = xp.zeros((P, N), dtype=xp.int64)
    iters = xp.zeros(P, dtype=xp.int64)
    # K_act == 1: every row is assigned to centre 0 = the initial all-zero assignment, so the
    # spec's loop stops before its first update; such problems never enter the working set.
    live = np.nonzero(k_act >= 2)[0]
    if len(live) == 0 or max_iter == 0:
        return C, assign, _host(iters).astype(np.int64)
    if len(live) == P:
        W, UTw, vw, Cw, aw, itw = None, UTe, valid, C, assign, iters
        kw = xp.asarray(k_act)
    else:
        W = xp.asarray(live)
        UTw, vw, Cw, aw, itw = UTe[W], valid[W], C[W], assign[W], iters[W]
        kw = xp.asarray(k_act[live])
    kr = xp.arange(K)
    need_bias = bool((k_act[live] < K).any())
    bw = xp.where(kr[None, :] < kw[:, None], 0.0, -xp.inf).astype(xp.float32)[:, :, None]
    run = xp.ones(len(live), dtype=bool)
    size = len(live)

    def scatter_back():
        if W is None:  # the working arrays are the full arrays' replacements
            C[...] = Cw
            assign[...] = aw
            iters[...] = itw
        else:
            C[W] = Cw
            assign[W] = aw
            iters[W] = itw

    se = None  # [W, K, d+1] float64 member sums and counts of the current assignment ``aw``
    # post-update states of the last two iterations, for cycle detection: an empty-cluster refill
    # can make the loop revisit a state (it then runs to max_iter without converging); once a
    # problem's state repeats exactly, its state at max_iter is known and it leaves the loop
    hist: list = []
    for it in range(max_iter):
        S = xp.matmul(Cw, UTw[:, :d])  # [W, K, N] signed cosines
        if need_bias:
            S += bw
        new, oh = _argmax_k(xp, S, vw)
        changed = (new != aw) & run[:, None]
        run = run & changed.any(axis=1)
        n_run = int(run.sum())
        if n_run == 0:
            break
        se = _member_sums(xp, se, UTw, oh, new, aw, changed, kr)
        aw = xp.where(run[:, None], new, aw)
        itw = itw + run
        counts = se[:, :, d]
        mean = (se[:, :, :d] / xp.maximum(counts, 1.0)[:, :, None]).astype(xp.float32)
        upd = run[:, None] & (counts > 0)
        C_new = xp.where(upd[:, :, None], _normalize_rows(xp, mean), Cw)
        empty = run[:, None] & (counts == 0) & (kr[None, :] < kw[:, None])
        if bool(empty.any()):
            sl = xp.nonzero(empty.any(axis=1))[0]
            C_new[sl], aw[sl], se[sl] = _empty_cluster_pass(
                xp,
                UTw[sl],
                vw[sl],
                Cw[sl],
                S[sl],
                se[sl],
                aw[sl],
                kw[sl],
                bw[sl] if need_bias else None,
            )
        Cw = C_new
        left = max_iter - it - 1  # updates still to come for a problem that keeps changing
        if hist and left > 0:
            a1, c1 = hist[-1]
            same1 = run & (aw == a1).all(axis=1) & (Cw == c1).all(axis=(1, 2))
            cyc = same1
            if len(hist) == 2:
                a2, c2 = hist[0]
                same2 = run & ~same1 & (aw == a2).all(axis=1) & (Cw == c2).all(axis=(1, 2))
                cyc = cyc | same2
                if left % 2:  # period 2: an odd number of updates left ends on the other state
                    aw = xp.where(same2[:, None], a1, aw)
                    Cw = xp.where(same2[:, None, None], c1, Cw)
            if bool(cyc.any()):
                itw = itw + cyc * left
                run = run & ~cyc
                n_run = int(run.sum())
        hist = [*hist[-1:], (aw, Cw)]
        if 4 * n_run <= 3 * size:  # re-compact the working set
            scatter_back()
            if n_run == 0:
                break
            keep = xp.nonzero(run)[0]
            W = keep if W is None else W[keep]
            UTw, vw, Cw, aw, bw = UTw[keep], vw[keep], Cw[keep], aw[keep], bw[keep]
            kw, itw, run, se = kw[keep], itw[keep], run[keep], se[keep]
            hist = [(a[keep], c[keep]) for a, c in hist]
            size = n_run
    scatter_back()
    return C, assign, _host(iters).astype(np.int64)


def _member_sums(xp: ModuleType, se, UTe, oh, new, old, changed, kr):
    """Member sums and counts ``[W, K, d+1]`` (float64) of the assignment ``new``.

    From scratch (one matmul with the one-hot) the first time, on a GPU, or for the problems where
    many rows moved; otherwise (NumPy) ``se`` is updated with the rows that changed cluster only
    (+row into its new cluster, -row out of its old one), gathered into a compact ``[W, M]`` slab.
    Float64 accumulation keeps the running sums equal to fresh ones far below float32 resolution.
    The choice is made per problem, so a problem's sums do not depend on its batch (or chunk).
    """
    N = UTe.shape[2]
    if se is None or xp is not np:  # on a GPU the one matmul beats a dozen small gathers
        return xp.matmul(oh, UTe.transpose(0, 2, 1)).astype(xp.float64)
    n_changed = changed.sum(axis=1)
    fresh = 4 * n_changed > N
    if fresh.all():
        return xp.matmul(oh, UTe.transpose(0, 2, 1)).astype(xp.float64)
    if fresh.any():
        out = _member_sums(xp, se, UTe, oh, new, old, changed & ~fresh[:, None], kr)
        out[fresh] = xp.matmul(oh[fresh], UTe[fresh].transpose(0, 2, 1))
        return out
    M = int(n_changed.max())
    W = UTe.shape[0]
    wi, ni = xp.nonzero(changed)
    pos = xp.cumsum(changed, axis=1) - 1
    cols = xp.zeros((W, M), dtype=xp.int64)
    cols[wi, pos[wi, ni]] = ni
    live = xp.arange(M)[None, :] < n_changed[:, None]  # [W, M]
    g_new = xp.take_along_axis(new, cols, axis=1)
    g_old = xp.take_along_axis(old, cols, axis=1)
    delta = (g_new[:, None, :] == kr[None, :, None]).astype(xp.float64)
    delta -= (g_old[:, None, :] == kr[None, :, None]).astype(xp.float64)
    delta *= live[:, None, :]
    rows = UTe[xp.arange(W)[:, None], :, cols].astype(xp.float64)  # [W, M, d+1]
    return se + xp.matmul(delta, rows)


def _gather_rows(xp: ModuleType, C, s):
    """``C[p, s[p, n]]`` -> ``[P, N, d]``."""
    return C[xp.arange(C.shape[0])[:, None], s]


# ----------------------------------------------------------------------------------------------
# the codec


@register
class Kakeya(Codec):
    """KV1 Kakeya codec (spec §1), batched over all blocks and heads of a layer-stream.

    Parameters: ``block_size`` B, ``residual_length`` R (minimum exact recent tokens),
    ``variance_ratio`` (PCA cumulative-variance threshold), ``k_segments`` K, ``d_res`` (residual
    coordinates kept per row, in PCA-coefficient space), ``min_rows`` (a problem needs this many
    rows), ``max_iter`` (Lloyd iterations), ``pool_heads`` (True = legacy: one PCA over all KV heads
    of a block; False = per head), ``tdir_mode`` (``legacy_noise`` | ``first_pc`` | ``none``),
    ``store`` (``f32`` = as measured | ``packed``), ``seed`` (single-random-centre fallback).
    """

    family = "kakeya"
    COMPRESSES_SLIDING = False
    DEFAULTS = {
        "block_size": 512,
        "residual_length": 256,
        "variance_ratio": 0.95,
        "k_segments": 16,
        "d_res": 8,
        "min_rows": 8,
        "max_iter": 100,
        "pool_heads": False,
        "tdir_mode": "first_pc",
        "store": "packed",
        "seed": 0,
    }

    def check_params(self) -> None:
        p = self.params

        def integer(key: str, lo: int) -> int:
            v = p[key]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise self._param_error(key, f"must be an integer >= {lo}, got {v!r}")
            return int(v)

        integer("block_size", 1)
        integer("residual_length", 0)
        if integer("k_segments", 1) > 65535:
            raise self._param_error("k_segments", "must be <= 65535 (u16 segment ids)")
        integer("d_res", 0)
        integer("min_rows", 1)
        integer("max_iter", 0)
        integer("seed", 0)
        if p["block_size"] < p["min_rows"]:
            raise self._param_error(
                "block_size", f"({p['block_size']}) must be >= min_rows ({p['min_rows']})"
            )
        vr = p["variance_ratio"]
        if isinstance(vr, bool) or not isinstance(vr, (int, float)) or not 0.0 < vr <= 1.0:
            raise self._param_error("variance_ratio", f"must be in (0, 1], got {vr!r}")
        if not isinstance(p["pool_heads"], bool):
            raise self._param_error("pool_heads", f"must be true or false, got {p['pool_heads']!r}")
        if p["tdir_mode"] not in TDIR_MODES:
            raise self._param_error(
                "tdir_mode", f"must be one of {TDIR_MODES}, got {p['tdir_mode']!r}"
            )
        if p["store"] not in STORES:
            raise self._param_error("store", f"must be one of {STORES}, got {p['store']!r}")

    # ------------------------------------------------------------------------------------------

    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        xp = self.xp
        p = self.params
        if x.ndim != 3:
            raise KvbenchError(
                f"codec {self.name!r}: input must be [n_kv, T, D], got shape {tuple(x.shape)}"
            )
        n_kv, T, D = (int(s) for s in x.shape)
        B, pool = p["block_size"], p["pool_heads"]
        nb = n_compressed_blocks(T, B, p["residual_length"])
        tail = bf16_round(xp, x[:, nb * B :, :])
        meta: dict[str, Any] = {
            "n_blocks": nb,
            "tail_tokens": T - nb * B,
            "pool_heads": pool,
            "d_eff_layout": "block" if pool else "head*n_blocks+block",
            "d_eff": [],
            "k_act": [],
            "kmeans_iters": [],
        }
        if nb == 0:
            return Encoded(shape=(n_kv, T, D), arrays={"tail": tail}, meta=meta)
        P, N = (nb, n_kv * B) if pool else (n_kv * nb, B)
        if p["min_rows"] > N:
            raise self._param_error("min_rows", f"({p['min_rows']}) exceeds the block's rows ({N})")
        blocks = block_view(x, nb, B)
        K = min(p["k_segments"], N)
        # peak working bytes per problem: rows, centred rows and ~4 [N, width] coefficient arrays
        # on the kernel path; the array path adds [N, K] cosines and argsort temporaries
        wide = 8 if kv1_fused_ok(xp, K, min(p["d_res"], D), N, D) else 16
        ranges = chunk_ranges(xp, P, 4 * N * (wide * D + 4 * K) + 16 * D * D)

        # ---- pass 1: PCA (float32 rows, float64 eigh) of every chunk; d_max, the width of every
        # coefficient array, needs them all. A single chunk keeps its centred rows for pass 2.
        def fit(rng):
            Xc, mean = centred_rows(xp, blocks, *rng, pool)
            basis, d_eff = fit_pca(xp, Xc, p["variance_ratio"])
            return mean, basis, d_eff, Xc if len(ranges) == 1 else None

        fits = map_chunks(fit, ranges, parallel=xp is np)
        d_eff = np.concatenate([f[2] for f in fits])
        d_max = int(d_eff.max())
        kk = min(p["d_res"], d_max)
        fused = kv1_fused_ok(xp, K, kk, N, d_max)
        width = -(-d_max // 4) * 4 if fused else d_max

        # ---- pass 2: codes, chunk by chunk, into the output arrays
        packed = p["store"] == "packed"
        f32 = xp.float32
        o: dict[str, Any] = {"basis": xp.empty((P, d_max, D), f32), "mean": xp.empty((P, D), f32)}
        if p["tdir_mode"] != "none":
            o["tdir"], o["alpha"] = xp.empty((P, d_max), f32), xp.empty((P, N), f32)
        if kk > 0:
            o["res_vals"] = xp.empty((P, N, kk), f32)
            idx_dtype = (xp.uint8 if d_max <= 256 else xp.uint16) if packed else xp.int64
            o["res_idx"] = xp.empty((P, N, kk), idx_dtype)
        seg_dtype = (xp.uint8 if K <= 256 else xp.uint16) if packed else xp.int64
        o["seg"], o["t"] = xp.empty((P, N), seg_dtype), xp.empty((P, N), f32)
        k_act = np.empty(P, dtype=np.int64)
        iters = np.empty(P, dtype=np.int64)

        def code(item):  # writes rows p0..p1 of ``o``, k_act and iters only
            (p0, p1), (mean, basis, de, Xc) = item
            if Xc is None:
                Xc = centred_rows(xp, blocks, p0, p1, pool, mean)[0]
            if basis.shape[1] < width:
                basis = xp.concatenate(
                    [basis, xp.zeros((p1 - p0, width - basis.shape[1], D), f32)], axis=1
                )
            c, k_act[p0:p1], iters[p0:p1] = self._code_chunk(
                xp, Xc, mean, basis, de, p0, K, fused, o, layer, stream
            )
            return c

        centres = map_chunks(code, list(zip(ranges, fits, strict=True)), parallel=xp is np)
        Kc = int(k_act.max())
        C = xp.zeros((P, Kc, d_max), dtype=f32)
        for (p0, p1), c in zip(ranges, centres, strict=True):
            C[p0:p1, : c.shape[1]] = c[:, :, :d_max]
        if packed and Kc <= 256:
            o["seg"] = o["seg"].astype(xp.uint8, copy=False)
        arrays: dict[str, Any] = {"tail": tail, "basis": o["basis"], "mean": o["mean"]}
        arrays["centres"] = C
        for key in ("tdir", "alpha", "res_vals", "res_idx", "seg", "t"):
            if key in o:
                arrays[key] = o[key]
        meta.update(
            d_eff=[int(v) for v in d_eff],
            k_act=[int(v) for v in k_act],
            r_prime=[int(v) for v in np.minimum(p["d_res"], d_eff)],
            kmeans_iters=[int(v) for v in iters],
            rows_per_problem=N,
        )
        return Encoded(shape=(n_kv, T, D), arrays=arrays, meta=meta)

    def _code_chunk(self, xp, Xc, mean, basis, d_eff, p0, K, fused, o, layer, stream):
        """Pass 2 of :meth:`encode` for the problems ``p0..`` (centred rows ``Xc``, ``basis`` of the
        working width): projection, temporal split, K-means and the per-row codes, written into the
        output arrays ``o``. Returns ``(centres [n, Kc, width], k_act, iters)``."""
        p = self.params
        packed, mode = p["store"] == "packed", p["tdir_mode"]
        sl = slice(p0, p0 + Xc.shape[0])
        d_max = o["basis"].shape[1]
        # the packed store rounds mean and basis to bf16 right away, so that K-means and the codes
        # live in the stored coefficient space
        if packed:
            mean_r, basis = bf16_round(xp, mean), bf16_round(xp, basis)
            # (X - mean_r) basis_r^T without another pass over X
            shift = xp.matmul(basis, (mean - mean_r)[:, :, None])[:, :, 0]
            A = xp.matmul(Xc, basis.transpose(0, 2, 1)) + shift[:, None, :]
            mean = mean_r
        else:
            A = xp.matmul(Xc, basis.transpose(0, 2, 1))  # [n, N, width]
        o["basis"][sl], o["mean"][sl] = basis[:, :d_max], mean
        tdir = temporal_direction(xp, A, mode)
        if packed and tdir is not None:
            tdir = bf16_round(xp, tdir)
        if fused:  # CuPy: split, row norms and unit rows in one pass over A
            alpha, Pp, nrm, U = kv1_split(xp, A, tdir, EPS)
        else:
            alpha, Pp = split_temporal(xp, A, tdir, mode, round_alpha=False)
            nrm, U = _row_norms(xp, Pp), None
        valid = nrm > EPS
        n_valid = _host(valid.sum(axis=1)).astype(np.int64)
        runs = n_valid >= 2
        k_act = np.where(runs, np.minimum(K, n_valid), 1)
        C, iters = self._centres(xp, Pp, U, nrm, valid, runs, k_act, d_eff, p0, layer, stream)

        # ---- per-row codes against the stored skeleton; in the packed store every rounding is
        # fed forward (alpha before the perpendicular part, t before the residual)
        if packed:
            C = bf16_round(xp, C)
            if tdir is not None:
                alpha, Pp = split_temporal(xp, A, tdir, mode, round_alpha=True)
                valid = _row_norms(xp, Pp) > EPS
        if tdir is not None:
            o["tdir"][sl], o["alpha"][sl] = tdir[:, :d_max], alpha
        if fused:
            out = (o["seg"][sl], o["t"][sl], o["res_vals"][sl], o["res_idx"][sl])
            kv1_codes(xp, Pp, valid, C, k_act, d_eff, d_max, packed, out)
        else:
            self._codes(xp, Pp, valid, C, k_act, d_eff, o, sl)
        return C, k_act, iters

    def _centres(self, xp, Pp, U, nrm, valid, runs, k_act, d_eff, p0, layer, stream):
        """Spherical K-means of the problems with >= 2 valid rows, one seeded random unit centre
        for the others; returns ``(centres [n, Kc, width], iters)``. ``U``: the unit rows, given
        on the kernel path (``kv1_split``), else None."""
        p = self.params
        n, N, width = Pp.shape
        Kc = int(k_act.max())
        C = xp.zeros((n, Kc, width), dtype=xp.float32)
        iters = np.zeros(n, dtype=np.int64)
        if runs.any():
            live = np.nonzero(runs)[0]
            if U is not None:
                C, _, iters = kv1_kmeans(xp, U, valid, live, k_act, d_eff, Kc, p["max_iter"])
            else:
                scale = xp.where(valid, 1.0 / xp.where(valid, nrm, 1.0), 0.0)
                sel = xp.asarray(live) if len(live) < n else slice(None)
                UTe = xp.empty((len(live), width + 1, N), dtype=xp.float32)
                UTe[:, :width] = (Pp[sel] * scale[sel][:, :, None]).transpose(0, 2, 1)
                UTe[:, width] = valid[sel]
                c_run, _, it = _kmeans_t(xp, UTe, valid[sel], k_act[live], p["max_iter"])
                C[sel, : c_run.shape[1]] = c_run
                iters[live] = it
        for q in np.nonzero(~runs)[0]:  # fewer than 2 valid rows: one random unit centre
            rng = np.random.default_rng((p["seed"], layer, 0 if stream == "k" else 1, p0 + int(q)))
            c = rng.standard_normal(int(d_eff[q]))
            c = np.concatenate([c / np.linalg.norm(c), np.zeros(width - int(d_eff[q]))])
            C[int(q), 0] = xp.asarray(c.astype(np.float32))
        return C, iters

    def _codes(self, xp, Pp, valid, C, k_act, d_eff, o, sl) -> None:
        """Per-row codes with array ops (NumPy, and CuPy where the kernels do not apply)."""
        p = self.params
        Kc = C.shape[1]
        S = xp.matmul(C, Pp.transpose(0, 2, 1))  # [n, K, N]
        if (k_act < Kc).any():
            cmask = xp.asarray(np.arange(Kc)[None, :] < k_act[:, None])
            S = xp.where(cmask[:, :, None], S, -xp.inf)
        seg = xp.where(valid, _argmax_k(xp, S, valid)[0], 0)
        t = xp.take_along_axis(S, seg[:, None, :], axis=1)[:, 0, :]
        if p["store"] == "packed":
            t = bf16_round(xp, t)
        o["seg"][sl], o["t"][sl] = seg, t
        if "res_vals" not in o:
            return
        r = Pp - t[:, :, None] * _gather_rows(xp, C, seg)
        d_max = Pp.shape[2]
        kk = o["res_vals"].shape[2]
        if kk == d_max:
            ridx = xp.broadcast_to(xp.arange(d_max), r.shape)
        else:
            mag = xp.abs(r)
            if (d_eff < d_max).any():  # padded columns (exact zeros) must never be chosen
                colmask = xp.asarray(np.arange(d_max)[None, :] < d_eff[:, None])
                mag = xp.where(colmask[:, None, :], mag, -1.0)
            part = xp.argpartition(mag, d_max - kk, axis=2)[:, :, d_max - kk :]
            ridx = xp.sort(part, axis=2)
        vals = xp.take_along_axis(r, ridx, axis=2)
        o["res_vals"][sl] = bf16_round(xp, vals) if p["store"] == "packed" else vals
        o["res_idx"][sl] = ridx

    def decode(self, enc: Encoded):
        xp = self.xp
        n_kv, T, D = enc.shape
        a, m = enc.arrays, enc.meta
        nb = m["n_blocks"]
        if nb == 0:
            return a["tail"]
        B = self.params["block_size"]
        P, d_max, _ = a["basis"].shape
        N = a["seg"].shape[1]
        out = xp.empty((n_kv, T, D), dtype=xp.float32)
        out[:, nb * B :] = a["tail"]
        if kv1_decode_ok(xp, d_max, D, int(a["centres"].shape[1])):  # CuPy: one fused pass
            kv1_decode(xp, a, out, m["pool_heads"], B, nb)
            return out
        blocks = block_view(out, nb, B)

        def put(rng):  # writes the blocks of problems p0..p1 only
            p0, p1 = rng
            rows = xp.matmul(self._coeffs(xp, a, p0, p1), a["basis"][p0:p1])
            put_problems(xp, blocks, p0, p1, m["pool_heads"], rows, a["mean"][p0:p1])

        map_chunks(put, chunk_ranges(xp, P, 16 * N * (d_max + D)), parallel=xp is np)
        return out

    def _coeffs(self, xp, a, p0: int, p1: int):
        """Coefficient rows ``[p1 - p0, N, d_max]`` of problems ``p0..p1``: the scattered residual
        + t c_seg (+ alpha t_dir)."""
        sl = slice(p0, p1)
        vals = a["res_vals"][sl] if "res_vals" in a else None
        idx = a["res_idx"][sl] if "res_idx" in a else None
        alpha, tdir = (a["alpha"][sl], a["tdir"][sl]) if "tdir" in a else (None, None)
        C = a["centres"][sl]
        if xp is not np:
            return kv1_coeffs(xp, a["seg"][sl], a["t"][sl], C, vals, idx, alpha, tdir)
        seg = a["seg"][sl].astype(np.int64)
        n, N = seg.shape
        d_max = a["basis"].shape[1]
        Ahat = np.zeros((n, N, d_max), dtype=np.float32)
        if vals is not None:
            kk = idx.shape[2]
            rows = np.arange(n * N, dtype=np.int64)[:, None] * d_max
            flat = (rows + idx.reshape(n * N, kk).astype(np.int64)).reshape(-1)
            Ahat.reshape(-1)[flat] = vals.reshape(-1)
        Ahat += a["t"][sl][:, :, None] * _gather_rows(np, C, seg)
        if tdir is not None:
            Ahat += alpha[:, :, None] * tdir[:, None, :]
        return Ahat

    # ------------------------------------------------------------------------------------------

    def _block_bytes(self, enc: Encoded, formula) -> tuple[int, int]:
        D = enc.shape[2]
        m = enc.meta
        skel = codes = 0
        tdir = self.params["tdir_mode"] != "none"
        for d, k in zip(m["d_eff"], m["k_act"], strict=True):
            s, c = formula(d, m["rows_per_problem"], D, k, self.params["d_res"], tdir)
            skel += s
            codes += c
        return skel, codes

    def _tail_bytes(self, enc: Encoded) -> int:
        n_kv, _, D = enc.shape
        return 2 * n_kv * enc.meta["tail_tokens"] * D

    def nbytes(self, enc: Encoded) -> dict[str, int]:
        formula = packed_block_bytes if self.params["store"] == "packed" else kv1_f32_block_bytes
        skel, codes = self._block_bytes(enc, formula)
        return {"skeleton": skel, "codes": codes, "tail": self._tail_bytes(enc)}

    def legacy_nbytes(self, enc: Encoded) -> dict[str, int]:
        """The study's conventions for the same d_eff values (spec §1.6-1.7).

        ``legacy_f32_store``: f32 store as measured, tail included. ``legacy_bf16_projection``:
        tail + floor(sum(skeleton + encoded) / 2) per (layer, stream), as the compare harness.
        """
        skel, codes = self._block_bytes(enc, kv1_f32_block_bytes)
        tail = self._tail_bytes(enc)
        return {
            "legacy_f32_store": skel + codes + tail,
            "legacy_bf16_projection": tail + (skel + codes) // 2,
        }
