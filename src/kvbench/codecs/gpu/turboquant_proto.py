"""TurboQuant: fused quantise + bit-pack (encode) and unpack + LUT + scale (decode), CuPy only.

The rotation stays a cuBLAS GEMM (FP32, no TF32); these kernels replace the elementwise passes
around it (row norm, scale, 2^b - 1 midpoint compares, plane packing, centroid norm, QJL
residual) with one read of the rotated rows and one write of the packed bytes. A row of L
values (L in TQ_ROW_LENGTHS: the prototype's head_dim, or the llama.cpp variant's WHT group) is
handled by L/8 consecutive threads, 8 values each; row sums are subgroup shuffles. Index rule
and packing are the NumPy path's (turboquant.py): idx = #midpoints < v (<= v with ties_up),
LSB-first planes (3 bits = 2-bit plane + 1-bit plane). Products that NumPy rounds separately
use __fmul_rn so nvcc does not contract them into an FMA.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from kvbench.codecs.gpu.compile import compiled, device_array

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
    return compiled(cp, _TQ_SOURCE, name, {"L": row_len, "BITS": bits, "MODE": mode})


def tq_fused_ok(xp: ModuleType, row_len: int) -> bool:
    """Whether the fused TurboQuant kernels handle rows of ``row_len`` on ``xp`` (CuPy only)."""
    return xp is not np and row_len in TQ_ROW_LENGTHS


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
    x = device_array(cp, x, cp.float32)
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
        device_array(cp, mids, cp.float32),
        device_array(cp, cent, cp.float32),
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
    lo = device_array(cp, planes["lo"], cp.uint8)
    r_rows = int(lo.shape[0])
    hi = device_array(cp, planes["hi"], cp.uint8) if bits == 3 else lo
    norm = device_array(cp, norm, cp.float32).reshape(-1)
    width = 2 * row_len if mode == TQ_PROTO_K else row_len
    out = cp.empty((r_rows, width), dtype=cp.float32)
    sg = device_array(cp, signs, cp.uint8) if mode == TQ_PROTO_K else lo
    rn = device_array(cp, rnorm, cp.float32).reshape(-1) if mode == TQ_PROTO_K else norm
    kern = _tq_kernel(cp, "tq_decode", row_len, bits, mode)
    args = (
        lo,
        hi,
        sg,
        device_array(cp, cent, cp.float32),
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
    proj = device_array(cp, proj, cp.float32)
    r_rows, row_len = int(proj.shape[0]), int(proj.shape[1])
    out = cp.empty((r_rows, row_len // 8), dtype=cp.uint8)
    n8 = r_rows * (row_len // 8)
    if n8:
        kern = _tq_kernel(cp, "tq_pack_signs", 8, 1, 0)
        kern(_grid(n8), (_TQ_THREADS,), (proj, out, np.int64(n8)))
    return out
