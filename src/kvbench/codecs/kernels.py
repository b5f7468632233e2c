"""Batched linear-algebra helpers for the codecs, with hand-written CuPy kernels where they pay.

Every function takes the array module ``xp`` (numpy or cupy) first. On NumPy they are thin
wrappers over stock NumPy; on CuPy they launch the kernels below where those were measured to beat
the stock CuPy op (docs/gpu.md has the numbers), and fall back to the stock op elsewhere. This
module imports only NumPy at load time; CuPy is imported lazily, only for CuPy inputs.

API
---
``batched_eigh(xp, a, *, method="auto", tol=1e-6, max_sweeps=20)``
    ``a``: ``[..., D, D]`` symmetric float32 (only the lower triangle is read, as
    ``numpy.linalg.eigh``'s default ``UPLO='L'``). Returns ``(w, v)``: ``w [..., D]`` eigenvalues
    in ascending order and ``v [..., D, D]`` whose **columns** are the matching unit eigenvectors
    (``a ~= v @ diag(w) @ v.T``), the convention of ``numpy.linalg.eigh``. Eigenvector signs are
    arbitrary. ``method``: ``"auto"`` (NumPy: ``numpy.linalg.eigh``; CuPy: the Jacobi kernel for
    the ``D`` in ``JACOBI_PLANS``, ``cupy.linalg.eigh`` otherwise), ``"jacobi"`` (force the
    kernel; CuPy only, even ``D`` up to 256), ``"stock"`` (``xp.linalg.eigh``). ``tol`` and
    ``max_sweeps`` only affect the Jacobi kernel: it stops once
    ``||offdiag(A)||_F <= tol * ||A||_F`` or after ``max_sweeps`` sweeps. Measured on an H100
    (docs/gpu.md), the kernel's ``||V diag(w) V^T - A|| / ||A||`` is ~3e-6; the stock
    ``cupy.linalg.eigh`` on a stack gave 2e-5 (D=64) .. 7e-4 (D=512).
``batched_covariance(xp, x, mean=True)``
    ``x [..., N, D]`` -> ``[..., D, D]`` float32 ``xc^T xc / N`` with ``xc = x - mean over N`` (or
    ``x`` itself when ``mean=False``). One batched GEMM (cuBLAS on CuPy).

The Jacobi kernel (CuPy)
------------------------
One thread block per matrix. Parallel cyclic Jacobi with the round-robin ("circle") ordering: a
sweep is ``D - 1`` steps, each step rotates ``D / 2`` disjoint index pairs at once; step ``r``
pairs ``(D-1, r)`` and ``((r+k) mod (D-1), (r-k) mod (D-1))`` for ``k = 1 .. D/2-1``, so every
pair is rotated exactly once per sweep. A step is two phases separated by ``__syncthreads``:
(1) ``D/2`` threads compute the rotations (Golub-Van Loan ``sym.schur2``, in float64 then
rounded: computing ``c, s`` in float32 biases ``c^2 + s^2`` and drifts the eigenvector norms
by ~1e-5); (2) every 2x2 block ``(k, l)`` of ``A`` becomes ``R_k^T A_kl R_l`` and every row of
``V`` gets its ``D/2`` column rotations. Rotations with ``|a_pq| <= 1e-7 sqrt(|a_pp a_qq|)`` are
skipped (exact identity), so converged entries collect no rounding. ``A`` lives in shared memory,
whole (``D * D`` floats) or packed upper triangle (``D (D+1) / 2``); ``V`` either lives in shared
memory too ("smem"), or in registers ("regs"), or the rotations are logged to global memory and a
second kernel applies them to row blocks of ``V`` ("log": rows of ``V`` are independent under right
rotations, so each warp owns rows and needs only ``__syncwarp`` between steps). Eigenvalues are
sorted in-kernel (rank sort) and ``V``'s columns are permuted on the way out.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import numpy as np

__all__ = ["JACOBI_PLANS", "JacobiPlan", "batched_covariance", "batched_eigh"]


class JacobiPlan(NamedTuple):
    """How the Jacobi kernel runs for one ``D``.

    ``mode`` ``"smem"``: ``A`` and ``V`` in shared memory, one kernel; ``"regs"``: ``V`` in
    registers (rows spread over the warps, columns over the lanes, moved by warp shuffles as the
    circle ordering moves them), one kernel; ``"log"``: the rotations are logged to global memory
    and a second kernel builds ``V`` in blocks of ``apply_rows`` rows with ``apply_threads``
    threads. ``packed``: ``A`` stored as its upper triangle. ``threads``:
    threads per block (one block per matrix) of the Jacobi kernel.
    """

    mode: str
    packed: bool
    threads: int
    apply_rows: int = 0
    apply_threads: int = 0


#: ``D`` -> plan used by ``method="auto"`` on CuPy; ``D`` not listed use ``cupy.linalg.eigh``.
#: Chosen from H100 measurements (docs/gpu.md; GB/s of bf16-equivalent input, kernel vs
#: ``cupy.linalg.eigh``): D=64 34.0 vs 21.4, D=128 7.05 vs 5.64, D=256 1.39 vs 0.63. At D=512 the
#: packed triangle alone (525 KB) exceeds shared memory: stock only (0.21 GB/s).
JACOBI_PLANS: dict[int, JacobiPlan] = {
    64: JacobiPlan("regs", False, 128),
    128: JacobiPlan("regs", False, 512),
    256: JacobiPlan("log", True, 1024, 64, 256),
}

_SMEM_LIMIT = 227 * 1024
_LOG_BYTES_MAX = 1 << 30  # bound on the rotation log per launch (the batch is chunked under it)

_SOURCE = r"""
#define H (D / 2)
#define M (D - 1)
#define NW (NT / 32)
#define SKIP_REL 1e-7f

#if PACKED
#define ASIZE (D * (D + 1) / 2)
__device__ __forceinline__ int aidx(int i, int j) {
    int lo = min(i, j), hi = max(i, j);
    return lo * D - ((lo * (lo - 1)) >> 1) + (hi - lo);
}
#else
#define ASIZE (D * D)
__device__ __forceinline__ int aidx(int i, int j) { return i * D + j; }
#endif

__device__ __forceinline__ void pair_of(int r, int k, int &p, int &q) {
    if (k == 0) { p = D - 1; q = r; }
    else {
        p = r + k; if (p >= M) p -= M;
        q = r - k; if (q < 0) q += M;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float sort_key(float w) {
    return isnan(w) ? __int_as_float(0x7f800000) : w;
}

// One 2x2 block (k, l) of A: B <- R_k^T B R_l with R = [[c, s], [-s, c]]; the diagonal block
// (k == l) gets the annihilating rotation's exact form (a_pq = 0, a_pp -= t a_pq, a_qq += t a_pq).
__device__ __forceinline__ void block_update(float *A, const float *tt, int k, int l,
                                             const float4 rk, const float4 rl) {
    const int pk = __float_as_int(rk.x), qk = __float_as_int(rk.y);
    const int pl = __float_as_int(rl.x), ql = __float_as_int(rl.y);
    const int i00 = aidx(pk, pl), i01 = aidx(pk, ql), i10 = aidx(qk, pl), i11 = aidx(qk, ql);
    const float b00 = A[i00], b01 = A[i01], b10 = A[i10], b11 = A[i11];
    if (k == l) {
        const float t = tt[k];
        A[i00] = fmaf(-t, b01, b00);
        A[i11] = fmaf(t, b01, b11);
        A[i01] = 0.0f;
#if !PACKED
        A[i10] = 0.0f;
#endif
    } else {
        const float m00 = fmaf(rk.z, b00, -rk.w * b10), m01 = fmaf(rk.z, b01, -rk.w * b11);
        const float m10 = fmaf(rk.w, b00, rk.z * b10), m11 = fmaf(rk.w, b01, rk.z * b11);
        A[i00] = fmaf(m00, rl.z, -m01 * rl.w);
        A[i01] = fmaf(m00, rl.w, m01 * rl.z);
        A[i10] = fmaf(m10, rl.z, -m11 * rl.w);
        A[i11] = fmaf(m10, rl.w, m11 * rl.z);
    }
}

extern "C" __global__ void __launch_bounds__(NT)
jacobi_eigh(const float *__restrict__ a, float *__restrict__ w_out, float *__restrict__ v_out,
            float2 *__restrict__ rot, int *__restrict__ meta, int *__restrict__ sweeps_out,
            float tol2, int max_sweeps)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float4 *rp = reinterpret_cast<float4 *>(smem_raw);          // [H] (p, q, c, s)
    float *tt = reinterpret_cast<float *>(rp + H);               // [H] t = s / c
    float *A = tt + H;                                           // [ASIZE]
#if FUSED == 1
    float *V = A + ASIZE;                                        // [D * D]
    float *red = V + D * D;
#else
    float *red = A + ASIZE;
#endif
    float *wd = red + 2 * NW;                                    // [D]
    int *perm = reinterpret_cast<int *>(wd + D);                 // [D]
    int *flags = perm + D;                                       // [2]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long b = blockIdx.x;
    const float *ab = a + b * (long long)(D * D);

    // load the lower triangle, mirrored (numpy's UPLO='L')
    for (int idx = tid; idx < D * D; idx += NT) {
        int i = idx / D, j = idx - (idx / D) * D;
        if (i >= j) {
            float x = ab[idx];
            A[aidx(i, j)] = x;
#if !PACKED
            A[aidx(j, i)] = x;
#endif
        }
#if FUSED == 1
        V[idx] = (i == j) ? 1.0f : 0.0f;
#endif
    }
    if (tid < 2) flags[tid] = 1;
#if FUSED == 2 && PACKED
#error "register V parks V in A's space at the end: needs unpacked A"
#endif
#if FUSED == 2
    // V in registers: warp w owns rows w, w + NW, ...; lane owns pair slots lane*J .. lane*J+J-1
    // and holds, per row, the entries of the slot's two columns (vt: p, vb: q). After each step
    // the circle ordering moves every column one slot (tops down, bottoms up): 2 shuffles a row.
    static_assert(H % 32 == 0 && D % NW == 0, "register V needs D/2 % 32 == 0, D % warps == 0");
    constexpr int J = H / 32, RPW = D / NW;
    float vt[RPW][J], vb[RPW][J];
    #pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        #pragma unroll
        for (int j = 0; j < J; ++j) {
            int p, q, i = warp + rr * NW;
            pair_of(0, lane * J + j, p, q);
            vt[rr][j] = (i == p) ? 1.0f : 0.0f;
            vb[rr][j] = (i == q) ? 1.0f : 0.0f;
        }
    }
#endif
    __syncthreads();

    float fro2 = 0.0f;
    int sweep = 0;
    for (;; ++sweep) {
        // off-diagonal mass (and, first time, the Frobenius norm, invariant under rotations)
        // computed directly: off = ||A||^2 - ||diag||^2 cancels catastrophically in float32
        float off = 0.0f, tot = 0.0f;
        for (int idx = tid; idx < D * D; idx += NT) {
            int i = idx / D, j = idx - (idx / D) * D;
            if (i <= j) {
                float x = A[aidx(i, j)];
                if (i < j) off = fmaf(2.0f * x, x, off); else tot = fmaf(x, x, tot);
            }
        }
        tot += off;
        off = warp_sum(off);
        tot = warp_sum(tot);
        if (lane == 0) { red[warp] = off; red[NW + warp] = tot; }
        if (tid == 0) flags[sweep & 1] = 0;
        __syncthreads();
        off = 0.0f; tot = 0.0f;
        #pragma unroll
        for (int w = 0; w < NW; ++w) { off += red[w]; tot += red[NW + w]; }
        if (sweep == 0) fro2 = tot;
        int did = (sweep == 0) ? 1 : flags[(sweep - 1) & 1];
        if (!(off > tol2 * fro2) || sweep >= max_sweeps || !did) break;

        for (int r = 0; r < M; ++r) {
            // phase 1: the H rotations of this step, as (p, q, c, s)
            if (tid < H) {
                int p, q;
                pair_of(r, tid, p, q);
                float app = A[aidx(p, p)], aqq = A[aidx(q, q)], apq = A[aidx(p, q)];
                float c = 1.0f, s = 0.0f, t = 0.0f;
                if (apq != 0.0f && fabsf(apq) > SKIP_REL * sqrtf(fabsf(app) * fabsf(aqq))) {
                    double tau = ((double)aqq - (double)app) / (2.0 * (double)apq);
                    double td = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
                    double cd = 1.0 / sqrt(1.0 + td * td);
                    c = (float)cd; s = (float)(td * cd); t = (float)td;
                    flags[sweep & 1] = 1;
                }
                rp[tid] = make_float4(__int_as_float(p), __int_as_float(q), c, s);
                tt[tid] = t;
#if FUSED == 0
                rot[((b * max_sweeps + sweep) * M + r) * H + tid] = make_float2(c, s);
#endif
            }
            __syncthreads();
            // phase 2: A <- J^T A J blockwise (and V <- V J unless the rotations are logged)
#if !PACKED && (NT % H == 0)
            {
                // each thread keeps one column pair l: its (p, q, c, s) stay in registers
                const int l = tid % H;
                const float4 rl = rp[l];
                for (int k = tid / H; k < H; k += NT / H) block_update(A, tt, k, l, rp[k], rl);
#if FUSED == 1
                const int pl = __float_as_int(rl.x), ql = __float_as_int(rl.y);
                for (int i = tid / H; i < D; i += NT / H) {
                    float v0 = V[i * D + pl], v1 = V[i * D + ql];
                    V[i * D + pl] = fmaf(rl.z, v0, -rl.w * v1);
                    V[i * D + ql] = fmaf(rl.w, v0, rl.z * v1);
                }
#endif
            }
#else
#if PACKED
            // the k <= l triangle of blocks, folded into an (H/2) x (H+1) rectangle
            for (int idx = tid; idx < (H / 2) * (H + 1); idx += NT) {
                int rr = idx / (H + 1), cc = idx - rr * (H + 1);
                int k, l;
                if (cc < H - rr) { k = rr; l = rr + cc; }
                else { k = H - 1 - rr; l = k + (cc - (H - rr)); }
                block_update(A, tt, k, l, rp[k], rp[l]);
            }
#else
            for (int idx = tid; idx < H * H; idx += NT) {
                int k = idx / H, l = idx - (idx / H) * H;
                block_update(A, tt, k, l, rp[k], rp[l]);
            }
#endif
#if FUSED == 1
            for (int idx = tid; idx < D * H; idx += NT) {
                int i = idx / H, l = idx - (idx / H) * H;
                const float4 rl = rp[l];
                const int pl = __float_as_int(rl.x), ql = __float_as_int(rl.y);
                float v0 = V[i * D + pl], v1 = V[i * D + ql];
                V[i * D + pl] = fmaf(rl.z, v0, -rl.w * v1);
                V[i * D + ql] = fmaf(rl.w, v0, rl.z * v1);
            }
#endif
#endif
#if FUSED == 2
            {
                float4 rj[J];
                #pragma unroll
                for (int j = 0; j < J; ++j) rj[j] = rp[lane * J + j];
                #pragma unroll
                for (int rr = 0; rr < RPW; ++rr) {
                    #pragma unroll
                    for (int j = 0; j < J; ++j) {
                        const float x = vt[rr][j], y = vb[rr][j];
                        vt[rr][j] = fmaf(rj[j].z, x, -rj[j].w * y);
                        vb[rr][j] = fmaf(rj[j].w, x, rj[j].z * y);
                    }
                    const float dn = __shfl_down_sync(0xffffffffu, vt[rr][0], 1);
                    const float up = __shfl_up_sync(0xffffffffu, vb[rr][J - 1], 1);
                    float nt[J], nb[J];
                    #pragma unroll
                    for (int j = 0; j < J; ++j) {
                        if (j < J - 1) nt[j] = vt[rr][j < J - 1 ? j + 1 : j];
                        else nt[j] = (lane == 31) ? vb[rr][J - 1] : dn;
                        if (j >= 1) nb[j] = vb[rr][j >= 1 ? j - 1 : 0];
                        else nb[j] = (lane == 0) ? (J >= 2 ? vt[rr][J >= 2 ? 1 : 0] : dn) : up;
                    }
                    if (lane == 0) nt[0] = vt[rr][0];
                    #pragma unroll
                    for (int j = 0; j < J; ++j) { vt[rr][j] = nt[j]; vb[rr][j] = nb[j]; }
                }
            }
#endif
            __syncthreads();
        }
    }

    // eigenvalues, rank sort ascending (NaN last, ties by index)
    for (int i = tid; i < D; i += NT) wd[i] = A[aidx(i, i)];
    __syncthreads();
#if FUSED == 2
    // A is spent: park V there, column-major by the columns' home slots (step 0 of a sweep)
    float *V = A;
    #pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        #pragma unroll
        for (int j = 0; j < J; ++j) {
            int p, q, i = warp + rr * NW;
            pair_of(0, lane * J + j, p, q);
            V[i * D + p] = vt[rr][j];
            V[i * D + q] = vb[rr][j];
        }
    }
#endif
    for (int i = tid; i < D; i += NT) {
        float ki = sort_key(wd[i]);
        int rank = 0;
        for (int j = 0; j < D; ++j) {
            float kj = sort_key(wd[j]);
            rank += (kj < ki) || (kj == ki && j < i);
        }
        perm[rank] = i;
    }
    __syncthreads();
    for (int i = tid; i < D; i += NT) w_out[b * D + i] = wd[perm[i]];
    if (tid == 0) sweeps_out[b] = sweep;
#if FUSED >= 1
    float *vout = v_out + b * (long long)(D * D);
    for (int idx = tid; idx < D * D; idx += NT) {
        int i = idx / D, c = idx - (idx / D) * D;
        vout[idx] = V[i * D + perm[c]];
    }
#else
    for (int i = tid; i < D; i += NT) meta[b * (D + 1) + i] = perm[i];
    if (tid == 0) meta[b * (D + 1) + D] = sweep;
#endif
}

#if FUSED == 0
// V = product of the logged rotations, ROWS rows of it per block; each warp owns whole rows.
extern "C" __global__ void __launch_bounds__(NTA)
jacobi_apply(const float2 *__restrict__ rot, const int *__restrict__ meta,
             float *__restrict__ v_out, int max_sweeps)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *Vs = reinterpret_cast<float *>(smem_raw);             // [ROWS * D]
    int *perm = reinterpret_cast<int *>(Vs + ROWS * D);          // [D]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long b = blockIdx.x;
    const int row0 = blockIdx.y * ROWS;
    for (int idx = tid; idx < ROWS * D; idx += NTA) {
        int r = idx / D, j = idx - (idx / D) * D;
        Vs[idx] = (row0 + r == j) ? 1.0f : 0.0f;
    }
    for (int i = tid; i < D; i += NTA) perm[i] = meta[b * (D + 1) + i];
    const int nsw = meta[b * (D + 1) + D];
    __syncthreads();
    const float2 *rb = rot + b * (long long)max_sweeps * M * H;
    constexpr int J = H / 32;       // pairs per lane
    constexpr int RPW = ROWS / (NTA / 32);  // rows per warp
    for (int sw = 0; sw < nsw; ++sw) {
        for (int r = 0; r < M; ++r) {
            const float2 *rs = rb + ((long long)sw * M + r) * H;
            float2 c_s[J];
            #pragma unroll
            for (int j = 0; j < J; ++j) c_s[j] = __ldg(rs + lane + 32 * j);
            #pragma unroll
            for (int j = 0; j < J; ++j) {
                int p, q;
                pair_of(r, lane + 32 * j, p, q);
                #pragma unroll 4
                for (int rr = 0; rr < RPW; ++rr) {
                    float *row = Vs + (warp + rr * (NTA / 32)) * D;
                    float v0 = row[p], v1 = row[q];
                    row[p] = fmaf(c_s[j].x, v0, -c_s[j].y * v1);
                    row[q] = fmaf(c_s[j].y, v0, c_s[j].x * v1);
                }
            }
            __syncwarp();
        }
    }
    __syncthreads();
    float *vb = v_out + b * (long long)(D * D) + (long long)row0 * D;
    for (int idx = tid; idx < ROWS * D; idx += NTA) {
        int r = idx / D, c = idx - (idx / D) * D;
        vb[idx] = Vs[r * D + perm[c]];
    }
}
#endif
"""


_VMODES = {"log": 0, "smem": 1, "regs": 2}  # the kernel's FUSED macro


def _jacobi_smem_bytes(d: int, packed: bool, mode: str, threads: int) -> int:
    asize = d * (d + 1) // 2 if packed else d * d
    floats = 4 * (d // 2) + d // 2  # (p, q, c, s) and t per pair
    floats += asize + (d * d if mode == "smem" else 0) + 2 * (threads // 32) + d
    ints = d + 2  # perm, flags
    return 4 * (floats + ints)


def _apply_smem_bytes(d: int, rows: int) -> int:
    return 4 * (rows * d + d)


_KERNELS: dict[tuple, object] = {}


def _compiled(cp: ModuleType, source: str, name: str, defines: dict, smem: int = 0):
    """Kernel ``name`` of the CUDA ``source``, compiled once per device with ``defines`` (ints, or
    strings such as type names) as ``#define`` lines, its dynamic shared memory raised to ``smem``
    where that exceeds the 48 KB default. Every kernel family of this module goes through it."""
    items = tuple(sorted((n, v if isinstance(v, str) else int(v)) for n, v in defines.items()))
    key = (cp.cuda.Device().id, source, name, items)
    k = _KERNELS.get(key)
    if k is None:
        head = "".join(f"#define {n} {v}\n" for n, v in items)
        k = cp.RawKernel(head + source, name, options=("--std=c++17",))
        _KERNELS[key] = k
    if smem > 48 * 1024 and k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    return k


def _kernel(cp: ModuleType, name: str, defines: dict[str, int], smem: int):
    return _compiled(cp, _SOURCE, name, defines, smem)


def jacobi_plan(d: int) -> JacobiPlan:
    """The plan for ``method="jacobi"``: the tuned one, else a guess that fits."""
    if d in JACOBI_PLANS:
        return JACOBI_PLANS[d]
    if d < 4 or d % 2 or d > 256:
        raise ValueError(f"batched_eigh: the Jacobi kernel needs an even D in 4..256, got {d}")
    threads = 256 if d <= 64 else 1024
    if _jacobi_smem_bytes(d, False, "smem", threads) <= _SMEM_LIMIT:
        return JacobiPlan("smem", False, threads)
    return JacobiPlan("log", True, threads, 32, 256)


def _check_plan(d: int, plan: JacobiPlan) -> int:
    """Validate ``plan`` for ``D = d``; return its shared-memory bytes."""
    if plan.mode not in _VMODES:
        raise ValueError(f"batched_eigh: plan mode must be one of {sorted(_VMODES)}: {plan}")
    t = plan.threads
    if t % 32 or not 32 <= t <= 1024 or d < 4 or d % 2:
        raise ValueError(f"batched_eigh: bad plan {plan} for D={d}")
    if plan.mode == "regs" and (plan.packed or (d // 2) % 32 or d % (t // 32)):
        raise ValueError("batched_eigh: 'regs' needs unpacked A, D/2 % 32 == 0, D % warps == 0")
    if plan.mode == "log":
        rows, nta = plan.apply_rows, plan.apply_threads
        if (d // 2) % 32 or rows <= 0 or d % rows or nta % 32 or not 32 <= nta <= 1024:
            raise ValueError(f"batched_eigh: bad log plan {plan} for D={d}")
        if rows % (nta // 32):
            raise ValueError(f"batched_eigh: apply_rows must be a multiple of the warps: {plan}")
    smem = _jacobi_smem_bytes(d, plan.packed, plan.mode, t)
    if smem > _SMEM_LIMIT:
        raise ValueError(f"batched_eigh: D={d} needs {smem} B of shared memory for plan {plan}")
    return smem


def _jacobi_cupy(cp, a, w, v, plan: JacobiPlan, tol: float, max_sweeps: int, sweeps=None) -> None:
    """Run the Jacobi kernel(s) on ``a [B, D, D]`` (contiguous float32) into ``w [B, D]``,
    ``v [B, D, D]`` (contiguous float32, every element written); ``sweeps`` (int32 [B], optional)
    receives the number of sweeps each matrix took."""
    nb, d = a.shape[0], a.shape[-1]
    smem = _check_plan(d, plan)
    if nb == 0:
        return
    if sweeps is None:
        sweeps = cp.empty(nb, dtype=cp.int32)
    threads = plan.threads
    defines = {"D": d, "NT": threads, "PACKED": int(plan.packed), "FUSED": _VMODES[plan.mode]}
    tol2 = np.float32(tol * tol)
    if plan.mode != "log":
        kern = _kernel(cp, "jacobi_eigh", defines, smem)
        dummy_rot = cp.empty(1, dtype=cp.float32)
        dummy_meta = cp.empty(1, dtype=cp.int32)
        args = (a, w, v, dummy_rot, dummy_meta, sweeps, tol2, np.int32(max_sweeps))
        kern((nb,), (threads,), args, shared_mem=smem)
        return
    rows, nta = plan.apply_rows, plan.apply_threads
    defines.update({"ROWS": rows, "NTA": nta})
    kern = _kernel(cp, "jacobi_eigh", defines, smem)
    smem_a = _apply_smem_bytes(d, rows)
    kapp = _kernel(cp, "jacobi_apply", defines, smem_a)
    per = max(1, max_sweeps * (d - 1) * (d // 2) * 8)
    chunk = max(1, min(nb, _LOG_BYTES_MAX // per))
    rot = cp.empty((chunk, max(1, max_sweeps), d - 1, d // 2, 2), dtype=cp.float32)
    meta = cp.empty((chunk, d + 1), dtype=cp.int32)
    for s in range(0, nb, chunk):
        n = min(chunk, nb - s)
        args = (a[s:], w[s:], v[s:], rot, meta, sweeps[s:], tol2, np.int32(max_sweeps))
        kern((n,), (threads,), args, shared_mem=smem)
        kapp((n, d // rows), (nta,), (rot, meta, v[s:], np.int32(max_sweeps)), shared_mem=smem_a)


def _check_square(a) -> tuple[int, ...]:
    shape = tuple(a.shape)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(
            f"batched_eigh: expected a stack of square matrices [..., D, D], got {shape}"
        )
    return shape


def batched_eigh(
    xp: ModuleType, a, *, method: str = "auto", tol: float = 1e-6, max_sweeps: int = 20
):
    """Eigen-decompose a stack of symmetric matrices: ``(w ascending [..., D], v [..., D, D])``.

    See the module docstring for the contract and the CuPy kernel.
    """
    shape = _check_square(a)
    if method not in ("auto", "jacobi", "stock"):
        raise ValueError(f"batched_eigh: method must be auto|jacobi|stock, got {method!r}")
    if max_sweeps < 0 or not tol >= 0:
        raise ValueError(f"batched_eigh: need tol >= 0 and max_sweeps >= 0 ({tol}, {max_sweeps})")
    d = shape[-1]
    if xp is np:
        if method == "jacobi":
            raise ValueError("batched_eigh: method='jacobi' needs CuPy arrays")
        return np.linalg.eigh(np.asarray(a))
    if method == "stock" or (method == "auto" and d not in JACOBI_PLANS):
        return xp.linalg.eigh(a)
    plan = jacobi_plan(d)
    cp = xp
    a3 = cp.ascontiguousarray(a.reshape((-1, d, d)), dtype=cp.float32)
    nb = a3.shape[0]
    w = cp.empty((nb, d), dtype=cp.float32)
    v = cp.empty((nb, d, d), dtype=cp.float32)
    _jacobi_cupy(cp, a3, w, v, plan, tol, max_sweeps)
    return w.reshape(shape[:-1]), v.reshape(shape)


def batched_covariance(xp: ModuleType, x, mean: bool = True):
    """``[..., N, D]`` -> ``[..., D, D]`` float32 covariance ``xc^T xc / N`` (one batched GEMM)."""
    x = xp.asarray(x, dtype=xp.float32)
    if x.ndim < 2:
        raise ValueError(f"batched_covariance: expected [..., N, D], got {tuple(x.shape)}")
    n = x.shape[-2]
    if n == 0:
        raise ValueError("batched_covariance: N must be positive")
    xc = x - x.mean(axis=-2, keepdims=True) if mean else x
    return xp.matmul(xc.swapaxes(-1, -2), xc) / xp.float32(n)


# ================================================================================================
# TurboQuant: fused quantise + bit-pack (encode) and unpack + LUT + scale (decode), CuPy only.
#
# The rotation stays a cuBLAS GEMM (FP32, no TF32); these kernels replace the elementwise passes
# around it (row norm, scale, 2^b - 1 midpoint compares, plane packing, centroid norm, QJL
# residual) with one read of the rotated rows and one write of the packed bytes. A row of L
# values (L in TQ_ROW_LENGTHS: the prototype's head_dim, or the llama.cpp variant's WHT group) is
# handled by L/8 consecutive threads, 8 values each; row sums are subgroup shuffles. Index rule
# and packing are the NumPy path's (turboquant.py): idx = #midpoints < v (<= v with ties_up),
# LSB-first planes (3 bits = 2-bit plane + 1-bit plane). Products that NumPy rounds separately
# use __fmul_rn so nvcc does not contract them into an FMA.
# ================================================================================================

#: Row lengths the fused TurboQuant kernels handle (L/8 threads a row, a power of two <= 32).
TQ_ROW_LENGTHS = (32, 64, 128, 256)
#: Kernel modes: prototype V (PolarQuant only), prototype K (+ residual for QJL), llama.cpp.
TQ_PROTO_V, TQ_PROTO_K, TQ_LLAMA = 0, 1, 2

_TQ_SOURCE = r"""
#define TPR (L / 8)
#define NC (1 << BITS)

__device__ __forceinline__ float gsum(float v) {
    #pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float round_f16(float v) {  // float32 -> fp16 (RNE) -> float32
    unsigned short h;
    float r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ void load8(const float* __restrict__ p, float* v) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void store8(float* __restrict__ p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void pack8(const int* idx, unsigned char* lo, unsigned char* hi,
                                      long long grp) {
#if BITS == 1
    unsigned b = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) b |= (unsigned)idx[j] << j;
    lo[grp] = (unsigned char)b;
#elif BITS == 2 || BITS == 3
    unsigned w = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) w |= ((unsigned)idx[j] & 3u) << (2 * j);
    reinterpret_cast<unsigned short*>(lo)[grp] = (unsigned short)w;
#if BITS == 3
    unsigned h = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) h |= (((unsigned)idx[j] >> 2) & 1u) << j;
    hi[grp] = (unsigned char)h;
#endif
#else
    unsigned w = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) w |= (unsigned)idx[j] << (4 * j);
    reinterpret_cast<unsigned*>(lo)[grp] = w;
#endif
}

__device__ __forceinline__ void unpack8(const unsigned char* __restrict__ lo,
                                        const unsigned char* __restrict__ hi, long long grp,
                                        int* idx) {
#if BITS == 1
    unsigned b = lo[grp];
    #pragma unroll
    for (int j = 0; j < 8; j++) idx[j] = (b >> j) & 1u;
#elif BITS == 2 || BITS == 3
    unsigned w = reinterpret_cast<const unsigned short*>(lo)[grp];
    #pragma unroll
    for (int j = 0; j < 8; j++) idx[j] = (w >> (2 * j)) & 3u;
#if BITS == 3
    unsigned h = hi[grp];
    #pragma unroll
    for (int j = 0; j < 8; j++) idx[j] |= ((h >> j) & 1u) << 2;
#endif
#else
    unsigned w = reinterpret_cast<const unsigned*>(lo)[grp];
    #pragma unroll
    for (int j = 0; j < 8; j++) idx[j] = (w >> (4 * j)) & 15u;
#endif
}

// x: [R, L] rows whose norm is taken; y: [R, L] rotated rows (MODE 1: overwritten with the
// residual Pi r / ||x||). out_norm[R] = ||x||; out_aux[R]: MODE 1 ||r||, MODE 2 the stored norm.
extern "C" __global__ void tq_encode(const float* __restrict__ x, float* __restrict__ y,
                                     const float* __restrict__ mids,
                                     const float* __restrict__ cent,
                                     unsigned char* __restrict__ lo,
                                     unsigned char* __restrict__ hi,
                                     float* __restrict__ out_norm, float* __restrict__ out_aux,
                                     long long R, int ties_up, int norm_corr, int norm_f16) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long row = tid / TPR;
    int t = (int)(tid % TPR);
    bool ok = row < R;
    long long off = (ok ? row : 0) * L + t * 8;
    float xv[8], yv[8];
    load8(x + off, xv);
    load8(y + off, yv);
    float s = 0.f;
    #pragma unroll
    for (int j = 0; j < 8; j++) s += xv[j] * xv[j];
    float nrm = sqrtf(gsum(s));
    float inv;
#if MODE == 2
    inv = nrm > 1e-10f ? 1.0f / (nrm > 0.f ? nrm : 1.0f) : 0.0f;
#else
    inv = 1.0f / (nrm > 0.f ? nrm : 1.0f);
#endif
    float m[NC - 1];
    #pragma unroll
    for (int k = 0; k < NC - 1; k++) m[k] = mids[k];
    int idx[8];
    float c2 = 0.f;
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        float v = __fmul_rn(yv[j], inv);
        yv[j] = v;
        int k = 0;
        #pragma unroll
        for (int q = 0; q < NC - 1; q++) k += ties_up ? (v >= m[q]) : (v > m[q]);
        idx[j] = k;
        float c = cent[k];
        c2 += c * c;
    }
    float cn = sqrtf(gsum(c2));
    if (ok) pack8(idx, lo, hi, row * TPR + t);
#if MODE == 0
    if (ok && t == 0) out_norm[row] = nrm;
#elif MODE == 1
    float ns = norm_f16 ? round_f16(nrm) : nrm;
    float scale = norm_corr ? (cn > 1e-10f ? ns / cn : ns) : ns;
    float f = scale / (nrm > 0.f ? nrm : 1.0f);
    float r2 = 0.f;
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        float r = yv[j] - __fmul_rn(cent[idx[j]], f);
        yv[j] = r;
        r2 += r * r;
    }
    float rn = __fmul_rn(sqrtf(gsum(r2)), nrm);
    if (ok) store8(y + off, yv);
    if (ok && t == 0) { out_norm[row] = nrm; out_aux[row] = rn; }
#else
    if (ok && t == 0) {
        out_norm[row] = nrm;
        out_aux[row] = norm_corr ? (cn > 1e-10f ? nrm / cn : nrm) : nrm;
    }
#endif
}

// MODE 0: out [R, L] = c[idx] * scale; MODE 1: out [R, 2L] = [c[idx] * scale | z * rho];
// MODE 2: out [R, L] = c[idx] * norm. scale = norm / ||c[idx]|| (norm_corr, > 1e-10) or norm.
extern "C" __global__ void tq_decode(const unsigned char* __restrict__ lo,
                                     const unsigned char* __restrict__ hi,
                                     const unsigned char* __restrict__ signs,
                                     const float* __restrict__ cent,
                                     const float* __restrict__ norm,
                                     const float* __restrict__ rnorm, float* __restrict__ out,
                                     long long R, int norm_corr, float qjl_scale) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long row = tid / TPR;
    int t = (int)(tid % TPR);
    bool ok = row < R;
    long long r = ok ? row : 0;
    int idx[8];
    unpack8(lo, hi, r * TPR + t, idx);
    float cv[8];
    float c2 = 0.f;
    #pragma unroll
    for (int j = 0; j < 8; j++) { cv[j] = cent[idx[j]]; c2 += cv[j] * cv[j]; }
    float ns = norm[r];
    float scale;
#if MODE == 2
    scale = ns;
#else
    float cn = sqrtf(gsum(c2));
    scale = norm_corr ? (cn > 1e-10f ? ns / cn : ns) : ns;
#endif
    #pragma unroll
    for (int j = 0; j < 8; j++) cv[j] = __fmul_rn(cv[j], scale);
#if MODE == 1
    if (ok) store8(out + r * (2 * L) + t * 8, cv);
    float rho = __fmul_rn(rnorm[r], qjl_scale);
    unsigned b = signs[r * TPR + t];
    #pragma unroll
    for (int j = 0; j < 8; j++) cv[j] = ((b >> j) & 1u) ? rho : -rho;
    if (ok) store8(out + r * (2 * L) + L + t * 8, cv);
#else
    if (ok) store8(out + r * L + t * 8, cv);
#endif
}

// signs[R, L/8]: bit j of byte (row, t) = proj[row, 8t + j] >= 0 (LSB first).
extern "C" __global__ void tq_pack_signs(const float* __restrict__ proj,
                                         unsigned char* __restrict__ signs, long long n8) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float v[8];
    load8(proj + i * 8, v);
    unsigned b = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) b |= (unsigned)(v[j] >= 0.f) << j;
    signs[i] = (unsigned char)b;
}
"""

_TQ_THREADS = 256


def _tq_kernel(cp: ModuleType, name: str, row_len: int, bits: int, mode: int):
    return _compiled(cp, _TQ_SOURCE, name, {"L": row_len, "BITS": bits, "MODE": mode})


def tq_fused_ok(xp: ModuleType, row_len: int) -> bool:
    """Whether the fused TurboQuant kernels handle rows of ``row_len`` on ``xp`` (CuPy only)."""
    return xp is not np and row_len in TQ_ROW_LENGTHS


def _dev(cp: ModuleType, a, dtype):
    """``a`` as a C-contiguous ``dtype`` array whose data is 16-byte aligned (copied if not)."""
    a = cp.ascontiguousarray(a, dtype=dtype)
    return a if a.data.ptr % 16 == 0 else a.copy()


def _grid(n_threads: int) -> tuple[int]:
    return (max(1, -(-n_threads // _TQ_THREADS)),)


def tq_encode_rows(
    cp: ModuleType,
    x,
    y,
    mids,
    cent,
    bits: int,
    mode: int,
    *,
    ties_up: bool = False,
    norm_corr: bool = True,
    norm_f16: bool = False,
):
    """Fused PolarQuant encode of ``R`` rows of length ``L`` (see ``_TQ_SOURCE``).

    ``x [R, L]``: the rows whose norm is taken; ``y [R, L]``: the rotated rows (``mode``
    ``TQ_PROTO_K`` overwrites it with the scaled residual ``u - c[idx] * scale / ||x||``);
    ``mids``/``cent``: device float32 midpoints / centroids (``2^bits - 1`` / ``2^bits``).
    Returns ``(planes, norm [R], aux [R])``: ``planes`` = {"lo": uint8 [R, L*w/8]} (+ "hi"
    [R, L/8] for 3 bits), ``norm`` = ``||x||`` (float32), ``aux`` = ``||r||`` (mode K), the
    corrected norm (llama) or None (mode V).
    """
    r_rows, row_len = int(y.shape[0]), int(y.shape[1])
    x = _dev(cp, x, cp.float32)
    if not (y.flags.c_contiguous and y.dtype == cp.float32 and y.data.ptr % 16 == 0):
        raise ValueError("tq_encode_rows: y must be C-contiguous, aligned float32")
    wlo = 2 if bits == 3 else bits
    lo = cp.empty((r_rows, row_len * wlo // 8), dtype=cp.uint8)
    hi = cp.empty((r_rows, row_len // 8), dtype=cp.uint8) if bits == 3 else lo
    norm = cp.empty(r_rows, dtype=cp.float32)
    aux = cp.empty(r_rows, dtype=cp.float32) if mode != TQ_PROTO_V else norm
    kern = _tq_kernel(cp, "tq_encode", row_len, bits, mode)
    n_threads = r_rows * (row_len // 8)
    args = (
        x,
        y,
        _dev(cp, mids, cp.float32),
        _dev(cp, cent, cp.float32),
        lo,
        hi,
        norm,
        aux,
        np.int64(r_rows),
        np.int32(ties_up),
        np.int32(norm_corr),
        np.int32(norm_f16),
    )
    if r_rows:
        kern(_grid(n_threads), (_TQ_THREADS,), args)
    planes = {"lo": lo, "hi": hi} if bits == 3 else {"lo": lo}
    return planes, norm, (None if mode == TQ_PROTO_V else aux)


def tq_decode_rows(
    cp: ModuleType,
    planes: dict,
    cent,
    norm,
    bits: int,
    mode: int,
    row_len: int,
    *,
    norm_corr: bool = True,
    signs=None,
    rnorm=None,
    qjl_scale: float = 0.0,
):
    """Fused PolarQuant decode: ``[R, L]`` = ``c[idx] * scale`` (``[R, 2L]`` with the QJL half
    ``z * rnorm * qjl_scale`` for ``TQ_PROTO_K``); ``norm``/``rnorm``: stored per-row norms."""
    lo = _dev(cp, planes["lo"], cp.uint8)
    r_rows = int(lo.shape[0])
    hi = _dev(cp, planes["hi"], cp.uint8) if bits == 3 else lo
    norm = _dev(cp, norm, cp.float32).reshape(-1)
    width = 2 * row_len if mode == TQ_PROTO_K else row_len
    out = cp.empty((r_rows, width), dtype=cp.float32)
    sg = _dev(cp, signs, cp.uint8) if mode == TQ_PROTO_K else lo
    rn = _dev(cp, rnorm, cp.float32).reshape(-1) if mode == TQ_PROTO_K else norm
    kern = _tq_kernel(cp, "tq_decode", row_len, bits, mode)
    args = (
        lo,
        hi,
        sg,
        _dev(cp, cent, cp.float32),
        norm,
        rn,
        out,
        np.int64(r_rows),
        np.int32(norm_corr),
        np.float32(qjl_scale),
    )
    if r_rows:
        kern(_grid(r_rows * (row_len // 8)), (_TQ_THREADS,), args)
    return out


def tq_pack_signs(cp: ModuleType, proj):
    """``packbits(proj >= 0, axis=-1, bitorder='little')`` of float32 ``proj [R, L]``."""
    proj = _dev(cp, proj, cp.float32)
    r_rows, row_len = int(proj.shape[0]), int(proj.shape[1])
    out = cp.empty((r_rows, row_len // 8), dtype=cp.uint8)
    n8 = r_rows * (row_len // 8)
    if n8:
        kern = _tq_kernel(cp, "tq_pack_signs", 8, 1, 0)
        kern(_grid(n8), (_TQ_THREADS,), (proj, out, np.int64(n8)))
    return out


# ================================================================================================
# TurboQuant, llama.cpp format, fully fused (CuPy): one kernel a direction, rotation included.
#
# The llama.cpp variant's rotation is a signed, normalised Walsh-Hadamard transform per group of G
# values (turboquant.wht_rotation: ``u @ M = s2 * FWHT(s1 * u) / sqrt(G)``), so the GEMM above is
# replaced by a butterfly in registers: a team of G / 16 consecutive threads owns one group, each
# thread 16 values as 4 float4 (element 4 l + 4 TT k + j), log2(G) stages of which 2 + 2 run in
# the thread and the rest through warp shuffles. Encode reads x once (zero past d when the
# head_dim is padded) and writes the pack_codes planes and the norms; decode reads them and writes
# x once: one DRAM pass per direction (~4.4 B a value each way), where the GEMM path moved ~16 B
# (encode) and ~12 B (decode). Codes equal the NumPy path's except within float rounding of a
# midpoint (FWHT vs GEMM sums). H100, 1 G values: encode 2.2-2.8 TB/s, decode 2.7 TB/s (a copy:
# 3.0); Nsight Compute puts the 3- and 4-bit encode at 71% of the issue slots, 58-64% of DRAM,
# with 36% of the warps resident at 80 registers a thread, decode at 82% of DRAM.
# ================================================================================================

#: WHT group sizes the fused llama.cpp-format kernels take (16 values a thread, 2..32 a group).
TQL_GROUPS = (32, 64, 128, 256, 512)
#: Values a thread (H100: 16 and 8 within 6% of each other, 16 ahead in 4 of 6 configurations).
_TQL_VPT = 16
#: Groups a team works through in its grid-stride loop (amortises the sign loads; H100: 8 was
#: ahead of 64 in 4 of 6 configurations, by up to 7%).
_TQL_ITERS = 8

_TQL_SOURCE = r"""
#define TT (G / VPT)
#define KV (VPT / 4)
#define NC (1 << BITS)
#define FULL 0xffffffffu

static_assert(TT >= 2 && TT <= 32 && KV >= 1, "a group is 2..32 threads of VPT >= 4 values");

__device__ __forceinline__ float team_sum(float v) {
    #pragma unroll
    for (int o = TT / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// In-place unnormalised Sylvester FWHT (butterfly (a, b) -> (a + b, a - b), the lower index
// taking a + b) of one group: thread l of the team holds element 4 l + 4 TT k + j in v[k][j], so
// index bits 0-1 (j) and the top log2(KV) bits (k) are in-thread stages, the middle log2(TT)
// bits (l) are shuffle stages (the stages commute).
__device__ __forceinline__ void team_fwht(float (&v)[KV][4], int l) {
    #pragma unroll
    for (int k = 0; k < KV; k++) {
        const float a0 = v[k][0] + v[k][1], a1 = v[k][0] - v[k][1];
        const float a2 = v[k][2] + v[k][3], a3 = v[k][2] - v[k][3];
        v[k][0] = a0 + a2; v[k][1] = a1 + a3; v[k][2] = a0 - a2; v[k][3] = a1 - a3;
    }
    #pragma unroll
    for (int h = 1; h < KV; h <<= 1) {
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            if (k & h) continue;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                const float a = v[k][j], b = v[k + h][j];
                v[k][j] = a + b; v[k + h][j] = a - b;
            }
        }
    }
    #pragma unroll
    for (int m = 1; m < TT; m <<= 1) {
        const float s = (l & m) ? -1.0f : 1.0f;  // the upper partner keeps p - v
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            #pragma unroll
            for (int j = 0; j < 4; j++)
                v[k][j] = fmaf(s, v[k][j], __shfl_xor_sync(FULL, v[k][j], m));
        }
    }
}

// the team's 4 KV sign / scale constants of a length-G vector
__device__ __forceinline__ void load_team(const float* __restrict__ p, int l, float (&v)[KV][4]) {
    #pragma unroll
    for (int k = 0; k < KV; k++) {
        const float4 a = reinterpret_cast<const float4*>(p)[l + TT * k];
        v[k][0] = a.x; v[k][1] = a.y; v[k][2] = a.z; v[k][3] = a.w;
    }
}

// Number of midpoints <= y (the nearest centroid, ties up), by binary search: a branch-free
// tree of selects on register midpoints, the last two levels of 4 bits from shared memory.
__device__ __forceinline__ int nearest_up(float y, const float (&m)[NC - 1],
                                          const float* s_mid) {
#if BITS == 2
    const bool b1 = y >= m[1];
    return (b1 ? 2 : 0) + (y >= (b1 ? m[2] : m[0]));
#elif BITS == 3
    const bool b2 = y >= m[3];
    const bool b1 = y >= (b2 ? m[5] : m[1]);
    const float t0 = b2 ? (b1 ? m[6] : m[4]) : (b1 ? m[2] : m[0]);
    return (b2 ? 4 : 0) + (b1 ? 2 : 0) + (y >= t0);
#else
    int q = y >= m[7] ? 8 : 0;
    q += y >= (q ? m[11] : m[3]) ? 4 : 0;
    q += y >= s_mid[q + 1] ? 2 : 0;
    return q + (y >= s_mid[q]);
#endif
}

__device__ __forceinline__ unsigned short f16_bits(float v) {  // RNE, as numpy's astype
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ float f16_value(unsigned short h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

// x: [n, d] float32 (d % 4 == 0), groups r = row * ngrp + gi over columns gi*G .. gi*G + G - 1,
// zero past d (PAD). Codes of group r: lo bytes r*G/4 .. (2-bit plane, or 4-bit nibbles),
// hi bytes r*G/8 .. (3 bits); norms[r]: the corrected norm as fp16 bits or float32.
extern "C" __global__ void __launch_bounds__(TPB)
tq_llama_encode(const float* __restrict__ x, const float* __restrict__ pre,
                const float* __restrict__ post, const float* __restrict__ mids,
                const float* __restrict__ cent, unsigned char* __restrict__ lo,
                unsigned char* __restrict__ hi, void* __restrict__ norms, long long R, int d,
                int ngrp, int norm_corr, int norm_f16) {
    __shared__ float s_mid[NC], s_cent[NC];
    if (threadIdx.x < NC - 1) s_mid[threadIdx.x] = mids[threadIdx.x];
    if (threadIdx.x < NC) s_cent[threadIdx.x] = cent[threadIdx.x];
    __syncthreads();
    const int l = threadIdx.x % TT;
    float ps[KV][4], qs[KV][4];
    load_team(pre, l, ps);
    load_team(post, l, qs);
    float m[NC - 1];
    #pragma unroll
    for (int q = 0; q < NC - 1; q++) m[q] = s_mid[q];
    const long long tpb = TPB / TT, stride = (long long)gridDim.x * tpb;
    // the loop bound is block-uniform, so every shuffle runs converged
    for (long long b0 = blockIdx.x * tpb; b0 < R; b0 += stride) {
        const long long r = b0 + threadIdx.x / TT;
        const bool ok = r < R;
#if PAD
        const long long row = r / ngrp;
        const int c0 = (int)(r - row * ngrp) * G;
        const float* src = x + row * d + c0;
#else
        const float* src = x + r * G;
#endif
        float v[KV][4];
        float ss = 0.0f;
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            const int e = 4 * l + 4 * TT * k;
#if PAD
            const bool in = ok && c0 + e < d;
#else
            const bool in = ok;
#endif
            const float4 a = in ? __ldcs(reinterpret_cast<const float4*>(src + e))
                                : make_float4(0.f, 0.f, 0.f, 0.f);
            v[k][0] = a.x; v[k][1] = a.y; v[k][2] = a.z; v[k][3] = a.w;
            #pragma unroll
            for (int j = 0; j < 4; j++) { ss = fmaf(v[k][j], v[k][j], ss); v[k][j] *= ps[k][j]; }
        }
        const float nrm = sqrtf(team_sum(ss));
        const float inv = nrm > 1e-10f ? 1.0f / nrm : 0.0f;
        team_fwht(v, l);
        int idx[KV][4];
        float c2 = 0.0f;
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                const float y = __fmul_rn(__fmul_rn(v[k][j], qs[k][j]), inv);
                const int q = nearest_up(y, m, s_mid);
                idx[k][j] = q;
                const float c = s_cent[q];
                c2 = fmaf(c, c, c2);
            }
        }
        const float cn = sqrtf(team_sum(c2));
#if BITS == 4
        unsigned short* lo16 = reinterpret_cast<unsigned short*>(lo) + r * (G / 4);
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            const unsigned w = idx[k][0] | idx[k][1] << 4 | idx[k][2] << 8 | idx[k][3] << 12;
            if (ok) lo16[l + TT * k] = (unsigned short)w;
        }
#else
        unsigned char* lo8 = lo + r * (G / 4);
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            const unsigned b = (idx[k][0] & 3) | (idx[k][1] & 3) << 2 | (idx[k][2] & 3) << 4
                             | (idx[k][3] & 3) << 6;
            if (ok) lo8[l + TT * k] = (unsigned char)b;
        }
#if BITS == 3
        unsigned nib = 0;  // bit 4 k + j: the high bit of idx[k][j]
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            #pragma unroll
            for (int j = 0; j < 4; j++) nib |= (unsigned)(idx[k][j] >> 2) << (4 * k + j);
        }
        const unsigned pn = __shfl_xor_sync(FULL, nib, 1);  // the odd neighbour's high nibbles
        if (ok && !(l & 1)) {
            #pragma unroll
            for (int k = 0; k < KV; k++)
                hi[r * (G / 8) + l / 2 + TT * k / 2] =
                    (unsigned char)(((nib >> 4 * k) & 15u) | ((pn >> 4 * k) & 15u) << 4);
        }
#endif
#endif
        if (ok && l == 0) {
            const float st = norm_corr ? (cn > 1e-10f ? nrm / cn : nrm) : nrm;
            if (norm_f16) reinterpret_cast<unsigned short*>(norms)[r] = f16_bits(st);
            else reinterpret_cast<float*>(norms)[r] = st;
        }
    }
}

// out [n, d] = decode of the layout above: c[idx] * norm, inverse rotation, padding dropped.
extern "C" __global__ void __launch_bounds__(TPB)
tq_llama_decode(const unsigned char* __restrict__ lo, const unsigned char* __restrict__ hi,
                const void* __restrict__ norms, const float* __restrict__ pre,
                const float* __restrict__ post, const float* __restrict__ cent,
                float* __restrict__ out, long long R, int d, int ngrp, int norm_f16) {
    __shared__ float s_cent[NC];
    if (threadIdx.x < NC) s_cent[threadIdx.x] = cent[threadIdx.x];
    __syncthreads();
    const int l = threadIdx.x % TT;
    float ps[KV][4], qs[KV][4];
    load_team(pre, l, ps);
    load_team(post, l, qs);
    const long long tpb = TPB / TT, stride = (long long)gridDim.x * tpb;
    for (long long b0 = blockIdx.x * tpb; b0 < R; b0 += stride) {
        const long long r = b0 + threadIdx.x / TT;
        const bool ok = r < R;
        const long long rc = ok ? r : 0;
        const float nrm = norm_f16 ? f16_value(reinterpret_cast<const unsigned short*>(norms)[rc])
                                   : reinterpret_cast<const float*>(norms)[rc];
        float v[KV][4];
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            int idx[4];
#if BITS == 4
            const unsigned w =
                reinterpret_cast<const unsigned short*>(lo)[rc * (G / 4) + l + TT * k];
            #pragma unroll
            for (int j = 0; j < 4; j++) idx[j] = (w >> 4 * j) & 15u;
#else
            const unsigned w = lo[rc * (G / 4) + l + TT * k];
            #pragma unroll
            for (int j = 0; j < 4; j++) idx[j] = (w >> 2 * j) & 3u;
#if BITS == 3
            const unsigned h = hi[rc * (G / 8) + l / 2 + TT * k / 2] >> 4 * (l & 1);
            #pragma unroll
            for (int j = 0; j < 4; j++) idx[j] |= ((h >> j) & 1u) << 2;
#endif
#endif
            #pragma unroll
            for (int j = 0; j < 4; j++) v[k][j] = s_cent[idx[j]] * ps[k][j];
        }
        team_fwht(v, l);
#if PAD
        const long long row = rc / ngrp;
        const int c0 = (int)(rc - row * ngrp) * G;
        float* dst = out + row * d + c0;
#else
        float* dst = out + rc * G;
#endif
        #pragma unroll
        for (int k = 0; k < KV; k++) {
            const int e = 4 * l + 4 * TT * k;
#if PAD
            const bool in = ok && c0 + e < d;
#else
            const bool in = ok;
#endif
            float o[4];
            #pragma unroll
            for (int j = 0; j < 4; j++) o[j] = __fmul_rn(v[k][j], nrm) * qs[k][j];
            if (in) __stcs(reinterpret_cast<float4*>(dst + e), make_float4(o[0], o[1], o[2], o[3]));
        }
    }
}
"""


def tql_fused_ok(xp: ModuleType, g: int, d: int, bits: int) -> bool:
    """Whether the fused llama.cpp-format kernels take WHT groups of ``g`` over rows of ``d``."""
    return xp is not np and g in TQL_GROUPS and d % 4 == 0 and bits in (2, 3, 4)


def _tql_launch(cp: ModuleType, name: str, g: int, bits: int, pad: bool, r_rows: int, args):
    defines = {"G": g, "VPT": _TQL_VPT, "BITS": bits, "PAD": int(pad), "TPB": _TQ_THREADS}
    k = _compiled(cp, _TQL_SOURCE, name, defines)
    teams = _TQ_THREADS // (g // _TQL_VPT)
    k((max(1, -(-r_rows // (teams * _TQL_ITERS))),), (_TQ_THREADS,), args)


def tq_llama_encode(
    cp: ModuleType, x, g: int, pre, post, mids, cent, bits: int, *, norm_corr=True, norm_f16=True
):
    """Fused llama.cpp-format encode of ``x [n, d]`` in WHT groups of ``g`` (zero-padded to
    ``dp = ceil(d / g) * g``): per group ``u``, ``y = post * FWHT(pre * u) / ||u||``, codes = the
    number of ``mids`` <= y, stored norm ``||u|| / ||cent[codes]||`` (``norm_corr``) or ``||u||``.

    ``pre``/``post``: device float32 [g], ``s1`` and ``s2 / sqrt(g)`` of ``wht_signs``. Returns
    ``(planes, norms)`` in ``pack_codes``' layout: {"lo": uint8 [n, dp*w/8]} (+ "hi" uint8
    [n, dp/8] for 3 bits) and norms [n, dp/g], float16 (``norm_f16``) or float32.
    """
    x = _dev(cp, x, cp.float32)
    n, d = (int(s) for s in x.shape)
    ngrp = -(-d // g)
    r_rows, dp = n * ngrp, ngrp * g
    wlo = 2 if bits == 3 else bits
    lo = cp.empty((n, dp * wlo // 8), dtype=cp.uint8)
    hi = cp.empty((n, dp // 8), dtype=cp.uint8) if bits == 3 else lo
    norms = cp.empty((n, ngrp), dtype=cp.float16 if norm_f16 else cp.float32)
    args = (
        x,
        _dev(cp, pre, cp.float32),
        _dev(cp, post, cp.float32),
        _dev(cp, mids, cp.float32),
        _dev(cp, cent, cp.float32),
        lo,
        hi,
        norms,
        np.int64(r_rows),
        np.int32(d),
        np.int32(ngrp),
        np.int32(norm_corr),
        np.int32(norm_f16),
    )
    if r_rows:
        _tql_launch(cp, "tq_llama_encode", g, bits, dp != d, r_rows, args)
    return ({"lo": lo, "hi": hi} if bits == 3 else {"lo": lo}), norms


def tq_llama_decode(
    cp: ModuleType, planes: dict, norms, g: int, d: int, pre, post, cent, bits: int
):
    """Inverse of :func:`tq_llama_encode`: ``[n, d]`` float32, per group
    ``post * FWHT(pre * cent[codes] * norm)`` with the padding dropped; ``pre``/``post`` =
    ``s2`` and ``s1 / sqrt(g)``; ``norms`` float16 or float32 [n, dp/g]."""
    lo = _dev(cp, planes["lo"], cp.uint8)
    hi = _dev(cp, planes["hi"], cp.uint8) if bits == 3 else lo
    n = int(lo.shape[0])
    ngrp = -(-d // g)
    f16 = norms.dtype == cp.float16
    norms = _dev(cp, norms, cp.float16 if f16 else cp.float32)
    out = cp.empty((n, d), dtype=cp.float32)
    args = (
        lo,
        hi,
        norms,
        _dev(cp, pre, cp.float32),
        _dev(cp, post, cp.float32),
        _dev(cp, cent, cp.float32),
        out,
        np.int64(n * ngrp),
        np.int32(d),
        np.int32(ngrp),
        np.int32(f16),
    )
    if n:
        _tql_launch(cp, "tq_llama_decode", g, bits, ngrp * g != d, n * ngrp, args)
    return out


# ================================================================================================
# kakeyaturbo: spherical K-means + residual code of whole blocks, and their decode (CuPy only).
#
# The CuPy array path ran K-means as dozens of batched launches per iteration over [B, n, K]
# temporaries, with host syncs to drop converged blocks, and decoded through [B, n, N] GEMM
# temporaries. ``kt_encode``: one thread block per block of n <= 512 rows, thread i owns row i
# (its direction in registers, a copy in shared memory for the centre sums); centre 0, the
# farthest-first init, every Lloyd iteration (each block stops at its own first unchanged
# iteration, with no host involvement), the f16 rounding of the centres, assign-and-project, the
# residual, its in-register FWHT, the Lloyd-Max index and the LSB-first packing all happen in one
# launch. Centre sums run over fixed row groups in a fixed order (deterministic, no atomics).
# ``kt_decode``: one thread block per block, D/32 threads per row: unpack, centroid * norm,
# FWHT, the t*centre add and the unprojection (basis in shared memory), written straight into
# the output. ``kt_gram``: per run of rows, mean and centred Gram matrix without a centred copy
# (the PCA covariance); ``kt_d_eff``: the variance rule on the device (P ints to the host, not
# P x D eigenvalues). Same algorithm as the NumPy path; only float32 summation orders differ.
# ================================================================================================

#: Limits of the kakeyaturbo kernels: padded coefficient width, centres, rows per block.
KT_MAX_DP, KT_MAX_K, KT_MAX_ROWS = 64, 32, 512

_KT_SOURCE = r"""
#define KT_EPS 1.1920928955078125e-07f
#define NM ((1 << BITS) - 1)
#define NWORDS ((NW * BITS + 31) / 32)
#define NB ((NW * BITS + 7) / 8)
#define WA (DP > NW ? DP : NW)

__device__ __forceinline__ unsigned short kt_h16(float v) {  // float32 -> fp16 bits (RNE)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ float kt_f32(unsigned short h) {  // fp16 bits -> float32
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

#if defined(KT_ENCODE) || defined(KT_DECODE)
__device__ __forceinline__ void kt_fwht(float* a) {  // unnormalised, natural order, NW = 2^LNW
    #pragma unroll
    for (int s = 0; s < LNW; s++) {
        #pragma unroll
        for (int q = 0; q < NW / 2; q++) {
            const int i = (q >> s << (s + 1)) | (q & ((1 << s) - 1)), j = i | (1 << s);
            const float x = a[i], y = a[j];
            a[i] = x + y;
            a[j] = x - y;
        }
    }
}

__device__ __forceinline__ int kt_wht_len(int d_eff) {
    int w = 1;
    while (w < d_eff) w <<= 1;
    return w;
}
#endif

#ifdef KT_ENCODE
#define KG (NT >= 128 ? NT / 64 : 1)  // row groups of the centre sums

__device__ __forceinline__ void kt_load_row(const float* __restrict__ p, float* v) {
    #pragma unroll
    for (int j = 0; j < DP; j += 4) {
        const float4 a = reinterpret_cast<const float4*>(p)[j / 4];
        v[j] = a.x; v[j + 1] = a.y; v[j + 2] = a.z; v[j + 3] = a.w;
    }
}

// acc[k] = d . c_k for the KC centres c (shared memory, [KC][DP]); KC independent FMA chains
__device__ __forceinline__ void kt_dots(const float* d, const float* c, float* acc) {
    #pragma unroll
    for (int k = 0; k < KC; k++) acc[k] = 0.f;
    #pragma unroll
    for (int j = 0; j < DP; j += 4) {
        #pragma unroll
        for (int k = 0; k < KC; k++) {
            const float4 v = reinterpret_cast<const float4*>(c + k * DP)[j / 4];
            acc[k] = fmaf(d[j], v.x, acc[k]);
            acc[k] = fmaf(d[j + 1], v.y, acc[k]);
            acc[k] = fmaf(d[j + 2], v.z, acc[k]);
            acc[k] = fmaf(d[j + 3], v.w, acc[k]);
        }
    }
}

__device__ __forceinline__ float kt_dot(const float* d, const float* c) {  // 4 FMA chains
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    #pragma unroll
    for (int j = 0; j < DP; j += 4) {
        const float4 v = reinterpret_cast<const float4*>(c)[j / 4];
        s[0] = fmaf(d[j], v.x, s[0]);
        s[1] = fmaf(d[j + 1], v.y, s[1]);
        s[2] = fmaf(d[j + 2], v.z, s[2]);
        s[3] = fmaf(d[j + 3], v.w, s[3]);
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}

// warp argmax of (v, i): larger v wins, the lower index on ties
__device__ __forceinline__ void kt_argmax_warp(float& v, int& i) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
}

// One thread block per block of n <= NT rows; thread i owns row i (its direction in registers).
// coef [B, n, DP] (zero columns beyond the block's d_eff); first_tab[n_valid] = the valid row that
// seeds centre 0; outputs: cent [B, KC, DP] (rounded), packed [B, n, NB], t/norm fp16 bits
// [B, n], seg [B, n], keff [B]. norm_mode 0: no norm, 1: 1/scale, 2: 1/scale (0 if res = 0).
extern "C" __global__ void __launch_bounds__(NT, 1)
kt_encode(const float* __restrict__ coef, const int* __restrict__ first_tab,
          const int* __restrict__ d_eff, const float* __restrict__ signs,
          const float* __restrict__ mids, float* __restrict__ cent_out,
          unsigned char* __restrict__ packed, unsigned short* __restrict__ t_out,
          unsigned short* __restrict__ norm_out, unsigned char* __restrict__ seg_out,
          int* __restrict__ keff_out, int n, int max_iter, int round16, int legacy_scale,
          int norm_mode) {
    extern __shared__ __align__(16) float kt_smem[];
    float* cs = kt_smem;               // [KC][DP] centres
    float* part = cs + KC * DP;        // [KG][KC][DP] partial centre sums
    float* dsm = part + KG * KC * DP;  // [NT][DP + 1] directions (odd stride: no bank conflicts)
    float* svs = dsm + NT * (DP + 1);  // [NT] row weight: +-1 (sign of its cosine), 0 if invalid
    float* sg = svs + NT;              // [NW] sign pattern
    float* md = sg + NW;               // [NM] quantiser midpoints
    float* wv = md + NM;               // [32] argmax values
    int* asg = (int*)(wv + 32);        // [NT] assignments
    int* cnt = asg + NT;               // [KG][KC] valid members
    int* wi = cnt + KG * KC;           // [33] argmax indices / warp counts, [32] broadcast
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long b = blockIdx.x;
    const bool row = tid < n;
    const float neg_inf = __int_as_float(0xff800000);

    float d[DP];
    kt_load_row(coef + (b * n + (row ? tid : 0)) * DP, d);
    float nrm2 = 0.f;
    bool any = false;
    #pragma unroll
    for (int j = 0; j < DP; j++) {
        nrm2 = fmaf(d[j], d[j], nrm2);
        any |= fabsf(d[j]) > KT_EPS;
    }
    any &= row;
    const float nrm = sqrtf(nrm2);
    const bool valid = row && nrm > KT_EPS;
    #pragma unroll
    for (int j = 0; j < DP; j++) d[j] = valid ? d[j] / nrm : 0.f;
    const int n_valid = __syncthreads_count(valid);
    const int k_eff = min(KC, max(__syncthreads_count(any), 1));
    #pragma unroll
    for (int j = 0; j < DP; j++) dsm[tid * (DP + 1) + j] = d[j];
    for (int p = tid; p < KC * DP; p += NT) cs[p] = 0.f;
    for (int p = tid; p < NW; p += NT) sg[p] = signs[p];
    for (int p = tid; p < NM; p += NT) md[p] = mids[p];

    // centre 0: the first_tab[n_valid]-th valid row (zeros when no row is valid)
    const unsigned bal = __ballot_sync(0xffffffffu, valid);
    if (lane == 0) wi[warp] = __popc(bal);
    __syncthreads();
    int rank = __popc(bal & ((1u << lane) - 1u));
    for (int w = 0; w < warp; w++) rank += wi[w];
    const int first = first_tab[n_valid];
    __syncthreads();
    if (valid && rank == first) {
        #pragma unroll
        for (int j = 0; j < DP; j++) cs[j] = d[j];
    }
    __syncthreads();

    // farthest-first on signed cosine (first row on ties)
    float maxcos = kt_dot(d, cs);
    for (int c = 1; c < k_eff; c++) {
        float v = valid ? 1.0f - maxcos : neg_inf;
        int i = tid;
        kt_argmax_warp(v, i);
        if (lane == 0) { wv[warp] = v; wi[warp] = i; }
        __syncthreads();
        if (warp == 0) {
            v = lane < NT / 32 ? wv[lane] : neg_inf;
            i = lane < NT / 32 ? wi[lane] : NT;
            kt_argmax_warp(v, i);
            if (lane == 0) wi[32] = i;
        }
        __syncthreads();
        const int far = wi[32];
        for (int p = tid; p < DP; p += NT) cs[c * DP + p] = dsm[far * (DP + 1) + p];
        __syncthreads();
        maxcos = fmaxf(maxcos, kt_dot(d, cs + c * DP));
    }

    // Lloyd: argmax |cos| (first wins), sign-weighted sums, empty clusters keep their centre,
    // stop at the first iteration that changes no valid row's assignment
    int a = 0;
    for (int it = 0; it < max_iter; it++) {
        float acc[KC];
        kt_dots(d, cs, acc);
        int nw = 0;
        float best = fabsf(acc[0]), own = acc[0];
        #pragma unroll
        for (int k = 1; k < KC; k++) {
            const float m = fabsf(acc[k]);
            if (m > best) { best = m; nw = k; own = acc[k]; }
        }
        const bool changed = valid && nw != a;
        a = nw;
        if (!__syncthreads_or(changed)) break;
        asg[tid] = nw;
        svs[tid] = valid ? (own >= 0.f ? 1.f : -1.f) : 0.f;
        __syncthreads();
        for (int p = tid; p < KG * DP; p += NT) {  // (group, column): a fixed summation order
            const int g = p / DP, j = p - g * DP;
            float* pg = part + g * KC * DP + j;
            int* cg = cnt + g * KC;
            #pragma unroll
            for (int k = 0; k < KC; k++) pg[k * DP] = 0.f;
            if (j == 0) {
                #pragma unroll
                for (int k = 0; k < KC; k++) cg[k] = 0;
            }
            for (int i0 = g * (NT / KG); i0 < (g + 1) * (NT / KG); i0 += 8) {
                float w[8], v[8];  // loads first: only the sums stay a dependent chain
                int kk[8];
                #pragma unroll
                for (int u = 0; u < 8; u++) {
                    w[u] = svs[i0 + u];
                    kk[u] = asg[i0 + u];
                    v[u] = dsm[(i0 + u) * (DP + 1) + j];
                }
                #pragma unroll
                for (int u = 0; u < 8; u++) {
                    pg[kk[u] * DP] += w[u] * v[u];
                    if (j == 0) cg[kk[u]] += w[u] != 0.f;
                }
            }
        }
        __syncthreads();
        for (int p = tid; p < KC * DP; p += NT) {
            float s = part[p];
            for (int g = 1; g < KG; g++) s += part[g * KC * DP + p];
            part[p] = s;
        }
        for (int p = tid; p < KC; p += NT) {
            int m = cnt[p];
            for (int g = 1; g < KG; g++) m += cnt[g * KC + p];
            cnt[p] = m;
        }
        __syncthreads();
        for (int k = warp; k < KC; k += NT / 32) {
            float ss = 0.f;
            for (int j = lane; j < DP; j += 32) ss = fmaf(part[k * DP + j], part[k * DP + j], ss);
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            const float sn = sqrtf(ss);
            if (cnt[k] > 0) {
                for (int j = lane; j < DP; j += 32) {
                    const float s = part[k * DP + j];
                    cs[k * DP + j] = sn > KT_EPS ? s / sn : s;
                }
            }
        }
        __syncthreads();
    }

    // stored (rounded) centres
    for (int p = tid; p < KC * DP; p += NT) {
        const float v = round16 ? kt_f32(kt_h16(cs[p])) : cs[p];
        cs[p] = v;
        cent_out[b * KC * DP + p] = v;
    }
    __syncthreads();
    if (tid == 0) keff_out[b] = k_eff;
    if (!row) return;

    // assign_and_project with the stored centres, then the residual code
    kt_load_row(coef + (b * n + tid) * DP, d);
    float acc[KC];
    kt_dots(d, cs, acc);
    int seg = 0;
    float best = fabsf(acc[0]), t = acc[0];
    #pragma unroll
    for (int k = 1; k < KC; k++) {
        const float m = fabsf(acc[k]);
        if (k < k_eff && m > best) { best = m; seg = k; t = acc[k]; }
    }
    if (nrm2 <= KT_EPS) { seg = 0; t = 0.f; }
    float w[WA];
    float rn2 = 0.f;
    #pragma unroll
    for (int j = 0; j < WA; j++) {
        float r = 0.f;
        if (j < DP && any) r = d[j] - __fmul_rn(t, cs[seg * DP + j]);
        rn2 = fmaf(r, r, rn2);
        w[j] = j < NW ? r * sg[j < NW ? j : 0] : 0.f;
    }
    kt_fwht(w);
    const float rn = sqrtf(rn2);
    const bool ok = rn > KT_EPS;
    const int wl = kt_wht_len(d_eff[b]);
    const float num = legacy_scale ? sqrtf((float)wl) : 1.f;
    const float scale = ok ? num / rn : 1.f;
    unsigned wd[NWORDS];
    #pragma unroll
    for (int k = 0; k < NWORDS; k++) wd[k] = 0u;
    #pragma unroll
    for (int j = 0; j < NW; j++) {
        const float z = __fmul_rn(w[j], scale);
        unsigned q = 0;
        #pragma unroll
        for (int m = 0; m < NM; m++) q += md[m] < z;
        if (j >= wl) q = 0;
        const int p = j * BITS;
        wd[p >> 5] |= q << (p & 31);
        if ((p & 31) + BITS > 32) wd[(p >> 5) + 1] |= q >> (32 - (p & 31));
    }
    const long long r = b * n + tid;
    unsigned char* out = packed + r * NB;
#if NB % 4 == 0
    #pragma unroll
    for (int k = 0; k < NB / 4; k++) reinterpret_cast<unsigned*>(out)[k] = wd[k];
#else
    #pragma unroll
    for (int k = 0; k < NB; k++) out[k] = (unsigned char)(wd[k >> 2] >> (8 * (k & 3)));
#endif
    t_out[r] = kt_h16(t);
    seg_out[r] = (unsigned char)seg;
    if (norm_mode) {
        float inv = 1.f / fmaxf(scale, KT_EPS);
        if (norm_mode == 2 && !ok) inv = 0.f;
        norm_out[r] = kt_h16(inv);
    }
}
#endif

#ifdef KT_DECODE
#define CPT (D < 32 ? D : 32)  // output columns per thread
#define TPR (D / CPT)          // threads per row
#define RPP (DT / TPR)    // rows per pass of the thread block
#if SKEL16
typedef unsigned short kt_skel;
#define KT_SK(v) kt_f32(v)
#else
typedef float kt_skel;
#define KT_SK(v) (v)
#endif

// One thread block per block of n rows: x_hat = mean + (t c_seg + r_hat) @ basis, r_hat =
// sigma * H (table[q] * norm) / wht_len on the block's first d_eff coordinates. Stored arrays as
// the codec keeps them: packed [B, n, NB], t/norm fp16 bits [B, n], seg_packed [B, seg_nb],
// cent [B, KC, dp], basis [P, dp, D], mean [P, D] (P = 1 when shared); out [B * n, D].
extern "C" __global__ void __launch_bounds__(DT)
kt_decode(const unsigned char* __restrict__ packed, const unsigned short* __restrict__ t16,
          const unsigned short* __restrict__ norm16, const unsigned char* __restrict__ segp,
          const kt_skel* __restrict__ cent, const kt_skel* __restrict__ basis,
          const kt_skel* __restrict__ mean, const int* __restrict__ d_eff,
          const float* __restrict__ signs, const float* __restrict__ table,
          float* __restrict__ out, int n, int dp, int seg_bits, int seg_nb, int shared,
          int use_norm) {
    extern __shared__ __align__(16) float kt_smem[];
    float* bs = kt_smem;          // [DP][D] basis (zero rows beyond dp)
    float* cs = bs + DP * D;      // [KC][DP] centres
    float* mn = cs + KC * DP;     // [D] mean
    float* sg = mn + D;           // [WA] sign pattern (zero beyond NW)
    float* tb = sg + WA;          // [NM + 1] centroids
    const int tid = threadIdx.x;
    const long long b = blockIdx.x;
    const long long pb = shared ? 0 : b;
    for (int p = tid; p < DP * D; p += DT) {
        const int i = p / D;
        bs[p] = i < dp ? KT_SK(basis[(pb * dp + i) * D + (p - i * D)]) : 0.f;
    }
    for (int p = tid; p < KC * DP; p += DT) {
        const int k = p / DP, i = p - k * DP;
        cs[p] = i < dp ? KT_SK(cent[(b * KC + k) * dp + i]) : 0.f;
    }
    for (int p = tid; p < D; p += DT) mn[p] = KT_SK(mean[pb * D + p]);
    for (int p = tid; p < WA; p += DT) sg[p] = p < NW ? signs[p] : 0.f;
    for (int p = tid; p <= NM; p += DT) tb[p] = table[p];
    __syncthreads();
    const int de = d_eff[b];
    const int wl = kt_wht_len(de);
    const float inv_wl = 1.0f / (float)wl;  // a power of two: exact, as the division
    const int part = tid % TPR;
    for (int r = tid / TPR; r < n; r += RPP) {
        const long long row = b * n + r;
        const unsigned char* src = packed + row * NB;
        unsigned wd[NWORDS];
#if NB % 4 == 0
        #pragma unroll
        for (int k = 0; k < NWORDS; k++) wd[k] = reinterpret_cast<const unsigned*>(src)[k];
#else
        #pragma unroll
        for (int k = 0; k < NWORDS; k++) wd[k] = 0u;
        #pragma unroll
        for (int k = 0; k < NB; k++) wd[k >> 2] |= (unsigned)src[k] << (8 * (k & 3));
#endif
        const float nv = use_norm ? kt_f32(norm16[row]) : 1.f;
        float v[WA];
        #pragma unroll
        for (int j = 0; j < WA; j++) {
            if (j >= NW) { v[j] = 0.f; continue; }
            const int p = j * BITS;
            unsigned q = wd[p >> 5] >> (p & 31);
            if ((p & 31) + BITS > 32) q |= wd[(p >> 5) + 1] << (32 - (p & 31));
            q &= (1u << BITS) - 1u;
            v[j] = __fmul_rn(j < wl ? tb[q] : 0.f, nv);
        }
        kt_fwht(v);
        int s = 0;
        if (seg_bits) {
            const int bit = r * seg_bits, o = bit >> 3;
            const unsigned char* sp = segp + b * seg_nb;
            unsigned x = sp[o];
            if (o + 1 < seg_nb) x |= (unsigned)sp[o + 1] << 8;
            s = (x >> (bit & 7)) & ((1u << seg_bits) - 1u);
        }
        const float tt = kt_f32(t16[row]);
        #pragma unroll
        for (int i = 0; i < DP; i++) {
            const float u = i < de ? __fmul_rn(__fmul_rn(sg[i], v[i]), inv_wl) : 0.f;
            v[i] = __fmul_rn(tt, cs[s * DP + i]) + u;
        }
        float acc[CPT];
        #pragma unroll
        for (int c = 0; c < CPT; c++) acc[c] = 0.f;
        #pragma unroll
        for (int i = 0; i < DP; i++) {
            #pragma unroll
            for (int c4 = 0; c4 < CPT / 4; c4++) {
                const float4 w = reinterpret_cast<const float4*>(bs + i * D)[c4 * TPR + part];
                acc[4 * c4] = fmaf(v[i], w.x, acc[4 * c4]);
                acc[4 * c4 + 1] = fmaf(v[i], w.y, acc[4 * c4 + 1]);
                acc[4 * c4 + 2] = fmaf(v[i], w.z, acc[4 * c4 + 2]);
                acc[4 * c4 + 3] = fmaf(v[i], w.w, acc[4 * c4 + 3]);
            }
        }
        float4* o = reinterpret_cast<float4*>(out + row * D);
        const float4* m4 = reinterpret_cast<const float4*>(mn);
        #pragma unroll
        for (int c4 = 0; c4 < CPT / 4; c4++) {
            const float4 m = m4[c4 * TPR + part];
            o[c4 * TPR + part] = make_float4(m.x + acc[4 * c4], m.y + acc[4 * c4 + 1],
                                             m.z + acc[4 * c4 + 2], m.w + acc[4 * c4 + 3]);
        }
    }
}
#endif

#ifdef KT_DEFF
// d_eff of every row of the ascending eigenvalues w [P, D] (the host rule of the NumPy path, in
// the same float32 operations): the first count whose running sum of max(lambda, 0), taken in
// descending order, divided by the total reaches ratio; D if never; 1 if the total <= EPS.
extern "C" __global__ void kt_d_eff(const float* __restrict__ w, int* __restrict__ out,
                                    long long p, float ratio) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p) return;
    const float* r = w + i * D;
    float total = 0.f;
    for (int j = D - 1; j >= 0; j--) total += fmaxf(r[j], 0.f);
    int de = D;
    float cum = 0.f;
    for (int j = D - 1; j >= 0; j--) {
        cum += fmaxf(r[j], 0.f);
        if (cum / total >= ratio) { de = D - j; break; }
    }
    out[i] = total > KT_EPS ? de : 1;
}
#endif

#ifdef KT_GRAM
#define TI (D / 16)     // 16 x 16 threads, a TI x TI tile of the D x D output each
#define GP (256 / D)    // row parts of the column sums
#define GR 32           // rows staged per step

__device__ __forceinline__ void kt_load_ti(const float* p, float* v) {
#if TI % 4 == 0
    #pragma unroll
    for (int i = 0; i < TI; i += 4) {
        const float4 a = reinterpret_cast<const float4*>(p)[i / 4];
        v[i] = a.x; v[i + 1] = a.y; v[i + 2] = a.z; v[i + 3] = a.w;
    }
#else
    #pragma unroll
    for (int i = 0; i < TI; i++) v[i] = p[i];
#endif
}

// One thread block per run of m consecutive rows of x [rows, D] (the last run may be shorter):
// the run's column mean and its centred Gram matrix (x - mean)^T (x - mean), read straight from
// x (no centred copy); the sums run in a fixed order (deterministic).
extern "C" __global__ void __launch_bounds__(256)
kt_gram(const float* __restrict__ x, float* __restrict__ mean_out, float* __restrict__ gram_out,
        long long rows, int m) {
    extern __shared__ __align__(16) float kt_smem[];
    float* mu = kt_smem;          // [D]
    float* part = mu + D;         // [GP][D]
    float* tile = part + GP * D;  // [GR][D] centred rows
    const int tid = threadIdx.x;
    const long long b = blockIdx.x;
    const int nr = (int)min((long long)m, rows - b * m);
    const float* xb = x + b * m * D;
    if (tid < GP * D) {
        const int c = tid % D, p = tid / D;
        float s = 0.f;
        #pragma unroll 8
        for (int r = p; r < nr; r += GP) s += xb[(long long)r * D + c];
        part[p * D + c] = s;
    }
    __syncthreads();
    if (tid < D) {
        float s = 0.f;
        for (int p = 0; p < GP; p++) s += part[p * D + tid];
        const float v = s / (float)nr;
        mu[tid] = v;
        mean_out[b * D + tid] = v;
    }
    __syncthreads();
    const int ti = tid / 16, tj = tid % 16;
    float acc[TI][TI];
    #pragma unroll
    for (int i = 0; i < TI; i++) {
        #pragma unroll
        for (int j = 0; j < TI; j++) acc[i][j] = 0.f;
    }
    for (int r0 = 0; r0 < nr; r0 += GR) {
        for (int p = tid; p < GR * D; p += 256) {
            const int r = p / D, c = p - r * D;
            tile[p] = r0 + r < nr ? xb[(long long)(r0 + r) * D + c] - mu[c] : 0.f;
        }
        __syncthreads();
        #pragma unroll 4
        for (int r = 0; r < GR; r++) {
            float a[TI], v[TI];
            kt_load_ti(tile + r * D + ti * TI, a);
            kt_load_ti(tile + r * D + tj * TI, v);
            #pragma unroll
            for (int i = 0; i < TI; i++) {
                #pragma unroll
                for (int j = 0; j < TI; j++) acc[i][j] = fmaf(a[i], v[j], acc[i][j]);
            }
        }
        __syncthreads();
    }
    float* g = gram_out + b * D * D;
    #pragma unroll
    for (int i = 0; i < TI; i++) {
        #pragma unroll
        for (int j = 0; j < TI; j++) g[(ti * TI + i) * D + tj * TI + j] = acc[i][j];
    }
}
#endif
"""


def kt_pad(d_pad: int) -> int:
    """Coefficient row length of the kernels: ``d_pad`` rounded up to a multiple of 4 (float4)."""
    return -(-int(d_pad) // 4) * 4


def _kt_threads(rows: int) -> int:
    return max(32, -(-int(rows) // 32) * 32)


def _kt_encode_smem(dp4: int, k: int, rows: int, nw: int, bits: int) -> int:
    nt = _kt_threads(rows)
    kg = nt // 64 if nt >= 128 else 1
    floats = k * dp4 * (1 + kg) + nt * (dp4 + 2) + nw + (1 << bits) - 1 + 32
    return 4 * (floats + nt + kg * k + 33)


def _kt_decode_threads(d: int) -> int:
    tpr = d // min(d, 32)
    return max(128 // tpr, 1) * tpr  # ~140 registers a thread: several blocks per SM


def _kt_decode_smem(dp4: int, k: int, d: int, nw: int, bits: int) -> int:
    return 4 * (dp4 * d + k * dp4 + d + max(dp4, nw) + (1 << bits))


def kt_encode_ok(xp: ModuleType, d_pad: int, k: int, rows: int, bits: int) -> bool:
    """Whether :func:`kt_encode_blocks` takes blocks of ``rows`` rows and ``d_pad`` coefficients."""
    if xp is np or not (1 <= d_pad <= KT_MAX_DP and 1 <= k <= KT_MAX_K):
        return False
    if not 1 <= rows <= KT_MAX_ROWS:
        return False
    dp4 = kt_pad(d_pad)
    return _kt_encode_smem(dp4, k, rows, 1 << (d_pad - 1).bit_length(), bits) <= _SMEM_LIMIT


def kt_decode_ok(xp: ModuleType, d_pad: int, k: int, d: int, bits: int) -> bool:
    """Whether :func:`kt_decode_blocks` takes ``D = d`` (16, or a multiple of 32 up to 4096)."""
    if xp is np or not (1 <= d_pad <= KT_MAX_DP and 1 <= k <= KT_MAX_K):
        return False
    if d != 16 and (d % 32 or not 32 <= d <= 4096):
        return False
    dp4 = kt_pad(d_pad)
    return _kt_decode_smem(dp4, k, d, 1 << (d_pad - 1).bit_length(), bits) <= _SMEM_LIMIT


def _kt_kernel(cp: ModuleType, name: str, defines: dict[str, int], smem: int):
    return _compiled(cp, _KT_SOURCE, name, defines, smem)


def kt_encode_blocks(
    cp: ModuleType,
    coef,
    first_tab,
    d_eff,
    signs,
    mids,
    *,
    k: int,
    bits: int,
    max_iter: int,
    round16: bool,
    legacy_scale: bool,
    norm_mode: int,
) -> dict:
    """K-means + residual code of ``B`` blocks (see ``_KT_SOURCE``), for ``kt_encode_ok`` shapes.

    ``coef [B, n, DP]`` float32 coefficients, ``DP = kt_pad(d_pad)`` (zero columns beyond each
    block's ``d_eff``); ``first_tab [n + 1]`` int32: ``gen_range(0..n_valid)`` of the seed for
    every ``n_valid`` (the valid row that seeds centre 0); ``d_eff [B]`` int32; ``signs [NW]`` the
    sign pattern (``NW = next_pow2(d_pad)``); ``mids`` the ``2^bits - 1`` quantiser midpoints.
    ``norm_mode``: 0 no norm, 1 ``1/scale``, 2 ``1/scale`` or 0 for a zero residual.
    Returns device arrays: ``centres [B, k, DP]`` (rounded to f16 if ``round16``),
    ``packed [B, n, ceil(NW*bits/8)]`` uint8, ``t``/``norm [B, n]`` float16 (``norm`` None for
    mode 0), ``seg [B, n]`` uint8, ``k_eff [B]`` int32.
    """
    nb, n, dp4 = (int(s) for s in coef.shape)
    nw = int(signs.shape[0])
    ok = dp4 % 4 == 0 and 0 < dp4 <= KT_MAX_DP and nw & (nw - 1) == 0 and 0 < nw <= KT_MAX_DP
    smem = _kt_encode_smem(dp4, k, n, nw, bits)
    if not (ok and 1 <= k <= KT_MAX_K and n <= KT_MAX_ROWS and smem <= _SMEM_LIMIT):
        raise ValueError(f"kt_encode_blocks: unsupported shapes {coef.shape}, NW={nw}, k={k}")
    defines = {
        "KT_ENCODE": 1,
        "DP": dp4,
        "NW": nw,
        "LNW": nw.bit_length() - 1,
        "KC": k,
        "NT": _kt_threads(n),
        "BITS": bits,
    }
    out = {
        "centres": cp.empty((nb, k, dp4), dtype=cp.float32),
        "packed": cp.empty((nb, n, (nw * bits + 7) // 8), dtype=cp.uint8),
        "t": cp.empty((nb, n), dtype=cp.float16),
        "norm": cp.empty((nb, n), dtype=cp.float16) if norm_mode else None,
        "seg": cp.empty((nb, n), dtype=cp.uint8),
        "k_eff": cp.empty(nb, dtype=cp.int32),
    }
    if nb:
        kern = _kt_kernel(cp, "kt_encode", defines, smem)
        args = (
            _dev(cp, coef, cp.float32),
            _dev(cp, first_tab, cp.int32),
            _dev(cp, d_eff, cp.int32),
            _dev(cp, signs, cp.float32),
            _dev(cp, mids, cp.float32),
            out["centres"],
            out["packed"],
            out["t"],
            out["t"] if out["norm"] is None else out["norm"],
            out["seg"],
            out["k_eff"],
            np.int32(n),
            np.int32(max_iter),
            np.int32(round16),
            np.int32(legacy_scale),
            np.int32(norm_mode),
        )
        kern((nb,), (defines["NT"],), args, shared_mem=smem)
    return out


def kt_decode_blocks(
    cp: ModuleType,
    packed,
    t,
    norm,
    seg_packed,
    seg_bits: int,
    centres,
    basis,
    mean,
    d_eff,
    signs,
    table,
    out,
) -> None:
    """Decode ``B`` blocks of ``n`` rows into ``out [B * n, D]`` float32 (``kt_decode_ok`` shapes).

    Stored arrays as the codec keeps them: ``packed [B, n, nb]`` uint8, ``t``/``norm [B, n]``
    float16 (``norm`` None: not read), ``seg_packed [B, seg_nb]`` (None when ``seg_bits`` is 0),
    ``centres [B, K, dp]``, ``basis [P, dp, D]``, ``mean [P, D]`` (all float16 or all float32;
    ``P = 1``: one basis shared by every block); ``d_eff [B]`` int32; ``signs [NW]`` and
    ``table [2^bits]`` (Lloyd-Max centroids) float32, ``NW`` = the packed code length.
    """
    nb, n = int(packed.shape[0]), int(packed.shape[1])
    k, dp = int(centres.shape[1]), int(centres.shape[2])
    d = int(basis.shape[2])
    nw = int(signs.shape[0])
    bits = int(table.shape[0]).bit_length() - 1
    if not kt_decode_ok(cp, dp, k, d, bits) or nw < dp:
        raise ValueError(f"kt_decode_blocks: unsupported shapes (D={d}, d_pad={dp}, k={k})")
    if out.shape != (nb * n, d) or _dev(cp, out, cp.float32) is not out:
        raise ValueError(f"kt_decode_blocks: out must be C-contiguous aligned float32 {(nb, n, d)}")
    skel = cp.float16 if centres.dtype == cp.float16 else cp.float32
    dp4 = kt_pad(dp)
    defines = {
        "KT_DECODE": 1,
        "DP": dp4,
        "NW": nw,
        "LNW": nw.bit_length() - 1,
        "KC": k,
        "D": d,
        "DT": _kt_decode_threads(d),
        "BITS": bits,
        "SKEL16": int(skel == cp.float16),
    }
    smem = _kt_decode_smem(dp4, k, d, nw, bits)
    if not nb or not n:
        return
    t16 = _dev(cp, t, cp.float16)
    kern = _kt_kernel(cp, "kt_decode", defines, smem)
    args = (
        _dev(cp, packed, cp.uint8),
        t16,
        t16 if norm is None else _dev(cp, norm, cp.float16),
        t16 if seg_packed is None else _dev(cp, seg_packed, cp.uint8),
        _dev(cp, centres, skel),
        _dev(cp, basis, skel),
        _dev(cp, mean, skel),
        _dev(cp, d_eff, cp.int32),
        _dev(cp, signs, cp.float32),
        _dev(cp, table, cp.float32),
        out,
        np.int32(n),
        np.int32(dp),
        np.int32(seg_bits),
        np.int32(0 if seg_packed is None else seg_packed.shape[-1]),
        np.int32(basis.shape[0] == 1),
        np.int32(norm is not None),
    )
    kern((nb,), (defines["DT"],), args, shared_mem=smem)


# ================================================================================================
# Kakeya KV1 (kakeya.py): the spherical K-means Lloyd loop and the per-row codes on the device.
#
# The CuPy array path ran each Lloyd iteration as a dozen batched launches over [P, K, N]
# temporaries plus host syncs (convergence, empty clusters, cycle checks) and its codes through a
# full argsort. ``kv1_kmeans``: one thread block per problem runs the whole of
# ``kakeya._kmeans_t``: farthest-first init, assignment (signed-cosine arg-max, first index on
# ties), member sums, normalised means, the sequential empty-cluster refill, the period-1/2 cycle
# rule and the iteration count. Rows stream from global memory (L2) in 32-row tiles, a warp's tile
# in shared memory; a lane owns a row for the dot products (centres broadcast from shared memory)
# and a column for the member sums (per-warp float partials, added across warps in order in
# float64: deterministic, no atomics on values). Only a problem's own d_eff columns are read. The
# farthest-first init makes one pass for centre 0, then refreshes only the rows that can still be
# the next arg-min (exact; a pass per centre would stream the rows 15 more times). ``kv1_codes``:
# same tiles; seg, t, residual and its top-|r| selection per row. ``kv1_coeffs``: the decoder's
# coefficient rows. ``kv1_row_norms``, ``kv1_sub_outer``: one-pass stand-ins for CuPy einsum and
# broadcast temporaries. Only float32 summation orders differ from NumPy (sequential FMAs here);
# products and sums that NumPy rounds separately use __fmul_rn/__fadd_rn.
# ================================================================================================

#: Limits of the KV1 kernels: centres (register slots) and residual coordinates per row.
KV1_MAX_K, KV1_MAX_RES = 32, 16
_KV1_CW = 64  # columns of a row tile
_KV1_THREADS = 128

_KV1_SOURCE = r"""
#define NW (NT / 32)
#define FULL 0xffffffffu
#define NOKEY 255
#define KINF __int_as_float(0x7f800000)

__device__ __forceinline__ size_t al16(size_t b) { return (b + 15) & ~(size_t)15; }

__device__ __forceinline__ float bf16r(float x) {
    const unsigned b = __float_as_uint(x);
    return __uint_as_float((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
}

// Rows r0..r0+31, columns c0..c0+cw-1 of a problem's [N, DP] rows into a warp's tile (row stride
// TS, TS/4 odd: a lane reading its own row with float4 loads hits every bank once a phase).
__device__ __forceinline__ void load_tile(const float *__restrict__ rows, float *tile, int r0,
                                          int c0, int cw, int N, int DP, int TS, int lane) {
    const int q = cw >> 2;
    __syncwarp();
    for (int e = lane; e < 32 * q; e += 32) {
        const int r = e / q, c4 = e - r * q;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r0 + r < N)
            v = *reinterpret_cast<const float4 *>(rows + (size_t)(r0 + r) * DP + c0 + 4 * c4);
        *reinterpret_cast<float4 *>(tile + r * TS + 4 * c4) = v;
    }
    __syncwarp();
}

// Dot products of the lane's row (r0 + lane) with NK centres (rows of C, stride CS) over the
// first dpp columns (the rest are zero): sequential FMAs in column order. Only those columns are
// loaded; the last column chunk stays in the tile.
template <int NK>
__device__ __forceinline__ void row_dots(const float *__restrict__ rows, float *tile,
                                         const float *C, int CS, int r0, int N, int DP, int dpp,
                                         int TS, int lane, float *acc) {
    #pragma unroll
    for (int k = 0; k < NK; ++k) acc[k] = 0.f;
    for (int c0 = 0; c0 < dpp; c0 += CW) {
        const int je = min(CW, dpp - c0);
        load_tile(rows, tile, r0, c0, je, N, DP, TS, lane);
        const float *t = tile + lane * TS;
        for (int j = 0; j < je; j += 4) {
            const float4 u = *reinterpret_cast<const float4 *>(t + j);
            #pragma unroll
            for (int k = 0; k < NK; ++k) {
                const float4 c = *reinterpret_cast<const float4 *>(C + k * CS + c0 + j);
                acc[k] = fmaf(u.x, c.x, acc[k]);
                acc[k] = fmaf(u.y, c.y, acc[k]);
                acc[k] = fmaf(u.z, c.z, acc[k]);
                acc[k] = fmaf(u.w, c.w, acc[k]);
            }
        }
    }
}

// The same dot product for one row read straight from global memory (same FMA order).
__device__ __forceinline__ float row_dot(const float *__restrict__ row, const float *c, int dpp) {
    float acc = 0.f;
    for (int j = 0; j < dpp; j += 4) {
        const float4 u = *reinterpret_cast<const float4 *>(row + j);
        const float4 v = *reinterpret_cast<const float4 *>(c + j);
        acc = fmaf(u.x, v.x, acc);
        acc = fmaf(u.y, v.y, acc);
        acc = fmaf(u.z, v.z, acc);
        acc = fmaf(u.w, v.w, acc);
    }
    return acc;
}

// Block-wide arg-min of (v, i), the smallest i on ties; every thread returns the winner's i.
__device__ __forceinline__ int block_argmin(float v, int i, float *rv, int *ri, int lane, int w) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(FULL, v, o);
        const int i2 = __shfl_xor_sync(FULL, i, o);
        if (v2 < v || (v2 == v && i2 < i)) { v = v2; i = i2; }
    }
    if (lane == 0) { rv[w] = v; ri[w] = i; }
    __syncthreads();
    if (w == 0) {
        v = lane < NW ? rv[lane] : KINF;
        i = lane < NW ? ri[lane] : 0x7fffffff;
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float v2 = __shfl_xor_sync(FULL, v, o);
            const int i2 = __shfl_xor_sync(FULL, i, o);
            if (v2 < v || (v2 == v && i2 < i)) { v = v2; i = i2; }
        }
        if (lane == 0) ri[NW] = i;
    }
    __syncthreads();
    const int r = ri[NW];
    __syncthreads();
    return r;
}

#define KCASE(k) case k: s0[k] += v0; s1[k] += v1; break;

// Add the tile's 32 rows (row r's cluster: keff of lane r, NOKEY = not a member) to the warp's
// per-cluster column sums; lanes own columns lane and lane + 32 of the chunk.
__device__ __forceinline__ void accum(const float *tile, int cw, int TS, int keff, float *s0,
                                      float *s1, int lane) {
    for (int r = 0; r < 32; ++r) {
        const int kr = __shfl_sync(FULL, keff, r);
        if (kr >= KM) continue;
        const float v0 = lane < cw ? tile[r * TS + lane] : 0.f;
        const float v1 = lane + 32 < cw ? tile[r * TS + lane + 32] : 0.f;
        switch (kr) {
            KCASE(0) KCASE(1) KCASE(2) KCASE(3) KCASE(4) KCASE(5) KCASE(6) KCASE(7)
            KCASE(8) KCASE(9) KCASE(10) KCASE(11) KCASE(12) KCASE(13) KCASE(14) KCASE(15)
#if KM > 16
            KCASE(16) KCASE(17) KCASE(18) KCASE(19) KCASE(20) KCASE(21) KCASE(22) KCASE(23)
            KCASE(24) KCASE(25) KCASE(26) KCASE(27) KCASE(28) KCASE(29) KCASE(30) KCASE(31)
#endif
        }
    }
}

// Warps' column sums (float) -> sums[k][c0 + j] (double, warps added in order: deterministic).
__device__ __forceinline__ void flush(const float *s0, const float *s1, int c0, int cw, int CWS,
                                      float *part, double *sums, int DP, int tid, int lane, int w) {
    __syncthreads();
    float *pw = part + w * KM * CWS;
    #pragma unroll
    for (int k = 0; k < KM; ++k) {
        if (lane < cw) pw[k * CWS + lane] = s0[k];
        if (lane + 32 < cw) pw[k * CWS + lane + 32] = s1[k];
    }
    __syncthreads();
    for (int e = tid; e < KM * cw; e += NT) {
        const int k = e / cw, j = e - k * cw;
        double s = 0.0;
        for (int v = 0; v < NW; ++v) s += (double)part[(v * KM + k) * CWS + j];
        sums[k * DP + c0 + j] = s;
    }
    __syncthreads();
}

// Centre k = normalised mean of its members (one warp): float32 mean of the float64 sums, then
// F.normalize (eps 1e-8).
__device__ __forceinline__ void normalize_centre(const double *sums, const int *cnt, float *C,
                                                 int k, int DP, int lane) {
    const double c = (double)cnt[k];
    float ss = 0.f;
    for (int j = lane; j < DP; j += 32) {
        const float m = (float)(sums[k * DP + j] / c);
        ss = fmaf(m, m, ss);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(FULL, ss, o);
    const float nrm = fmaxf(sqrtf(ss), 1e-8f);
    for (int j = lane; j < DP; j += 32) C[k * DP + j] = (float)(sums[k * DP + j] / c) / nrm;
}

extern "C" __global__ void kakeya_kmeans(
    const float *__restrict__ U, const unsigned char *__restrict__ valid,
    const int *__restrict__ ids, const int *__restrict__ kact, const int *__restrict__ dppa,
    float *__restrict__ Cout, int *__restrict__ aout, int *__restrict__ iout, const int N,
    const int DP, const int TS, const int KC, const int max_iter) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int p = ids[blockIdx.x], tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int CWS = min(CW, DP);
    size_t off = 0;
    double *sums = reinterpret_cast<double *>(smem);
    off = al16(sizeof(double) * KM * DP);
    float *region = reinterpret_cast<float *>(smem + off);
    off = al16(off + 4 * (size_t)max(NW * 32 * TS, NW * KM * CWS));
    float *Cb = reinterpret_cast<float *>(smem + off);
    off = al16(off + 4 * (size_t)3 * KM * DP);
    float *maxc = reinterpret_cast<float *>(smem + off);
    off = al16(off + 4 * (size_t)N);
    int *cnt = reinterpret_cast<int *>(smem + off);
    off = al16(off + 4 * KM);
    float *rv = reinterpret_cast<float *>(smem + off);
    off = al16(off + 4 * (NW + 1));
    int *ri = reinterpret_cast<int *>(smem + off);
    off = al16(off + 4 * (NW + 1));
    unsigned char *Ab = smem + off;
    off = al16(off + 4 * (size_t)N);
    unsigned char *vld = smem + off;

    const float *rows = U + (size_t)p * N * DP;
    const int ka = kact[p], dpp = dppa[p], nch = (N + 31) >> 5, KD = KM * DP;
    float *tile = region + w * 32 * TS;
    for (int n = tid; n < N; n += NT) {
        vld[n] = valid[(size_t)p * N + n];
        Ab[n] = 0;
    }
    for (int e = tid; e < KD; e += NT) {
        Cb[e] = 0.f;
        sums[e] = 0.0;  // columns >= dpp stay zero
    }
    __syncthreads();

    // ---- farthest-first init: centre 0 = first valid row, centre k = the valid row whose max
    // cosine to centres 0..k-1 is smallest (first index on ties). After one pass for centre 0 it
    // is lazy: maxc[n] holds the max over centres 0..kn[n]-1 only, a lower bound; a step
    // refreshes the rows whose bound is under a threshold (minimum bound + 1/64, doubling) until
    // the arg-min of the bounds is an up-to-date row: that row is the exact arg-min, since every
    // row's true value is >= its bound >= the minimum (and ties keep the first index).
    {
        unsigned char *kn = Ab + 3 * N;  // the "new" assignment buffer, unused until the loop
        int bi = 0x7fffffff;
        for (int n = tid; n < N && bi == 0x7fffffff; n += NT)
            if (vld[n]) bi = n;
        int sel = block_argmin(bi == 0x7fffffff ? KINF : 0.f, bi, rv, ri, lane, w);
        for (int k = 0; k < ka; ++k) {
            if (k == 1) {
                for (int ch = w; ch < nch; ch += NW) {
                    const int n = (ch << 5) + lane;
                    float acc[1];
                    row_dots<1>(rows, tile, Cb, DP, ch << 5, N, DP, dpp, TS, lane, acc);
                    if (n < N) {
                        maxc[n] = acc[0];
                        kn[n] = 1;
                    }
                }
                __syncthreads();
            }
            float vsel = 0.f;
            for (int r = 0; k > 0; ++r) {
                const float T = r == 0 ? -KINF : r < 8 ? vsel + ldexpf(1.f, r - 7) : KINF;
                float bv = KINF;
                bi = 0x7fffffff;
                for (int n = tid; n < N; n += NT) {
                    if (!vld[n]) continue;
                    float m = maxc[n];
                    if (kn[n] < k && m <= T) {
                        for (int c = kn[n]; c < k; ++c)
                            m = fmaxf(m, row_dot(rows + (size_t)n * DP, Cb + c * DP, dpp));
                        maxc[n] = m;
                        kn[n] = (unsigned char)k;
                    }
                    if (m < bv) { bv = m; bi = n; }
                }
                sel = block_argmin(bv, bi, rv, ri, lane, w);
                vsel = maxc[sel];
                const bool fresh = kn[sel] == k;
                __syncthreads();  // everyone has read sel's state before the next refresh
                if (fresh) break;
            }
            for (int j = tid; j < DP; j += NT) Cb[k * DP + j] = rows[(size_t)sel * DP + j];
            __syncthreads();
        }
    }

    // ---- Lloyd iterations. Buffers: assignments (W, P1, P2, new) and centres (W, P1, P2); the
    // states after the last two updates (P1, P2) detect a repeated state (cycle).
    int it = 0, aw = 0, a1 = 1, a2 = 2, an = 3, cw_ = 0, c1 = 1, c2 = 2, fa = 0, fc = 0;
    for (int i = 0; i < max_iter && ka >= 2; ++i) {
        unsigned char *aW = Ab + aw * N, *aN = Ab + an * N;
        float *CW_ = Cb + cw_ * KD;
        if (tid < KM) cnt[tid] = 0;
        __syncthreads();
        float s0[KM], s1[KM];
        #pragma unroll
        for (int k = 0; k < KM; ++k) s0[k] = s1[k] = 0.f;
        const bool fused = DP <= CW;
        int changed = 0;
        for (int ch = w; ch < nch; ch += NW) {
            const int n = (ch << 5) + lane;
            float acc[KM];
            row_dots<KM>(rows, tile, CW_, DP, ch << 5, N, DP, dpp, TS, lane, acc);
            int key = 0, keff = NOKEY;
            if (n < N && vld[n]) {
                float best = acc[0];
                #pragma unroll
                for (int k = 1; k < KM; ++k)
                    if (k < ka && acc[k] > best) { best = acc[k]; key = k; }
                keff = key;
            }
            if (n < N) {
                changed |= key != aW[n];
                aN[n] = (unsigned char)key;
            }
            const unsigned grp = __match_any_sync(FULL, keff);
            if (keff != NOKEY && lane == __ffs(grp) - 1) atomicAdd(&cnt[keff], __popc(grp));
            if (fused) accum(tile, dpp, TS, keff, s0, s1, lane);
        }
        if (!__syncthreads_or(changed)) break;
        it = i + 1;
        if (fused) {
            flush(s0, s1, 0, dpp, CWS, region, sums, DP, tid, lane, w);
        } else {
            for (int c0 = 0; c0 < dpp; c0 += CW) {
                const int cwc = min(CW, dpp - c0);
                #pragma unroll
                for (int k = 0; k < KM; ++k) s0[k] = s1[k] = 0.f;
                for (int ch = w; ch < nch; ch += NW) {
                    const int n = (ch << 5) + lane;
                    load_tile(rows, tile, ch << 5, c0, cwc, N, DP, TS, lane);
                    accum(tile, cwc, TS, n < N && vld[n] ? aN[n] : NOKEY, s0, s1, lane);
                }
                flush(s0, s1, c0, cwc, CWS, region, sums, DP, tid, lane, w);
            }
        }
        { const int t = aw; aw = an; an = t; aW = Ab + aw * N; }
        bool any_empty = false;
        for (int k = 0; k < ka; ++k) any_empty |= cnt[k] == 0;
        if (!any_empty) {
            for (int k = w; k < ka; k += NW) normalize_centre(sums, cnt, CW_, k, DP, lane);
            __syncthreads();
        } else {
            // sequential pass (spec: an empty cluster takes the valid row with the smallest max
            // cosine to the current, partly updated, centres; that row moves to it)
            for (int k = 0; k < ka; ++k) {
                if (cnt[k] > 0) {
                    if (w == 0) normalize_centre(sums, cnt, CW_, k, DP, lane);
                    __syncthreads();
                    continue;
                }
                float bv = KINF;
                int bi = 0x7fffffff;
                for (int ch = w; ch < nch; ch += NW) {
                    const int n = (ch << 5) + lane;
                    float acc[KM];
                    row_dots<KM>(rows, tile, CW_, DP, ch << 5, N, DP, dpp, TS, lane, acc);
                    if (n < N && vld[n]) {
                        float m = acc[0];
                        #pragma unroll
                        for (int q = 1; q < KM; ++q)
                            if (q < ka) m = fmaxf(m, acc[q]);
                        if (m < bv) { bv = m; bi = n; }
                    }
                }
                const int far = block_argmin(bv, bi, rv, ri, lane, w);
                const int src = aW[far];
                for (int j = tid; j < DP; j += NT) {
                    const float u = rows[(size_t)far * DP + j];
                    CW_[k * DP + j] = u;
                    sums[src * DP + j] -= (double)u;
                    sums[k * DP + j] += (double)u;
                }
                __syncthreads();
                if (tid == 0) {
                    cnt[src] -= 1;
                    cnt[k] += 1;
                    aW[far] = (unsigned char)k;
                }
                __syncthreads();
            }
        }
        const int left = max_iter - i - 1;
        if (i >= 1 && left > 0) {
            const unsigned char *aP1 = Ab + a1 * N, *aP2 = Ab + a2 * N;
            const float *CP1 = Cb + c1 * KD, *CP2 = Cb + c2 * KD;
            int same = 1;
            for (int n = tid; n < N; n += NT) same &= aW[n] == aP1[n];
            for (int e = tid; e < KD; e += NT) same &= CW_[e] == CP1[e];
            if (__syncthreads_and(same)) { it += left; fa = aw; fc = cw_; break; }
            if (i >= 2) {
                same = 1;
                for (int n = tid; n < N; n += NT) same &= aW[n] == aP2[n];
                for (int e = tid; e < KD; e += NT) same &= CW_[e] == CP2[e];
                if (__syncthreads_and(same)) {
                    it += left;  // period 2: an odd number of updates left ends on the other state
                    fa = left & 1 ? a1 : aw;
                    fc = left & 1 ? c1 : cw_;
                    break;
                }
            }
        }
        // the new state becomes P1; W starts from a copy of it
        { const int t = a2; a2 = a1; a1 = aw; aw = t; }
        { const int t = c2; c2 = c1; c1 = cw_; cw_ = t; }
        unsigned char *aW2 = Ab + aw * N;
        const unsigned char *aP1 = Ab + a1 * N;
        float *CW2 = Cb + cw_ * KD;
        const float *CP1 = Cb + c1 * KD;
        for (int n = tid; n < N; n += NT) aW2[n] = aP1[n];
        for (int e = tid; e < KD; e += NT) CW2[e] = CP1[e];
        fa = aw;
        fc = cw_;
        __syncthreads();
    }
    __syncthreads();
    const unsigned char *aF = Ab + fa * N;
    const float *CF = Cb + fc * KD;
    for (int e = tid; e < KC * DP; e += NT) Cout[(size_t)p * KC * DP + e] = CF[e];
    for (int n = tid; n < N; n += NT) aout[(size_t)p * N + n] = aF[n];
    if (tid == 0) iout[p] = it;
}

// Per-row codes of one problem (a block) against its stored centres C [KC, DP]: seg = arg-max of
// P.c_k over k < k_act (first index; 0 where ||P|| <= eps), t = P.c_seg (bf16-rounded when rb),
// r = P - t c_seg (two roundings, as NumPy), then the kk largest |r_j| (columns j >= d_eff count
// as -1, ties go to the lower j), stored in ascending j (kk == DC: every column).
extern "C" __global__ void kakeya_codes(
    const float *__restrict__ Pp, const unsigned char *__restrict__ valid,
    const float *__restrict__ C, const int *__restrict__ kact, const int *__restrict__ deff,
    SEGT *__restrict__ seg, float *__restrict__ tout, float *__restrict__ vals,
    IDXT *__restrict__ idx, const int N, const int DP, const int TS, const int TW, const int CS,
    const int KC, const int DC, const int rb) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int p = blockIdx.x, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    float *Cs = reinterpret_cast<float *>(smem);
    float *tile = Cs + KM * CS + w * TW;
    const float *rows = Pp + (size_t)p * N * DP;
    for (int e = tid; e < KM * CS; e += NT) {
        const int k = e / CS, j = e - k * CS;
        Cs[e] = k < KC && j < DP ? C[((size_t)p * KC + k) * DP + j] : 0.f;
    }
    __syncthreads();
    const int ka = kact[p], de = deff[p], dpp = min((de + 3) & ~3, DP), nch = (N + 31) >> 5;
    for (int ch = w; ch < nch; ch += NW) {
        const int r0 = ch << 5, n = r0 + lane;
        const size_t row = (size_t)p * N + n;
        float acc[KM];
        row_dots<KM>(rows, tile, Cs, CS, r0, N, DP, dpp, TS, lane, acc);
        int s = 0;
        if (n < N && valid[row]) {
            float best = acc[0];
            #pragma unroll
            for (int k = 1; k < KM; ++k)
                if (k < ka && acc[k] > best) { best = acc[k]; s = k; }
        }
        float t = acc[0];
        #pragma unroll
        for (int k = 1; k < KM; ++k)
            if (k == s) t = acc[k];
        if (rb) t = bf16r(t);
        if (n < N) {
            seg[row] = (SEGT)s;
            tout[row] = t;
        }
        float bm[KK], br[KK];
        int bj[KK];
        #pragma unroll
        for (int q = 0; q < KK; ++q) { bm[q] = -2.f; br[q] = 0.f; bj[q] = 0; }
        for (int c0 = 0; c0 < DC; c0 += CW) {
            const int je = min(CW, DC - c0), jl = max(0, min(CW, dpp - c0));  // jl: loaded
            if (DP > CW && jl > 0) load_tile(rows, tile, r0, c0, jl, N, DP, TS, lane);
            const float *tr = tile + lane * TS, *cs = Cs + s * CS + c0;
            for (int j4 = 0; j4 < je; j4 += 4) {
                const float4 u = j4 < jl ? *reinterpret_cast<const float4 *>(tr + j4)
                                         : make_float4(0.f, 0.f, 0.f, 0.f);
                const float4 c = *reinterpret_cast<const float4 *>(cs + j4);
                const float uu[4] = {u.x, u.y, u.z, u.w}, cc[4] = {c.x, c.y, c.z, c.w};
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = c0 + j4 + e;
                    if (j4 + e >= je) break;
                    const float r = __fsub_rn(uu[e], __fmul_rn(t, cc[e]));
                    const float m = j < de ? fabsf(r) : -1.f;
                    if (m > bm[KK - 1]) {
                        bm[KK - 1] = m; br[KK - 1] = r; bj[KK - 1] = j;
                        #pragma unroll
                        for (int q = KK - 1; q > 0; --q)
                            if (bm[q] > bm[q - 1]) {
                                const float tm = bm[q], tr2 = br[q];
                                const int tj = bj[q];
                                bm[q] = bm[q - 1]; br[q] = br[q - 1]; bj[q] = bj[q - 1];
                                bm[q - 1] = tm; br[q - 1] = tr2; bj[q - 1] = tj;
                            }
                    }
                }
            }
        }
        #pragma unroll
        for (int a = 0; a < KK - 1; ++a)
            #pragma unroll
            for (int b = 0; b < KK - 1 - a; ++b)
                if (bj[b] > bj[b + 1]) {
                    const float tr2 = br[b];
                    const int tj = bj[b];
                    br[b] = br[b + 1]; bj[b] = bj[b + 1];
                    br[b + 1] = tr2; bj[b + 1] = tj;
                }
        // stage through the tile so that the warp writes its rows' codes contiguously
        const int nr = min(32, N - r0);
        const size_t o = ((size_t)p * N + r0) * KK;
        __syncwarp();
        #pragma unroll
        for (int q = 0; q < KK; ++q) tile[lane * KK + q] = rb ? bf16r(br[q]) : br[q];
        __syncwarp();
        for (int e = lane; e < nr * KK; e += 32) vals[o + e] = tile[e];
        __syncwarp();
        IDXT *ti = reinterpret_cast<IDXT *>(tile);
        #pragma unroll
        for (int q = 0; q < KK; ++q) ti[lane * KK + q] = (IDXT)bj[q];
        __syncwarp();
        for (int e = lane; e < nr * KK; e += 32) idx[o + e] = ti[e];
    }
}

// Row norms sqrt(sum v^2) of R rows of W floats (a warp a row).
extern "C" __global__ void kakeya_row_norms(const float *__restrict__ v, float *__restrict__ out,
                                            const long long R, const int W) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * NW + (threadIdx.x >> 5);
    if (r >= R) return;
    float s = 0.f;
    for (int j = lane; j < W; j += 32) {
        const float x = v[r * W + j];
        s = fmaf(x, x, s);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    if (lane == 0) out[r] = sqrtf(s);
}

// A - alpha t_dir^T for R rows of W floats (row r of problem r / N), the product rounded first.
extern "C" __global__ void kakeya_sub_outer(const float *__restrict__ A,
                                            const float *__restrict__ alpha,
                                            const float *__restrict__ tdir, float *__restrict__ out,
                                            const long long R, const int N, const int W) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= R * W) return;
    const long long r = e / W;
    out[e] = __fsub_rn(A[e], __fmul_rn(alpha[r], tdir[(r / N) * W + (e - r * W)]));
}

// Decode of the coefficients of R rows (a warp a row): the residual scattered through shared
// memory, + t c_seg, + alpha t_dir, each product and sum rounded as NumPy does.
extern "C" __global__ void kakeya_coeffs(
    const float *__restrict__ vals, const IDXT *__restrict__ idx, const SEGT *__restrict__ seg,
    const float *__restrict__ t, const float *__restrict__ C, const float *__restrict__ alpha,
    const float *__restrict__ tdir, float *__restrict__ out, const long long R, const int N,
    const int DC, const int KC, const int kk, const int has_tdir) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * NW + w;
    if (row >= R) return;
    float *buf = reinterpret_cast<float *>(smem) + w * DC;
    for (int j = lane; j < DC; j += 32) buf[j] = 0.f;
    __syncwarp();
    for (int q = lane; q < kk; q += 32) buf[(int)idx[row * kk + q]] = vals[row * kk + q];
    __syncwarp();
    const long long p = row / N;
    const float tt = t[row], al = has_tdir ? alpha[row] : 0.f;
    const float *c = C + (p * KC + (int)seg[row]) * DC, *td = tdir + p * DC;
    for (int j = lane; j < DC; j += 32) {
        float a = __fadd_rn(buf[j], __fmul_rn(tt, c[j]));
        if (has_tdir) a = __fadd_rn(a, __fmul_rn(al, td[j]));
        out[row * DC + j] = a;
    }
}
"""


def _kv1_tile_stride(dp: int) -> int:
    """Row stride of a tile (columns min(dp, 64)): a multiple of 4 whose quarter is odd, so a
    lane's float4 reads of its own row are bank-conflict free."""
    c = min(dp, _KV1_CW)
    return c if (c // 4) % 2 else c + 4


def _kv1_kmeans_smem(n: int, dp: int, km: int) -> int:
    """Shared bytes of ``kv1_kmeans`` (the kernel carves them in this order)."""
    nw = _KV1_THREADS // 32

    def al(b: int) -> int:
        return (b + 15) & ~15

    off = al(8 * km * dp)
    off = al(off + 4 * max(nw * 32 * _kv1_tile_stride(dp), nw * km * min(dp, _KV1_CW)))
    off = al(off + 12 * km * dp)
    off = al(off + 4 * n)
    off = al(off + 4 * km)
    off = al(off + 4 * (nw + 1))
    off = al(off + 4 * (nw + 1))
    off = al(off + 4 * n)
    return off + n


def _kv1_codes_layout(dp: int, kk: int) -> tuple[int, int, int]:
    """``(tile stride, tile words a warp, centre row stride)`` of ``kv1_codes``; the centre stride
    has an odd quarter so that lanes reading different centres spread over the banks."""
    ts = _kv1_tile_stride(dp)
    cs = dp if (dp // 4) % 2 else dp + 4
    return ts, 32 * max(ts, 2 * kk), cs


def _kv1_km(k: int) -> int:
    return 16 if k <= 16 else 32


def kv1_fused_ok(xp: ModuleType, k: int, kk: int, n: int, d: int) -> bool:
    """Whether the KV1 kernels take problems of ``n`` rows, up to ``k`` centres, ``kk`` residual
    coordinates and ``d`` coefficients (CuPy only)."""
    if xp is np or not (1 <= k <= KV1_MAX_K and 1 <= kk <= KV1_MAX_RES and n >= 1 and d >= 1):
        return False
    dp = -(-d // 4) * 4
    _, tw, cs = _kv1_codes_layout(dp, kk)
    codes = 4 * (_kv1_km(k) * cs + (_KV1_THREADS // 32) * tw)
    return max(_kv1_kmeans_smem(n, dp, _kv1_km(k)), codes) <= _SMEM_LIMIT


_KV1_TYPES = {"uint8": "unsigned char", "uint16": "unsigned short", "int64": "long long"}


def _kv1_kernel(cp: ModuleType, name: str, defines: dict, smem: int = 0):
    return _compiled(cp, _KV1_SOURCE, name, defines, smem)


def kv1_kmeans(cp: ModuleType, U, valid, live, k_act, d_eff, n_centres: int, max_iter: int):
    """``kakeya._kmeans_t`` on the device for the problems ``live`` (host ints) of ``U``.

    ``U [P, N, DP]``: unit directions (zero rows where not ``valid [P, N]``; DP a multiple of 4,
    columns >= ``d_eff[p]`` zero); ``k_act``/``d_eff``: host ints per problem (``k_act`` <=
    ``n_centres`` <= KV1_MAX_K). Returns ``centres [P, n_centres, DP]`` (zero for problems not in
    ``live``), ``assign [P, N]`` int32 and the Lloyd iterations (host int64 [P]).
    """
    P, N, DP = (int(s) for s in U.shape)
    km = _kv1_km(n_centres)
    U = cp.ascontiguousarray(U, dtype=cp.float32)
    C = cp.zeros((P, n_centres, DP), dtype=cp.float32)
    assign = cp.zeros((P, N), dtype=cp.int32)
    iters = cp.zeros(P, dtype=cp.int32)
    if len(live):
        smem = _kv1_kmeans_smem(N, DP, km)
        defines = {"NT": _KV1_THREADS, "KM": km, "CW": _KV1_CW, "KK": 1}
        defines |= {"SEGT": "int", "IDXT": "int"}
        kern = _kv1_kernel(cp, "kakeya_kmeans", defines, smem)
        dpp = np.minimum(-(-np.asarray(d_eff) // 4) * 4, DP)
        args = (
            U,
            cp.ascontiguousarray(valid).view(cp.uint8),
            cp.asarray(np.asarray(live, dtype=np.int32)),
            cp.asarray(np.asarray(k_act, dtype=np.int32)),
            cp.asarray(dpp.astype(np.int32)),
            C,
            assign,
            iters,
            np.int32(N),
            np.int32(DP),
            np.int32(_kv1_tile_stride(DP)),
            np.int32(n_centres),
            np.int32(max_iter),
        )
        kern((len(live),), (_KV1_THREADS,), args, shared_mem=smem)
    return C, assign, cp.asnumpy(iters).astype(np.int64)


def kv1_codes(cp: ModuleType, Pp, valid, C, k_act, d_eff, d_out: int, round_bf16: bool, out):
    """Per-row codes of ``Pp [P, N, DP]`` against ``C [P, KC, DP]`` (see ``kakeya_codes`` in the
    source), written into ``out = (seg [P, N], t [P, N], vals [P, N, kk], idx [P, N, kk])``
    (C-contiguous; seg/idx uint8, uint16 or int64); ``d_out`` = the stored width (residual
    indices < d_out; kk == d_out keeps every column)."""
    P, N, DP = (int(s) for s in Pp.shape)
    seg, t, vals, idx = out
    kk, kc = int(vals.shape[2]), int(C.shape[1])
    ts, tw, cs = _kv1_codes_layout(DP, kk)
    km = _kv1_km(kc)
    defines = {
        "NT": _KV1_THREADS,
        "KM": km,
        "CW": _KV1_CW,
        "KK": kk,
        "SEGT": _KV1_TYPES[seg.dtype.name],
        "IDXT": _KV1_TYPES[idx.dtype.name],
    }
    smem = 4 * (km * cs + (_KV1_THREADS // 32) * tw)
    kern = _kv1_kernel(cp, "kakeya_codes", defines, smem)
    args = (
        cp.ascontiguousarray(Pp, dtype=cp.float32),
        cp.ascontiguousarray(valid).view(cp.uint8),
        cp.ascontiguousarray(C, dtype=cp.float32),
        cp.asarray(np.asarray(k_act, dtype=np.int32)),
        cp.asarray(np.asarray(d_eff, dtype=np.int32)),
        seg,
        t,
        vals,
        idx,
        np.int32(N),
        np.int32(DP),
        np.int32(ts),
        np.int32(tw),
        np.int32(cs),
        np.int32(kc),
        np.int32(d_out),
        np.int32(round_bf16),
    )
    if P:
        kern((P,), (_KV1_THREADS,), args, shared_mem=smem)


def kv1_coeffs(cp: ModuleType, seg, t, C, vals=None, idx=None, alpha=None, tdir=None):
    """Decoder coefficients ``[P, N, DC]``: residual ``vals`` scattered at ``idx`` (if any) +
    ``t * C[seg]`` (+ ``alpha * tdir``), with NumPy's roundings (``C [P, KC, DC]``)."""
    P, N = (int(s) for s in seg.shape)
    kc, dc = int(C.shape[1]), int(C.shape[2])
    out = cp.empty((P, N, dc), dtype=cp.float32)
    kk = 0 if vals is None else int(vals.shape[2])
    vals = cp.zeros(1, cp.float32) if vals is None else cp.ascontiguousarray(vals)
    idx = cp.zeros(1, cp.uint8) if idx is None else cp.ascontiguousarray(idx)
    has_tdir = tdir is not None
    alpha = cp.ascontiguousarray(alpha) if has_tdir else t
    tdir = cp.ascontiguousarray(tdir) if has_tdir else t
    defines = {
        "NT": _KV1_THREADS,
        "KM": 16,
        "CW": _KV1_CW,
        "KK": 1,
        "SEGT": _KV1_TYPES[seg.dtype.name],
        "IDXT": _KV1_TYPES[idx.dtype.name],
    }
    nw = _KV1_THREADS // 32
    if P * N:
        smem = 4 * nw * dc
        kern = _kv1_kernel(cp, "kakeya_coeffs", defines, smem)
        args = (
            vals,
            idx,
            cp.ascontiguousarray(seg),
            cp.ascontiguousarray(t),
            cp.ascontiguousarray(C),
            alpha,
            tdir,
            out,
            np.int64(P * N),
            np.int32(N),
            np.int32(dc),
            np.int32(kc),
            np.int32(kk),
            np.int32(has_tdir),
        )
        kern((-(-P * N // nw),), (_KV1_THREADS,), args, shared_mem=smem)
    return out


def kt_gram_ok(xp: ModuleType, d: int) -> bool:
    """Whether :func:`kt_block_gram` takes rows of ``D = d`` (a multiple of 16 up to 128)."""
    return xp is not np and d % 16 == 0 and 16 <= d <= 128


def kt_block_gram(cp: ModuleType, x, rows_per_block: int):
    """Column mean ``[G, D]`` and centred Gram matrix ``(x - mean)^T (x - mean)`` ``[G, D, D]`` of
    every run of ``rows_per_block`` consecutive rows of ``x [N, D]`` float32 (the last run may be
    shorter; ``G = ceil(N / rows_per_block)``), in one pass per run without a centred copy."""
    x = _dev(cp, x, cp.float32)
    n, d = int(x.shape[0]), int(x.shape[1])
    m = int(rows_per_block)
    if not kt_gram_ok(cp, d) or m < 1:
        raise ValueError(f"kt_block_gram: unsupported D={d} or rows_per_block={m}")
    g = -(-n // m)
    mean = cp.empty((g, d), dtype=cp.float32)
    gram = cp.empty((g, d, d), dtype=cp.float32)
    if g:
        smem = 4 * d * (1 + 256 // d + 32)
        kern = _kt_kernel(cp, "kt_gram", {"KT_GRAM": 1, "D": d}, smem)
        kern((g,), (256,), (x, mean, gram, np.int64(n), np.int32(m)), shared_mem=smem)
    return mean, gram


def _kv1_simple(cp: ModuleType, name: str):
    defines = {"NT": _KV1_THREADS, "KM": 16, "CW": _KV1_CW, "KK": 1, "SEGT": "int", "IDXT": "int"}
    return _kv1_kernel(cp, name, defines)


def kv1_row_norms(cp: ModuleType, v):
    """``sqrt(sum(v * v, axis=-1))`` of float32 ``v [..., W]`` (a warp a row, no temporary)."""
    v = cp.ascontiguousarray(v, dtype=cp.float32)
    out = cp.empty(v.shape[:-1], dtype=cp.float32)
    r, w = out.size, int(v.shape[-1])
    if r:
        nw = _KV1_THREADS // 32
        args = (v, out, np.int64(r), np.int32(w))
        _kv1_simple(cp, "kakeya_row_norms")((-(-r // nw),), (_KV1_THREADS,), args)
    return out


def kv1_sub_outer(cp: ModuleType, A, alpha, tdir):
    """``A - alpha[:, :, None] * tdir[:, None, :]`` for ``A [P, N, W]`` in one pass, rounded as
    NumPy does (the product, then the difference)."""
    P, N, W = (int(s) for s in A.shape)
    out = cp.empty((P, N, W), dtype=cp.float32)
    if out.size:
        args = (
            cp.ascontiguousarray(A, dtype=cp.float32),
            cp.ascontiguousarray(alpha, dtype=cp.float32),
            cp.ascontiguousarray(tdir, dtype=cp.float32),
            out,
            np.int64(P * N),
            np.int32(N),
            np.int32(W),
        )
        grid = (-(-out.size // _KV1_THREADS),)
        _kv1_simple(cp, "kakeya_sub_outer")(grid, (_KV1_THREADS,), args)
    return out


def kt_d_eff(cp: ModuleType, w, variance_ratio: float):
    """``d_eff [P]`` (int32, on the device) of ascending eigenvalues ``w [P, D]``: the variance
    rule of ``kakeyaturbo._d_eff_from_eigvals`` with the same float32 operations, so only ``P``
    ints, not the eigenvalues, go to the host."""
    w = _dev(cp, w, cp.float32)
    p, d = int(w.shape[0]), int(w.shape[1])
    out = cp.empty(p, dtype=cp.int32)
    if p:
        ratio = np.float32(min(max(float(variance_ratio), 0.0), 1.0))
        kern = _kt_kernel(cp, "kt_d_eff", {"KT_DEFF": 1, "D": d}, 0)
        kern((-(-p // 256),), (256,), (w, out, np.int64(p), ratio))
    return out
