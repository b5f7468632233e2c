"""Run the Jacobi eigh kernels of kvbench.codecs.linalg on the CPU: a logic check without a GPU.

The CUDA source is compiled as C++20 with a small shim: one std::thread per CUDA thread,
``__syncthreads`` = a std::barrier over the block, ``__syncwarp`` and the warp shuffles = a
barrier over the 32 threads of the warp, shared memory poisoned before each block. Blocks run one
after another. It checks indexing, barriers and the algorithm, not speed or the GPU's rounding
(g++ is run with ``-ffp-contract=off``; nvcc contracts to FMA). Slow: D=128 takes minutes.

    python tools/gpu_kernel_emu.py --d 64 --mode regs --threads 128 --batch 6
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
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
using std::isnan; using std::max; using std::min;
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
template <class T> inline T __ldg(const T *p) { return *p; }
struct U3 { int x = 0, y = 0, z = 0; };
thread_local U3 threadIdx;
U3 blockIdx;
alignas(16) unsigned char smem_raw[240 * 1024];
std::barrier<> *g_bar;
std::vector<std::unique_ptr<std::barrier<>>> g_wbar;
float g_xbuf[32][32];
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline void __syncwarp() { g_wbar[threadIdx.x >> 5]->arrive_and_wait(); }
inline float shfl_src(float v, int src) {
  int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  g_xbuf[w][l] = v; __syncwarp(); float r = g_xbuf[w][src]; __syncwarp(); return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
  return shfl_src(v, (threadIdx.x & 31) ^ o);
}
inline float __shfl_down_sync(unsigned, float v, int d) {
  int l = threadIdx.x & 31; return shfl_src(v, l + d < 32 ? l + d : l);
}
inline float __shfl_up_sync(unsigned, float v, int d) {
  int l = threadIdx.x & 31; return shfl_src(v, l - d >= 0 ? l - d : l);
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __align__(x)
template <class F> void launch(int gx, int gy, int nt, F f) {
  for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {
    blockIdx.x = bx; blockIdx.y = by;
    memset(smem_raw, 0xAB, sizeof smem_raw);
    std::barrier<> bar(nt); g_bar = &bar;
    g_wbar.clear();
    for (int w = 0; w < nt / 32; ++w) g_wbar.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> ts;
    for (int t = 0; t < nt; ++t) ts.emplace_back([t, &f] { threadIdx.x = t; f(); });
    for (auto &t : ts) t.join();
  }
}
"""

DRIVER = r"""
int main(int argc, char **argv) {
  int B = atoi(argv[1]); float tol2 = atof(argv[2]); int maxs = atoi(argv[3]);
  std::vector<float> a((size_t)B * D * D), w((size_t)B * D, NAN), v((size_t)B * D * D, NAN);
  FILE *f = fopen(argv[4], "rb"); fread(a.data(), 4, a.size(), f); fclose(f);
  std::vector<float2> rot((size_t)B * (maxs > 0 ? maxs : 1) * (D - 1) * (D / 2));
  std::vector<int> meta((size_t)B * (D + 1), -7), sw(B, -1);
  launch(B, 1, NT, [&] {
    jacobi_eigh(a.data(), w.data(), v.data(), rot.data(), meta.data(), sw.data(), tol2, maxs);
  });
#if FUSED == 0
  launch(B, D / ROWS, NTA, [&] { jacobi_apply(rot.data(), meta.data(), v.data(), maxs); });
#endif
  f = fopen(argv[5], "wb"); fwrite(w.data(), 4, w.size(), f); fwrite(v.data(), 4, v.size(), f);
  fwrite(sw.data(), 4, sw.size(), f); fclose(f);
}
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--mode", choices=("smem", "regs", "log"), default="regs")
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--threads", type=int, default=128)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--apply-threads", type=int, default=128)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from kvbench.codecs import linalg as k

    d = args.d
    plan = k.JacobiPlan(args.mode, args.packed, args.threads, args.rows, args.apply_threads)
    k._check_plan(d, plan)
    defs = {"D": d, "NT": args.threads, "PACKED": int(args.packed), "FUSED": k._VMODES[args.mode]}
    if args.mode == "log":
        defs.update({"ROWS": args.rows, "NTA": args.apply_threads})
    src = k._SOURCE.replace("extern __shared__ __align__(16) unsigned char smem_raw[];", "")
    head = "".join(f"#define {n} {v}\n" for n, v in defs.items())
    rng = np.random.default_rng(args.seed)
    nb = args.batch
    a = np.empty((nb, d, d), dtype=np.float32)
    i = np.arange(d)
    for b in range(nb):
        decay = np.exp(-8.0 * i / d) if b % 2 == 0 else (i + 1.0) ** -1.0
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        x = (rng.standard_normal((512, d)) * decay) @ q
        a[b] = x.T @ x / 512
    if nb >= 4:  # identity, diagonal, zero, garbage upper triangle (only the lower one counts)
        a[0], a[1], a[2] = np.eye(d), np.diag(rng.standard_normal(d)), 0.0
        a[3][np.triu_indices(d, 1)] = 123.0
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "k.cpp").write_text(head + SHIM + src + DRIVER)
        cc = ["g++", "-O2", "-std=c++20", "-pthread", "-ffp-contract=off", "-o", str(t / "k")]
        subprocess.run([*cc, str(t / "k.cpp")], check=True)
        a.tofile(t / "a.bin")
        subprocess.run(
            [str(t / "k"), str(nb), "1e-12", "20", str(t / "a.bin"), str(t / "o.bin")], check=True
        )
        raw = np.fromfile(t / "o.bin", dtype=np.float32)
    w = raw[: nb * d].reshape(nb, d).astype(np.float64)
    v = raw[nb * d : nb * d + nb * d * d].reshape(nb, d, d).astype(np.float64)
    sweeps = raw[nb * d + nb * d * d :].view(np.int32)
    sym = (np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)).astype(np.float64)
    ok = True
    for b in range(nb):
        w_ref = np.linalg.eigh(sym[b])[0]
        scale = max(np.abs(w_ref).max(), 1e-30)
        werr = np.abs(w[b] - w_ref).max() / scale
        rec = np.linalg.norm(v[b] @ np.diag(w[b]) @ v[b].T - sym[b]) / max(
            np.linalg.norm(sym[b]), 1e-30
        )
        orth = np.linalg.norm(v[b].T @ v[b] - np.eye(d))
        good = (
            (np.isfinite(w[b]).all() and np.isfinite(v[b]).all() and werr < 1e-4 and rec < 1e-5)
            and orth < 1e-4
            and bool(np.all(np.diff(w[b]) >= 0))
        )
        ok &= good
        print(
            f"{b}: sweeps {sweeps[b]} werr {werr:.1e} rec {rec:.1e} orthF {orth:.1e} "
            f"{'ok' if good else 'BAD'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
