"""kakeyaturbo: spherical K-means + residual code of whole blocks, and their decode (CuPy only).

The CuPy array path ran K-means as dozens of batched launches per iteration over [B, n, K]
temporaries, with host syncs to drop converged blocks, and decoded through [B, n, N] GEMM
temporaries. ``kt_encode``: one thread block per block of n <= 512 rows, thread i owns row i
(its direction in registers, a copy in shared memory for the centre sums); centre 0, the
farthest-first init, every Lloyd iteration (each block stops at its own first unchanged
iteration, with no host involvement), the f16 rounding of the centres, assign-and-project, the
residual, its in-register FWHT, the Lloyd-Max index and the LSB-first packing all happen in one
launch. Centre sums run over fixed row groups in a fixed order (deterministic, no atomics).
``kt_decode``: one thread block per block, D/32 threads per row: unpack, centroid * norm,
FWHT, the t*centre add and the unprojection (basis in shared memory), written straight into
the output. ``kt_gram``: per run of rows, mean and centred Gram matrix without a centred copy
(the PCA covariance); ``kt_d_eff``: the variance rule on the device (P ints to the host, not
P x D eigenvalues). Same algorithm as the NumPy path; only float32 summation orders differ.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from kvbench.codecs.gpu.compile import SMEM_LIMIT, compiled, device_array

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
    return _kt_encode_smem(dp4, k, rows, 1 << (d_pad - 1).bit_length(), bits) <= SMEM_LIMIT


def kt_decode_ok(xp: ModuleType, d_pad: int, k: int, d: int, bits: int) -> bool:
    """Whether :func:`kt_decode_blocks` takes ``D = d`` (16, or a multiple of 32 up to 4096)."""
    if xp is np or not (1 <= d_pad <= KT_MAX_DP and 1 <= k <= KT_MAX_K):
        return False
    if d != 16 and (d % 32 or not 32 <= d <= 4096):
        return False
    dp4 = kt_pad(d_pad)
    return _kt_decode_smem(dp4, k, d, 1 << (d_pad - 1).bit_length(), bits) <= SMEM_LIMIT


def _kt_kernel(cp: ModuleType, name: str, defines: dict[str, int], smem: int):
    return compiled(cp, _KT_SOURCE, name, defines, smem)


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
    if not (ok and 1 <= k <= KT_MAX_K and n <= KT_MAX_ROWS and smem <= SMEM_LIMIT):
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
            device_array(cp, coef, cp.float32),
            device_array(cp, first_tab, cp.int32),
            device_array(cp, d_eff, cp.int32),
            device_array(cp, signs, cp.float32),
            device_array(cp, mids, cp.float32),
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
    if out.shape != (nb * n, d) or device_array(cp, out, cp.float32) is not out:
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
    t16 = device_array(cp, t, cp.float16)
    kern = _kt_kernel(cp, "kt_decode", defines, smem)
    args = (
        device_array(cp, packed, cp.uint8),
        t16,
        t16 if norm is None else device_array(cp, norm, cp.float16),
        t16 if seg_packed is None else device_array(cp, seg_packed, cp.uint8),
        device_array(cp, centres, skel),
        device_array(cp, basis, skel),
        device_array(cp, mean, skel),
        device_array(cp, d_eff, cp.int32),
        device_array(cp, signs, cp.float32),
        device_array(cp, table, cp.float32),
        out,
        np.int32(n),
        np.int32(dp),
        np.int32(seg_bits),
        np.int32(0 if seg_packed is None else seg_packed.shape[-1]),
        np.int32(basis.shape[0] == 1),
        np.int32(norm is not None),
    )
    kern((nb,), (defines["DT"],), args, shared_mem=smem)


def kt_gram_ok(xp: ModuleType, d: int) -> bool:
    """Whether :func:`kt_block_gram` takes rows of ``D = d`` (a multiple of 16 up to 128)."""
    return xp is not np and d % 16 == 0 and 16 <= d <= 128


def kt_block_gram(cp: ModuleType, x, rows_per_block: int):
    """Column mean ``[G, D]`` and centred Gram matrix ``(x - mean)^T (x - mean)`` ``[G, D, D]`` of
    every run of ``rows_per_block`` consecutive rows of ``x [N, D]`` float32 (the last run may be
    shorter; ``G = ceil(N / rows_per_block)``), in one pass per run without a centred copy."""
    x = device_array(cp, x, cp.float32)
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


def kt_d_eff(cp: ModuleType, w, variance_ratio: float):
    """``d_eff [P]`` (int32, on the device) of ascending eigenvalues ``w [P, D]``: the variance
    rule of ``kakeyaturbo._d_eff_from_eigvals`` with the same float32 operations, so only ``P``
    ints, not the eigenvalues, go to the host."""
    w = device_array(cp, w, cp.float32)
    p, d = int(w.shape[0]), int(w.shape[1])
    out = cp.empty(p, dtype=cp.int32)
    if p:
        ratio = np.float32(min(max(float(variance_ratio), 0.0), 1.0))
        kern = _kt_kernel(cp, "kt_d_eff", {"KT_DEFF": 1, "D": d}, 0)
        kern((-(-p // 256),), (256,), (w, out, np.int64(p), ratio))
    return out
