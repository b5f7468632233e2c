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


def _kernel(cp: ModuleType, name: str, defines: dict[str, int], smem: int):
    key = (cp.cuda.Device().id, name, tuple(sorted(defines.items())))
    k = _KERNELS.get(key)
    if k is None:
        head = "".join(f"#define {n} {int(v)}\n" for n, v in sorted(defines.items()))
        k = cp.RawKernel(head + _SOURCE, name, options=("--std=c++17",))
        _KERNELS[key] = k
    if smem > 48 * 1024 and k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    return k


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
    key = (cp.cuda.Device().id, "tq", name, row_len, bits, mode)
    k = _KERNELS.get(key)
    if k is None:
        head = f"#define L {row_len}\n#define BITS {bits}\n#define MODE {mode}\n"
        k = cp.RawKernel(head + _TQ_SOURCE, name, options=("--std=c++17",))
        _KERNELS[key] = k
    return k


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
