"""Kakeya KV1 (kakeya.py) on the device: the spherical K-means loop, row passes and the decoder.

The CuPy array path ran each Lloyd iteration as a dozen batched launches over [P, K, N]
temporaries plus host syncs (convergence, empty clusters, cycle checks) and its codes through a
full argsort. ``kv1_kmeans``: one thread block per problem runs the whole of
``kakeya._kmeans_t``: farthest-first init, assignment (signed-cosine arg-max, first index on
ties), member sums, normalised means, the sequential empty-cluster refill, the period-1/2 cycle
rule and the iteration count. Rows stream from global memory (L2) in 32-row tiles, a warp's tile
in shared memory; a lane owns a row for the dot products (centres broadcast from shared memory)
and a column for the member sums (per-warp float partials, added across warps in order in
float64: deterministic, no atomics on values). Only a problem's own d_eff columns are read. The
farthest-first init makes one pass for centre 0, then refreshes only the rows that can still be
the next arg-min (exact; a pass per centre would stream the rows 15 more times). Measured on an
H100 and dropped: rows resident in the shared memory of a 2-8 CTA thread-block cluster (1.7-4.8x
slower: one problem per SM leaves the loop's barrier-bound phases unhidden) and an asynchronous
next-tile prefetch (1.2x slower: two blocks per SM instead of three). ``kv1_codes``: same tiles;
seg, t, residual and its top-|r| selection per row. ``kv1_split``: the encoder's temporal split,
row norms and unit rows in one pass. ``kv1_decode``: coefficient rows, basis product and mean
straight into the output rows; ``kv1_coeffs`` (coefficient rows only) where it does not fit.
``kv1_row_norms``, ``kv1_sub_outer``: one-pass stand-ins for CuPy einsum and broadcast
temporaries. Only float32 summation orders differ from NumPy (sequential FMAs here); products
and sums that NumPy rounds separately use __fmul_rn/__fadd_rn.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from kvbench.codecs.gpu.compile import SMEM_LIMIT, compiled

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
    off = al16(off + (size_t)N);
    int *lst = reinterpret_cast<int *>(smem + off);  // rows to refresh (init), then the count

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
                // the stale rows under T, listed (in any order: each refresh is independent), then
                // refreshed 32 at a time by the lanes of a warp instead of one by one per thread
                if (r > 0) {
                    if (tid == 0) lst[N] = 0;
                    __syncthreads();
                    for (int n = tid; n < N; n += NT)
                        if (vld[n] && kn[n] < k && maxc[n] <= T) lst[atomicAdd(&lst[N], 1)] = n;
                    __syncthreads();
                    for (int q = tid; q < lst[N]; q += NT) {
                        const int n = lst[q];
                        float m = maxc[n];
                        for (int c = kn[n]; c < k; ++c)
                            m = fmaxf(m, row_dot(rows + (size_t)n * DP, Cb + c * DP, dpp));
                        maxc[n] = m;
                        kn[n] = (unsigned char)k;
                    }
                    __syncthreads();
                }
                float bv = KINF;
                bi = 0x7fffffff;
                for (int n = tid; n < N; n += NT)
                    if (vld[n] && maxc[n] < bv) { bv = maxc[n]; bi = n; }
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

// The encoder's per-row pass over the coefficients A (R rows of W floats, row r of problem r / N;
// a warp a row), one read instead of four array passes: alpha = A.t_dir (lane partials, then a
// shuffle tree), P = A - alpha t_dir (NumPy's roundings; P = A without t_dir), ||P|| (the order
// of kakeya_row_norms) and the unit row U = P * (1 / ||P||) where ||P|| > eps, else zero.
extern "C" __global__ void kakeya_split(const float *__restrict__ A, const float *__restrict__ tdir,
                                        float *__restrict__ alpha, float *__restrict__ P,
                                        float *__restrict__ nrm, float *__restrict__ U,
                                        const long long R, const int N, const int W,
                                        const int has_tdir, const float eps) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * NW + (threadIdx.x >> 5);
    if (r >= R) return;
    const float *a = A + r * W, *td = tdir + (r / N) * W;
    float al = 0.f;
    if (has_tdir) {
        for (int j = lane; j < W; j += 32) al = fmaf(a[j], td[j], al);
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) al += __shfl_xor_sync(FULL, al, o);
        if (lane == 0) alpha[r] = al;
    }
    float s = 0.f;
    for (int j = lane; j < W; j += 32) {
        const float x = has_tdir ? __fsub_rn(a[j], __fmul_rn(al, td[j])) : a[j];
        P[r * W + j] = x;
        s = fmaf(x, x, s);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    const float n = sqrtf(s), sc = n > eps ? 1.f / n : 0.f;
    if (lane == 0) nrm[r] = n;
    for (int j = lane; j < W; j += 32) {
        const float x = has_tdir ? __fsub_rn(a[j], __fmul_rn(al, td[j])) : a[j];
        U[r * W + j] = __fmul_rn(x, sc);
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

// The whole decoder of a problem's rows in one pass (a thread a row; blockIdx.x the problem,
// blockIdx.y a chunk of NT rows): the coefficient row as kakeya_coeffs builds it (in shared
// memory), times the basis (sequential FMAs over the coefficients, 16 outputs at a time, basis
// rows broadcast from shared memory), + mean, written straight to the row's place in the output
// (no [P, N, d] or [P, N, D] temporaries). pooled: row n of problem p is head n / B of block p,
// else problem p is head p / nb of block p % nb. D % 16 == 0; CS, RS: odd strides.
extern "C" __global__ void kakeya_decode(
    const float *__restrict__ vals, const IDXT *__restrict__ idx, const SEGT *__restrict__ seg,
    const float *__restrict__ t, const float *__restrict__ C, const float *__restrict__ alpha,
    const float *__restrict__ tdir, const float *__restrict__ basis, const float *__restrict__ mean,
    float *__restrict__ out, const int N, const int DC, const int D, const int KC, const int kk,
    const int has_tdir, const int pooled, const int B, const int nb, const long long T,
    const int CS, const int RS) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int p = blockIdx.x, tid = threadIdx.x, n = blockIdx.y * NT + tid;
    float *bs = reinterpret_cast<float *>(smem);  // basis [DC][D]
    float *cs = bs + DC * D;                        // centres [KC][CS]
    float *ms = cs + KC * CS;                       // mean [D]
    float *ts = ms + D;                             // t_dir [DC]
    float *c = ts + DC + tid * RS;                  // this row's coefficients
    for (int e = tid; e < DC * D; e += NT) bs[e] = basis[(size_t)p * DC * D + e];
    for (int e = tid; e < KC * DC; e += NT) {
        const int k = e / DC, j = e - k * DC;
        cs[k * CS + j] = C[(size_t)p * KC * DC + e];
    }
    for (int j = tid; j < D; j += NT) ms[j] = mean[(size_t)p * D + j];
    for (int j = tid; j < DC; j += NT) ts[j] = has_tdir ? tdir[(size_t)p * DC + j] : 0.f;
    __syncthreads();
    if (n >= N) return;
    const size_t row = (size_t)p * N + n;
    for (int j = 0; j < DC; ++j) c[j] = 0.f;
    for (int q = 0; q < kk; ++q) c[(int)idx[row * kk + q]] = vals[row * kk + q];
    const float tt = t[row], al = has_tdir ? alpha[row] : 0.f;
    const float *cc = cs + (int)seg[row] * CS;
    for (int j = 0; j < DC; ++j) {
        float a = __fadd_rn(c[j], __fmul_rn(tt, cc[j]));
        if (has_tdir) a = __fadd_rn(a, __fmul_rn(al, ts[j]));
        c[j] = a;
    }
    const long long h = pooled ? n / B : p / nb, b = pooled ? p : p % nb, r = pooled ? n % B : n;
    float *o = out + ((size_t)h * T + (size_t)b * B + r) * D;
    for (int j0 = 0; j0 < D; j0 += 16) {
        float acc[16];
        #pragma unroll
        for (int q = 0; q < 16; ++q) acc[q] = 0.f;
        for (int i = 0; i < DC; ++i) {
            const float ci = c[i];
            const float4 *b4 = reinterpret_cast<const float4 *>(bs + i * D + j0);
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float4 v = b4[q];
                acc[4 * q] = fmaf(ci, v.x, acc[4 * q]);
                acc[4 * q + 1] = fmaf(ci, v.y, acc[4 * q + 1]);
                acc[4 * q + 2] = fmaf(ci, v.z, acc[4 * q + 2]);
                acc[4 * q + 3] = fmaf(ci, v.w, acc[4 * q + 3]);
            }
        }
        #pragma unroll
        for (int q = 0; q < 4; ++q)
            reinterpret_cast<float4 *>(o + j0)[q] =
                make_float4(__fadd_rn(acc[4 * q], ms[j0 + 4 * q]),
                            __fadd_rn(acc[4 * q + 1], ms[j0 + 4 * q + 1]),
                            __fadd_rn(acc[4 * q + 2], ms[j0 + 4 * q + 2]),
                            __fadd_rn(acc[4 * q + 3], ms[j0 + 4 * q + 3]));
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
    off = al(off + n)
    return off + 4 * (n + 1)


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
    return max(_kv1_kmeans_smem(n, dp, _kv1_km(k)), codes) <= SMEM_LIMIT


_KV1_TYPES = {"uint8": "unsigned char", "uint16": "unsigned short", "int64": "long long"}


def _kv1_kernel(cp: ModuleType, name: str, defines: dict, smem: int = 0):
    return compiled(cp, _KV1_SOURCE, name, defines, smem)


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


def _kv1_decode_smem(dc: int, d: int, kc: int) -> int:
    return 4 * (dc * d + kc * (dc | 1) + d + dc + _KV1_THREADS * (dc | 1))


def kv1_decode_ok(xp: ModuleType, dc: int, d: int, kc: int) -> bool:
    """Whether ``kv1_decode`` takes coefficient width ``dc``, head_dim ``d`` and ``kc`` centres
    (CuPy only)."""
    return xp is not np and d % 16 == 0 and _kv1_decode_smem(dc, d, kc) <= SMEM_LIMIT


def kv1_decode(cp: ModuleType, a: dict, out, pooled: bool, B: int, nb: int) -> None:
    """Decode every problem of the arrays ``a`` (``seg``, ``t``, ``centres``, ``basis``,
    ``mean``; ``res_vals``/``res_idx``, ``alpha``/``tdir`` if stored) straight into their rows of
    ``out [n_kv, T, D]`` (see ``kakeya_decode`` in the source)."""
    P, N = (int(s) for s in a["seg"].shape)
    kc, dc = (int(s) for s in a["centres"].shape[1:])
    T, D = (int(s) for s in out.shape[1:])
    if not P * N:
        return
    kk = int(a["res_vals"].shape[2]) if "res_vals" in a else 0
    vals = cp.ascontiguousarray(a["res_vals"]) if kk else cp.zeros(1, cp.float32)
    idx = cp.ascontiguousarray(a["res_idx"]) if kk else cp.zeros(1, cp.uint8)
    seg = cp.ascontiguousarray(a["seg"])
    has_tdir = "tdir" in a
    defines = {"NT": _KV1_THREADS, "KM": 16, "CW": _KV1_CW, "KK": 1}
    defines |= {"SEGT": _KV1_TYPES[seg.dtype.name], "IDXT": _KV1_TYPES[idx.dtype.name]}
    smem = _kv1_decode_smem(dc, D, kc)
    f32 = cp.float32
    args = (
        vals,
        idx,
        seg,
        cp.ascontiguousarray(a["t"], dtype=f32),
        cp.ascontiguousarray(a["centres"], dtype=f32),
        cp.ascontiguousarray(a["alpha"], dtype=f32) if has_tdir else vals,
        cp.ascontiguousarray(a["tdir"], dtype=f32) if has_tdir else vals,
        cp.ascontiguousarray(a["basis"], dtype=f32),
        cp.ascontiguousarray(a["mean"], dtype=f32),
        out,
        np.int32(N),
        np.int32(dc),
        np.int32(D),
        np.int32(kc),
        np.int32(kk),
        np.int32(has_tdir),
        np.int32(pooled),
        np.int32(B),
        np.int32(nb),
        np.int64(T),
        np.int32(dc | 1),
        np.int32(dc | 1),
    )
    grid = (P, -(-N // _KV1_THREADS))
    _kv1_kernel(cp, "kakeya_decode", defines, smem)(grid, (_KV1_THREADS,), args, shared_mem=smem)


def _kv1_simple(cp: ModuleType, name: str):
    defines = {"NT": _KV1_THREADS, "KM": 16, "CW": _KV1_CW, "KK": 1, "SEGT": "int", "IDXT": "int"}
    return _kv1_kernel(cp, name, defines)


def kv1_split(cp: ModuleType, A, tdir, eps: float):
    """``(alpha [P, N] or None, P [P, N, W], ||P|| [P, N], U [P, N, W])`` of ``A [P, N, W]``
    in one pass: ``alpha = A t_dir``, ``P = A - alpha t_dir^T`` (``A`` when ``tdir`` is None),
    the row norms and the unit rows (zero where the norm is <= ``eps``)."""
    A = cp.ascontiguousarray(A, dtype=cp.float32)
    P_, N, W = (int(s) for s in A.shape)
    has_tdir = tdir is not None
    alpha = cp.empty((P_, N), dtype=cp.float32) if has_tdir else None
    Pp, U = cp.empty_like(A), cp.empty_like(A)
    nrm = cp.empty((P_, N), dtype=cp.float32)
    if A.size:
        td = cp.ascontiguousarray(tdir, dtype=cp.float32) if has_tdir else A
        nw = _KV1_THREADS // 32
        args = (A, td, alpha if has_tdir else nrm, Pp, nrm, U, np.int64(P_ * N), np.int32(N))
        args += (np.int32(W), np.int32(has_tdir), np.float32(eps))
        _kv1_simple(cp, "kakeya_split")((-(-P_ * N // nw),), (_KV1_THREADS,), args)
    return alpha, Pp, nrm, U


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
