"""Run ``kakeya_kmeans`` (kvbench.codecs.gpu.kakeya_kv1) on the CPU: a logic check without a GPU.

The approach of tools/gpu_kernel_emu.py: the CUDA source is compiled as C++20 with a shim, one
std::thread per CUDA thread, ``__syncthreads`` a std::barrier over the block, warp operations a
barrier over the warp's 32 threads, shared memory poisoned per block, blocks one after another.
It runs on KV-like head-pooled problems (or rows drawn from a few 2-d directions: empty clusters,
cycles) and is compared with NumPy's ``spherical_kmeans``: assignments, iteration counts and
centres. It checks indexing, barriers and the algorithm, not speed or the GPU's rounding (g++
with ``-ffp-contract=off``; on exact-duplicate rows float ties can differ from NumPy).

    python tools/kv1_kernel_emu.py --problems 3 --rows 256 --d 64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SHIM = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
using std::max; using std::min;
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
struct U3 { int x = 0, y = 0, z = 0; };
thread_local U3 threadIdx, blockIdx;
const U3 blockDim{NT, 1, 1};
thread_local unsigned char *t_smem;
thread_local int t_cta;
#define smem t_smem
constexpr int SMEM_BYTES = 232 * 1024;
struct Cta {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> wbar;
  std::vector<int> flags;
  std::vector<long long> xbuf;
  std::vector<unsigned char> mem;
};
std::vector<Cta> g_cta;
inline Cta &cta() { return g_cta[t_cta]; }
inline void __syncthreads() { cta().bar->arrive_and_wait(); }
inline void __syncwarp() { cta().wbar[threadIdx.x >> 5]->arrive_and_wait(); }
inline int sync_reduce(int v, bool all) {
  cta().flags[threadIdx.x] = v; __syncthreads();
  int r = all ? 1 : 0;
  for (int f : cta().flags) r = all ? (r && f) : (r || f);
  __syncthreads(); return r;
}
inline int __syncthreads_or(int v) { return sync_reduce(v != 0, false); }
inline int __syncthreads_and(int v) { return sync_reduce(v != 0, true); }
template <class T> T shfl_src(T v, int src) {
  long long *b = cta().xbuf.data() + (threadIdx.x >> 5) * 32;
  long long s = 0; memcpy(&s, &v, sizeof v); b[threadIdx.x & 31] = s; __syncwarp();
  T r; memcpy(&r, &b[src], sizeof r); __syncwarp(); return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) {
  return shfl_src(v, (threadIdx.x & 31) ^ o);
}
template <class T> T __shfl_sync(unsigned, T v, int l) { return shfl_src(v, l); }
inline unsigned __match_any_sync(unsigned, int v) {
  long long *b = cta().xbuf.data() + (threadIdx.x >> 5) * 32;
  b[threadIdx.x & 31] = v; __syncwarp();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) if (b[l] == v) m |= 1u << l;
  __syncwarp(); return m;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(x)
template <class F> void launch(int blocks, F f) {
  g_cta.resize(1);
  for (int c = 0; c < blocks; ++c) {
    auto &k = g_cta[0];
    k.bar.reset(new std::barrier<>(NT));
    k.wbar.clear();
    for (int w = 0; w < NT / 32; ++w) k.wbar.emplace_back(new std::barrier<>(32));
    k.flags.assign(NT, 0); k.xbuf.assign(NT, 0); k.mem.assign(SMEM_BYTES, 0xAB);
    std::vector<std::thread> ts;
    for (int t = 0; t < NT; ++t)
      ts.emplace_back([t, c, &f] {
        t_cta = 0; threadIdx.x = t; blockIdx.x = c; t_smem = g_cta[0].mem.data(); f();
      });
    for (auto &t : ts) t.join();
  }
}
"""

DRIVER = r"""
template <class T> std::vector<T> readf(const char *p, size_t n) {
  std::vector<T> v(n); FILE *f = fopen(p, "rb"); fread(v.data(), sizeof(T), n, f); fclose(f);
  return v;
}
int main(int argc, char **argv) {
  const int P = atoi(argv[1]), N = atoi(argv[2]), DP = atoi(argv[3]), TS = atoi(argv[4]);
  const int KC = atoi(argv[5]), max_iter = atoi(argv[6]);
  const std::string d = argv[7];
  auto U = readf<float>((d + "/U").c_str(), (size_t)P * N * DP);
  auto valid = readf<unsigned char>((d + "/valid").c_str(), (size_t)P * N);
  auto ka = readf<int>((d + "/kact").c_str(), P);
  auto dpp = readf<int>((d + "/dpp").c_str(), P);
  std::vector<int> ids(P), a((size_t)P * N, -7), it(P, -7);
  for (int p = 0; p < P; ++p) ids[p] = p;
  std::vector<float> C((size_t)P * KC * DP, NAN);
  launch(P, [&] {
    kakeya_kmeans(U.data(), valid.data(), ids.data(), ka.data(), dpp.data(), C.data(), a.data(),
                  it.data(), N, DP, TS, KC, max_iter);
  });
  FILE *f = fopen((d + "/out").c_str(), "wb");
  fwrite(C.data(), 4, C.size(), f); fwrite(a.data(), 4, a.size(), f);
  fwrite(it.data(), 4, it.size(), f); fclose(f);
}
"""


def run_kmeans(U, valid, k_act, d_eff, max_iter: int):
    """``kv1_kmeans``'s kernel on the CPU: ``(centres, assign, iters)``."""
    from kvbench.codecs.gpu import kakeya_kv1 as k

    P, N, d = U.shape
    DP = -(-d // 4) * 4
    Ud = np.zeros((P, N, DP), dtype=np.float32)
    Ud[:, :, :d] = U
    km = k._kv1_km(int(k_act.max()))
    assert k._kv1_kmeans_smem(N, DP, km) <= 232 * 1024
    defs = {"NT": k._KV1_THREADS, "KM": km, "CW": k._KV1_CW, "KK": 1, "SEGT": "int", "IDXT": "int"}
    head = "".join(f"#define {n} {v}\n" for n, v in defs.items())
    body = k._KV1_SOURCE.replace("extern __shared__ __align__(16) unsigned char smem[];", "")
    dpp = np.minimum(-(-d_eff // 4) * 4, DP).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "k.cpp").write_text(head + SHIM + body + DRIVER)
        cc = ["g++", "-O2", "-std=c++20", "-pthread", "-ffp-contract=off", "-o", str(t / "k")]
        subprocess.run([*cc, str(t / "k.cpp")], check=True)
        Ud.tofile(t / "U")
        valid.astype(np.uint8).tofile(t / "valid")
        k_act.astype(np.int32).tofile(t / "kact")
        dpp.tofile(t / "dpp")
        KC = int(k_act.max())
        ts = k._kv1_tile_stride(DP)
        args = [str(P), str(N), str(DP), str(ts), str(KC), str(max_iter), str(t)]
        subprocess.run([str(t / "k"), *args], check=True)
        raw = np.fromfile(t / "out", dtype=np.float32)
    C = raw[: P * KC * DP].reshape(P, KC, DP)
    a = raw[P * KC * DP : P * KC * DP + P * N].view(np.int32).reshape(P, N)
    it = raw[P * KC * DP + P * N :].view(np.int32)
    return C, a, it


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--rows", type=int, default=384, help="rows per problem (3 heads pooled)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--spread", type=float, default=0.0, help="spectrum decay (0: d / 3)")
    ap.add_argument(
        "--distinct",
        type=int,
        default=0,
        help="rows drawn from this many 2-d directions (empty clusters, cycles)",
    )
    ap.add_argument("--noise", type=float, default=0.0, help="noise on --distinct directions")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]
    from synthetic import ar1_kv, kv1_directions

    from kvbench.codecs.kakeya import spherical_kmeans

    rng = np.random.default_rng(args.seed)
    B = args.rows // 3  # three KV heads pooled into a problem
    x = ar1_kv(rng, 3, args.problems * B + 256, args.d, args.spread or None)
    U, valid, k_act, d_eff = kv1_directions(x, B, invalid_lead=args.rows // 3)
    if args.distinct:
        ang = rng.uniform(0, 2 * np.pi, (U.shape[0], args.distinct))
        pick = rng.integers(args.distinct, size=U.shape[:2])
        a = np.take_along_axis(ang, pick, axis=1)
        U = np.stack([np.cos(a), np.sin(a)], axis=2).astype(np.float32)
        U += rng.normal(0, args.noise, U.shape).astype(np.float32)
        U /= np.linalg.norm(U, axis=2, keepdims=True)
        U[~valid] = 0.0
        d_eff = np.full(U.shape[0], 2)
    P, N, d = U.shape
    C_np, a_np, it_np = spherical_kmeans(np, U, valid, k_act, args.max_iter)
    print(f"P={P} N={N} d={d} d_eff={list(d_eff)} iters={list(it_np)}")
    C, a, it = run_kmeans(U, valid, k_act, d_eff, args.max_iter)
    agree = (a == a_np).mean()
    same = (a == a_np).all(axis=1)
    cerr = np.abs(C[same, :, :d] - C_np[same]).max() if same.any() else 0.0
    ok = agree >= 0.999 and (it == it_np).mean() >= 0.66 and cerr < 1e-5
    ok &= bool(np.all(C[:, :, d:] == 0))
    print(
        f"kernel: assign agree {agree:.5f}, iters {list(it)}, centre err {cerr:.1e} "
        f"{'ok' if ok else 'BAD'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
