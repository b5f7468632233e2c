"""TurboQuant, llama.cpp format, fully fused (CuPy): one kernel a direction, rotation included.

The llama.cpp variant's rotation is a signed, normalised Walsh-Hadamard transform per group of G
values (turboquant.wht_rotation: ``u @ M = s2 * FWHT(s1 * u) / sqrt(G)``), so the GEMM above is
replaced by a butterfly in registers: a team of G / 16 consecutive threads owns one group, each
thread 16 values as 4 float4 (element 4 l + 4 TT k + j), log2(G) stages of which 2 + 2 run in
the thread and the rest through warp shuffles. Encode reads x once (zero past d when the
head_dim is padded) and writes the pack_codes planes and the norms; decode reads them and writes
x once: one DRAM pass per direction (~4.4 B a value each way), where the GEMM path moved ~16 B
(encode) and ~12 B (decode). Codes equal the NumPy path's except within float rounding of a
midpoint (FWHT vs GEMM sums). H100, 1 G values: encode 2.2-2.8 TB/s, decode 2.7 TB/s (a copy:
3.0); Nsight Compute puts the 3- and 4-bit encode at 71% of the issue slots, 58-64% of DRAM,
with 36% of the warps resident at 80 registers a thread, decode at 82% of DRAM.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from kvbench.codecs.gpu.compile import compiled, device_array

#: WHT group sizes the fused llama.cpp-format kernels take (16 values a thread, 2..32 a group).
TQL_GROUPS = (32, 64, 128, 256, 512)
#: Values a thread (H100: 16 and 8 within 6% of each other, 16 ahead in 4 of 6 configurations).
_TQL_VPT = 16
#: Groups a team works through in its grid-stride loop (amortises the sign loads; H100: 8 was
#: ahead of 64 in 4 of 6 configurations, by up to 7%).
_TQL_ITERS = 8
_TQL_THREADS = 256

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
    defines = {"G": g, "VPT": _TQL_VPT, "BITS": bits, "PAD": int(pad), "TPB": _TQL_THREADS}
    k = compiled(cp, _TQL_SOURCE, name, defines)
    teams = _TQL_THREADS // (g // _TQL_VPT)
    k((max(1, -(-r_rows // (teams * _TQL_ITERS))),), (_TQL_THREADS,), args)


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
    x = device_array(cp, x, cp.float32)
    n, d = (int(s) for s in x.shape)
    ngrp = -(-d // g)
    r_rows, dp = n * ngrp, ngrp * g
    wlo = 2 if bits == 3 else bits
    lo = cp.empty((n, dp * wlo // 8), dtype=cp.uint8)
    hi = cp.empty((n, dp // 8), dtype=cp.uint8) if bits == 3 else lo
    norms = cp.empty((n, ngrp), dtype=cp.float16 if norm_f16 else cp.float32)
    args = (
        x,
        device_array(cp, pre, cp.float32),
        device_array(cp, post, cp.float32),
        device_array(cp, mids, cp.float32),
        device_array(cp, cent, cp.float32),
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
    lo = device_array(cp, planes["lo"], cp.uint8)
    hi = device_array(cp, planes["hi"], cp.uint8) if bits == 3 else lo
    n = int(lo.shape[0])
    ngrp = -(-d // g)
    f16 = norms.dtype == cp.float16
    norms = device_array(cp, norms, cp.float16 if f16 else cp.float32)
    out = cp.empty((n, d), dtype=cp.float32)
    args = (
        lo,
        hi,
        norms,
        device_array(cp, pre, cp.float32),
        device_array(cp, post, cp.float32),
        device_array(cp, cent, cp.float32),
        out,
        np.int64(n * ngrp),
        np.int32(d),
        np.int32(ngrp),
        np.int32(f16),
    )
    if n:
        _tql_launch(cp, "tq_llama_decode", g, bits, ngrp * g != d, n * ngrp, args)
    return out
