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
    the planned ``D <= AUTO_JACOBI_MAX_D``, else ``"cusolver"`` where the CUDA runtime has it,
    else the Jacobi kernel for the ``D`` in ``JACOBI_PLANS``, else ``cupy.linalg.eigh``),
    ``"cusolver"`` (cuSOLVER's batched ``cusolverDnXsyevBatched``, CUDA >= 12.6, which CuPy does
    not wrap: called through ctypes), ``"jacobi"`` (force the kernel; CuPy only, even ``D`` up to
    256), ``"stock"`` (``xp.linalg.eigh``). ``tol`` and ``max_sweeps`` only affect the Jacobi
    kernel: it stops once ``||offdiag(A)||_F <= tol * ||A||_F`` or after ``max_sweeps`` sweeps.
    Measured on an H100 (docs/gpu.md; GB/s of the [512, D] bf16 blocks behind the matrices),
    cuSOLVER batched / Jacobi kernel: D=64 36 / 34, D=128 23.6 / 7.7, D=256 9.2 / 1.4, with
    eigenvalue errors of 7e-7 / 4e-6 relative and reconstruction errors of ~1e-5 / ~4e-6.
``batched_gram(xp, x)``
    ``x [..., N, D]`` -> ``[..., D, D]`` float32 ``x^T x``: one batched GEMM (on CuPy cuBLAS with a
    transpose flag, no transposed copy).
``batched_covariance(xp, x, mean=True)``
    ``x [..., N, D]`` -> ``[..., D, D]`` float32 ``xc^T xc / N`` with ``xc = x - mean over N`` (or
    ``x`` itself when ``mean=False``), through ``batched_gram``.

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

import ctypes
from types import ModuleType
from typing import NamedTuple

import numpy as np

from kvbench.codecs.gpu.compile import SMEM_LIMIT, compiled
from kvbench.native_libs import loaded_libraries

__all__ = [
    "JACOBI_PLANS",
    "JacobiPlan",
    "batched_covariance",
    "batched_eigh",
    "batched_gram",
    "cusolver_batched_ok",
    "float32_eigh_ok",
]


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


def _kernel(cp: ModuleType, name: str, defines: dict[str, int], smem: int):
    return compiled(cp, _SOURCE, name, defines, smem)


def jacobi_plan(d: int) -> JacobiPlan:
    """The plan for ``method="jacobi"``: the tuned one, else a guess that fits."""
    if d in JACOBI_PLANS:
        return JACOBI_PLANS[d]
    if d < 4 or d % 2 or d > 256:
        raise ValueError(f"batched_eigh: the Jacobi kernel needs an even D in 4..256, got {d}")
    threads = 256 if d <= 64 else 1024
    if _jacobi_smem_bytes(d, False, "smem", threads) <= SMEM_LIMIT:
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
    if smem > SMEM_LIMIT:
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


_SYEVB: dict[int, tuple] = {}  # device id -> (libcusolver, params); (None, None) if absent
_SIZE = ctypes.c_size_t
_VP = ctypes.c_void_p
# cudaDataType CUDA_R_32F, cusolverEigMode_t VECTOR, cublasFillMode_t UPPER
_R32F, _EIG_VECTOR, _FILL_UPPER = 0, 1, 1
#: Device workspace one cusolverDnXsyevBatched call may take (the batch is chunked under it).
_SYEVB_WORKSPACE_MAX = 1 << 30


def _syevb_lib(cp):
    """``(libcusolver, params)`` with ``cusolverDnXsyevBatched`` bound, or ``(None, None)``.

    CuPy 14 does not wrap the batched solver, so it is called through ctypes on the very
    libcusolver CuPy loaded (:func:`kvbench.native_libs.loaded_libraries`).
    """
    dev = cp.cuda.Device().id
    if dev in _SYEVB:
        return _SYEVB[dev]
    params = None
    cp.cuda.device.get_cusolver_handle()  # CuPy loads libcusolver on first use
    libs = loaded_libraries("libcusolver")
    lib = next((c for c in libs if hasattr(c, "cusolverDnXsyevBatched")), None)
    if lib is not None:
        i64, cint = ctypes.c_int64, ctypes.c_int
        common = [_VP, _VP, cint, cint, i64, cint, _VP, i64, cint, _VP, cint]
        lib.cusolverDnXsyevBatched_bufferSize.argtypes = [
            *common,
            ctypes.POINTER(_SIZE),
            ctypes.POINTER(_SIZE),
            i64,
        ]
        lib.cusolverDnXsyevBatched.argtypes = [*common, _VP, _SIZE, _VP, _SIZE, _VP, i64]
        lib.cusolverDnSetStream.argtypes = [_VP, _VP]
        lib.cusolverDnCreateParams.argtypes = [ctypes.POINTER(_VP)]
        params = _VP()
        if lib.cusolverDnCreateParams(ctypes.byref(params)) != 0:
            lib = params = None
    _SYEVB[dev] = (lib, params)
    return lib, params


def cusolver_batched_ok(xp: ModuleType) -> bool:
    """Whether ``method="cusolver"`` works here (CuPy with CUDA >= 12.6's libcusolver)."""
    return xp is not np and _syevb_lib(xp)[0] is not None


def _syevb_args(handle, params, a, w, d: int) -> tuple:
    """The leading arguments (through the compute type) of the solver and its size query, for
    the matrices from ``a`` (``[.., D, D]`` float32) and eigenvalues into ``w``."""
    mats = (_R32F, a.data.ptr, d)  # type, pointer, leading dimension
    return (handle, params, _EIG_VECTOR, _FILL_UPPER, d, *mats, _R32F, w.data.ptr, _R32F)


def _syevb_workspace(lib, args: tuple, nb: int) -> tuple[int, int]:
    """``(device bytes, host bytes)`` a solve of ``nb`` matrices needs."""
    dev, host = _SIZE(), _SIZE()
    st = lib.cusolverDnXsyevBatched_bufferSize(*args, ctypes.byref(dev), ctypes.byref(host), nb)
    if st != 0:
        raise RuntimeError(f"batched_eigh: cusolverDnXsyevBatched_bufferSize status {st}")
    return dev.value, host.value


def _syev_batched(cp, a3):
    """cuSOLVER's batched symmetric eigensolver on ``a3 [B, D, D]`` (contiguous float32).

    cuSOLVER is column-major: with the upper fill mode it reads the lower triangle of the
    row-major ``a3``, and the eigenvectors it writes as columns are the rows of the row-major
    result, hence the transposed view returned. A matrix that does not converge raises.
    """
    lib, params = _syevb_lib(cp)
    nb, d = a3.shape[0], a3.shape[-1]
    v = a3.copy()  # overwritten with the eigenvectors
    w = cp.empty((nb, d), dtype=cp.float32)
    if not nb:
        return w, v.transpose(0, 2, 1)
    handle = _VP(cp.cuda.device.get_cusolver_handle())
    if lib.cusolverDnSetStream(handle, _VP(cp.cuda.get_current_stream().ptr)) != 0:
        raise RuntimeError("batched_eigh: cusolverDnSetStream failed")
    per_matrix, _ = _syevb_workspace(lib, _syevb_args(handle, params, v, w, d), 1)
    chunk = max(1, min(nb, _SYEVB_WORKSPACE_MAX // max(per_matrix, 1)))
    dev_b, host_b = _syevb_workspace(lib, _syevb_args(handle, params, v, w, d), chunk)
    work = cp.empty(max(dev_b, 1), dtype=cp.uint8)
    host = ctypes.create_string_buffer(max(host_b, 1))
    info = cp.zeros(nb, dtype=cp.int32)
    for s in range(0, nb, chunk):
        n = min(chunk, nb - s)
        args = _syevb_args(handle, params, v[s:], w[s:], d)
        st = lib.cusolverDnXsyevBatched(
            *args, work.data.ptr, dev_b, ctypes.cast(host, _VP), host_b, info[s:].data.ptr, n
        )
        if st != 0:
            raise RuntimeError(f"batched_eigh: cusolverDnXsyevBatched status {st}")
    bad = int(cp.count_nonzero(info))
    if bad:
        raise RuntimeError(f"batched_eigh: cuSOLVER did not converge on {bad} of {nb} matrices")
    return w, v.transpose(0, 2, 1)


#: Largest D for which ``auto`` prefers the Jacobi kernel to cuSOLVER's batched solver: inside the
#: PCA codecs on an H100 at D=64 the kernel is ahead (kakeya_v1 13.6 vs 12.2 GB/s, kakeyaturbo
#: 23.6 vs 20.8), from D=128 cuSOLVER is (eigh alone: 23.6 vs 7.7 GB/s at D=128, 9.2 vs 1.4 at 256).
AUTO_JACOBI_MAX_D = 64


def float32_eigh_ok(xp: ModuleType, d: int) -> bool:
    """Whether ``auto`` runs a float32 batched solver at least as accurate as a float64 stock eigh
    would be for the codecs (Jacobi kernel or cuSOLVER batched) for ``D = d`` on ``xp``."""
    return xp is not np and (d in JACOBI_PLANS or cusolver_batched_ok(xp))


def _auto_method(cp, d: int) -> str:
    """``method="auto"`` on CuPy: the fastest path this runtime has for ``D = d``."""
    if d in JACOBI_PLANS and d <= AUTO_JACOBI_MAX_D:
        return "jacobi"
    if cusolver_batched_ok(cp):
        return "cusolver"
    return "jacobi" if d in JACOBI_PLANS else "stock"


def batched_eigh(
    xp: ModuleType, a, *, method: str = "auto", tol: float = 1e-6, max_sweeps: int = 20
):
    """Eigen-decompose a stack of symmetric matrices: ``(w ascending [..., D], v [..., D, D])``.

    See the module docstring for the contract and the CuPy kernel.
    """
    shape = _check_square(a)
    if method not in ("auto", "cusolver", "jacobi", "stock"):
        raise ValueError(f"batched_eigh: method must be auto|cusolver|jacobi|stock, got {method!r}")
    if max_sweeps < 0 or not tol >= 0:
        raise ValueError(f"batched_eigh: need tol >= 0 and max_sweeps >= 0 ({tol}, {max_sweeps})")
    d = shape[-1]
    if xp is np:
        if method in ("cusolver", "jacobi"):
            raise ValueError(f"batched_eigh: method={method!r} needs CuPy arrays")
        return np.linalg.eigh(np.asarray(a))
    if method == "auto":
        method = _auto_method(xp, d)
    if method == "stock":
        return xp.linalg.eigh(a)
    cp = xp
    a3 = cp.ascontiguousarray(a.reshape((-1, d, d)), dtype=cp.float32)
    if method == "cusolver":
        if not cusolver_batched_ok(cp):
            raise ValueError("batched_eigh: method='cusolver' needs CUDA >= 12.6's cuSOLVER")
        w, v = _syev_batched(cp, a3)
        return w.reshape(shape[:-1]), v.reshape(shape)
    plan = jacobi_plan(d)
    nb = a3.shape[0]
    w = cp.empty((nb, d), dtype=cp.float32)
    v = cp.empty((nb, d, d), dtype=cp.float32)
    _jacobi_cupy(cp, a3, w, v, plan, tol, max_sweeps)
    return w.reshape(shape[:-1]), v.reshape(shape)


def batched_gram(xp: ModuleType, x):
    """``x^T x [..., D, D]`` float32 of ``x [..., N, D]``: one batched GEMM.

    CuPy: cuBLAS ``sgemmStridedBatched`` with a transpose flag, because ``cupy.matmul`` first
    copies a transposed operand into a contiguous array (a full extra pass over the rows). A
    row-major ``[N, D]`` matrix is the column-major ``D x N`` matrix M, and ``M M^T`` is the Gram.
    """
    x = xp.asarray(x, dtype=xp.float32)
    if xp is np:
        return np.matmul(x.swapaxes(-1, -2), x)
    n, d = int(x.shape[-2]), int(x.shape[-1])
    x3 = xp.ascontiguousarray(x.reshape((-1, n, d)))
    out = xp.empty((x3.shape[0], d, d), dtype=xp.float32)
    if out.size:
        cublas = xp.cuda.cublas
        one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        cublas.sgemmStridedBatched(
            xp.cuda.device.get_cublas_handle(),
            cublas.CUBLAS_OP_N,
            cublas.CUBLAS_OP_T,
            d,
            d,
            n,
            one.ctypes.data,
            x3.data.ptr,
            d,
            n * d,
            x3.data.ptr,
            d,
            n * d,
            zero.ctypes.data,
            out.data.ptr,
            d,
            d * d,
            x3.shape[0],
        )
    return out.reshape((*x.shape[:-2], d, d))


def batched_covariance(xp: ModuleType, x, mean: bool = True):
    """``[..., N, D]`` -> ``[..., D, D]`` float32 covariance ``xc^T xc / N`` (one batched GEMM)."""
    x = xp.asarray(x, dtype=xp.float32)
    if x.ndim < 2:
        raise ValueError(f"batched_covariance: expected [..., N, D], got {tuple(x.shape)}")
    n = x.shape[-2]
    if n == 0:
        raise ValueError("batched_covariance: N must be positive")
    xc = x - x.mean(axis=-2, keepdims=True) if mean else x
    return batched_gram(xp, xc) / xp.float32(n)
