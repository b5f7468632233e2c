"""Check and time ``kvbench.codecs.linalg.batched_eigh`` variants against ``cupy.linalg.eigh``.

Run on a CUDA machine from the repository root::

    PYTHONUNBUFFERED=1 python tools/gpu_eigh_bench.py --out results_dir [--quick]

For every D it draws fresh covariance-like SPD matrices (``X = randn(512, D) @ diag(decay) @ Q``,
``a = X^T X / 512``, exponential and power-law decay), poisons the outputs, runs each variant,
checks eigenvalues against NumPy float64 ``eigh`` on a subset, reconstruction and orthonormality
on a larger subset, then times it with CUDA events (median of repeats). Throughput is GB/s of
bf16-equivalent input: ``B * 512 * D * 2`` bytes (the [512, D] bf16 blocks whose covariance is
decomposed) per second. Also measures the two ceilings (device copy, FP32 GEMM) and the batched
covariance. Prints a table last and writes ``eigh_bench.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kvbench.codecs import linalg as K  # noqa: E402  (after the path insert)

N_ROWS = 512  # rows of the [512, D] blocks whose covariance is decomposed


def make_spd(cp, nb: int, d: int, seed: int):
    """``nb`` covariance-like SPD float32 matrices [nb, d, d] on the device."""
    rs = cp.random.RandomState(seed)
    rng = np.random.default_rng(seed)
    i = np.arange(d)
    decays = [np.exp(-8.0 * i / d), (i + 1.0) ** -1.0, np.exp(-3.0 * i / d), (i + 1.0) ** -2.0]
    qs = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(4)]
    mats = cp.empty((nb, d, d), dtype=cp.float32)
    chunk = max(1, (1 << 28) // (N_ROWS * d * 4))
    for s in range(0, nb, chunk):
        n = min(chunk, nb - s)
        x = rs.standard_normal((n, N_ROWS, d), dtype=cp.float32)
        for j in range(4):
            sel = slice(j, n, 4)
            m = cp.asarray((decays[j][:, None] * qs[j]).astype(np.float32))
            x[sel] = x[sel] @ m
        mats[s : s + n] = cp.matmul(x.transpose(0, 2, 1), x) / np.float32(N_ROWS)
    return mats


def check(cp, a, w, v, n_ref: int = 16, n_rec: int = 256) -> dict:
    """Accuracy of (w, v) for a [B, D, D]; relative to numpy float64 on a subset."""
    out = {
        "nan_or_poison": int(cp.count_nonzero(~cp.isfinite(w)) + cp.count_nonzero(~cp.isfinite(v)))
    }
    nb, d = a.shape[0], a.shape[-1]
    idx = np.unique(np.linspace(0, nb - 1, min(nb, n_rec)).astype(int))
    a64 = a[idx].astype(cp.float64)
    w64, v64 = w[idx].astype(cp.float64), v[idx].astype(cp.float64)
    rec = cp.matmul(v64 * w64[:, None, :], v64.transpose(0, 2, 1)) - a64
    relrec = cp.linalg.norm(rec.reshape(len(idx), -1), axis=1) / cp.linalg.norm(
        a64.reshape(len(idx), -1), axis=1
    )
    eye = cp.eye(d, dtype=cp.float64)
    orth = cp.matmul(v64.transpose(0, 2, 1), v64) - eye
    orth_f = cp.linalg.norm(orth.reshape(len(idx), -1), axis=1)
    out["rec_max"] = float(relrec.max())
    out["orthF_max"] = float(orth_f.max())
    out["orth_absmax"] = float(cp.abs(orth).max())
    out["sorted"] = bool(cp.all(cp.diff(w, axis=1) >= 0))
    ridx = idx[:n_ref]
    a_h = cp.asnumpy(a[ridx]).astype(np.float64)
    w_ref, v_ref = np.linalg.eigh(a_h)
    w_h = cp.asnumpy(w[ridx]).astype(np.float64)
    out["w_relerr_max"] = float((np.abs(w_h - w_ref).max(axis=1) / np.abs(w_ref).max(axis=1)).max())
    # leading-eigenvector agreement (sign-free): 1 - |<v, v_ref>| for the top 8 components
    v_h = cp.asnumpy(v[ridx]).astype(np.float64)
    dots = np.abs(np.einsum("bik,bik->bk", v_h[:, :, -8:], v_ref[:, :, -8:]))
    out["top8_1mcos_max"] = float((1 - dots).max())
    return out


def time_fn(cp, fn, min_reps=5, max_reps=30, budget_s=1.5) -> dict:
    fn()
    cp.cuda.Device().synchronize()
    times = []
    t_start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - t_start < budget_s
    ):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    times.sort()
    return {
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "max_s": times[-1],
        "reps": len(times),
    }


def ceilings(cp) -> dict:
    out = {}
    n = 1 << 28  # 1 GiB of float32
    x = cp.random.standard_normal(n, dtype=cp.float32)
    y = cp.empty_like(x)
    t = time_fn(cp, lambda: cp.copyto(y, x), min_reps=5, max_reps=10, budget_s=0.5)
    out["copy_GBps"] = 2 * 4 * n / t["median_s"] / 1e9
    m = 8192
    a = cp.random.standard_normal((m, m), dtype=cp.float32)
    b = cp.random.standard_normal((m, m), dtype=cp.float32)
    t = time_fn(cp, lambda: cp.matmul(a, b), min_reps=5, max_reps=10, budget_s=0.5)
    out["sgemm_TFLOPs"] = 2 * m**3 / t["median_s"] / 1e12
    cp.get_default_memory_pool().free_all_blocks()
    return out


def bench_cov(cp, d: int, nb: int) -> dict:
    x = cp.random.standard_normal((nb, N_ROWS, d), dtype=cp.float32)
    res = {}
    bf16_bytes = nb * N_ROWS * d * 2
    ref = None
    for name, fn in (
        ("matmul_nomean", lambda: cp.matmul(x.transpose(0, 2, 1), x)),
        ("batched_covariance", lambda: K.batched_covariance(cp, x, mean=True)),
    ):
        t = time_fn(cp, fn)
        res[name] = {"GBps_bf16eq": bf16_bytes / t["median_s"] / 1e9, **t}
        if name == "batched_covariance":
            ref = fn()
    xs = cp.asnumpy(x[:4]).astype(np.float64)
    xs -= xs.mean(axis=1, keepdims=True)
    c64 = np.einsum("bni,bnj->bij", xs, xs) / N_ROWS
    res["relerr"] = float(np.linalg.norm(cp.asnumpy(ref[:4]) - c64) / np.linalg.norm(c64))
    return res


VARIANTS = {
    64: [
        ("smem", False, 128),
        ("smem", False, 256),
        ("regs", False, 128),
        ("regs", False, 256),
        ("log", True, 256, 16, 128),
    ],
    128: [
        ("smem", False, 512),
        ("smem", False, 1024),
        ("smem", True, 512),
        ("regs", False, 512),
        ("regs", False, 1024),
        ("log", True, 256, 32, 256),
    ],
    256: [("log", True, 1024, 64, 256), ("log", True, 512, 32, 256)],
    512: [],
}
BATCH = {64: 4096, 128: 2048, 256: 512, 512: 128}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dims", default="64,128,256,512")
    ap.add_argument("--quick", action="store_true", help="small batches (smoke test)")
    ap.add_argument("--no-stock", action="store_true", help="skip cupy.linalg.eigh")
    args = ap.parse_args()
    import cupy as cp

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    info = {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "sm_count": props["multiProcessorCount"],
        "smem_optin": props.get("sharedMemPerBlockOptin"),
        "clock_khz": props.get("clockRate"),
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
    }
    print("device", info, flush=True)
    result = {"info": info, "ceilings": ceilings(cp), "eigh": {}, "cov": {}}
    print("ceilings", result["ceilings"], flush=True)
    rows = []
    for d in [int(s) for s in args.dims.split(",")]:
        nb = 64 if args.quick else BATCH[d]
        bf16_bytes = nb * N_ROWS * d * 2
        try:
            result["cov"][d] = bench_cov(cp, d, nb)
            print("cov", d, result["cov"][d], flush=True)
        except Exception:
            traceback.print_exc()
        a = make_spd(cp, nb, d, seed=1000 + d)
        a2 = make_spd(cp, nb, d, seed=2000 + d)  # a fresh draw for a second correctness check
        cp.cuda.Device().synchronize()
        entries = [("cupy.linalg.eigh", None)] if not args.no_stock else []
        entries += [
            (f"{v[0]}{'-packed' if v[1] else ''}-t{v[2]}", K.JacobiPlan(*v)) for v in VARIANTS[d]
        ]
        for name, plan in entries:
            rec = {"D": d, "B": nb, "variant": name}
            try:
                w = cp.full((nb, d), cp.nan, dtype=cp.float32)
                v = cp.full((nb, d, d), cp.nan, dtype=cp.float32)
                if plan is None:

                    def fn(a=a, w=w, v=v):
                        w[...], v[...] = cp.linalg.eigh(a)

                    def tfn(a=a):  # timed without the copies into w, v
                        return cp.linalg.eigh(a)
                else:
                    sweeps = cp.full(nb, -1, dtype=cp.int32)

                    def fn(a=a, w=w, v=v, plan=plan, sweeps=sweeps):
                        K._jacobi_cupy(cp, a, w, v, plan, 1e-6, 20, sweeps)

                    tfn = fn
                fn()
                cp.cuda.Device().synchronize()
                rec.update(check(cp, a, w, v))
                if plan is not None:
                    sw = cp.asnumpy(sweeps)
                    rec["sweeps_min_mean_max"] = [int(sw.min()), float(sw.mean()), int(sw.max())]
                # second draw, poisoned again
                w.fill(cp.nan)
                v.fill(cp.nan)
                if plan is None:
                    w[...], v[...] = cp.linalg.eigh(a2)
                else:
                    K._jacobi_cupy(cp, a2, w, v, plan, 1e-6, 20)
                c2 = check(cp, a2, w, v)
                rec["check2"] = c2
                budget = 1.5 if plan is not None else 3.0
                t = time_fn(cp, tfn, min_reps=3 if d >= 256 else 5, budget_s=budget)
                rec.update(t)
                rec["GBps_bf16eq"] = bf16_bytes / t["median_s"] / 1e9
                rec["us_per_matrix"] = t["median_s"] / nb * 1e6
                if plan is not None:
                    # cost of one sweep: exactly 1 and 3 sweeps (tol = 0)
                    t1, t3 = (
                        time_fn(
                            cp,
                            lambda n=n, a=a, w=w, v=v, p=plan: K._jacobi_cupy(
                                cp, a, w, v, p, 0.0, n
                            ),
                            min_reps=3,
                            max_reps=5,
                            budget_s=0.3,
                        )["median_s"]
                        for n in (1, 3)
                    )
                    rec["sweep_s"] = (t3 - t1) / 2
                    rec["fixed_s"] = t1 - rec["sweep_s"]
            except Exception as e:
                traceback.print_exc()
                rec["error"] = repr(e)[:300]
            print(json.dumps(rec), flush=True)
            rows.append(rec)
            cp.get_default_memory_pool().free_all_blocks()
        del a, a2
        cp.get_default_memory_pool().free_all_blocks()
    result["eigh"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eigh_bench.json").write_text(json.dumps(result, indent=1))
    print("\n== ceilings:", {k: round(v, 1) for k, v in result["ceilings"].items()})
    for d, c in result["cov"].items():
        print(
            f"cov D={d}: matmul {c['matmul_nomean']['GBps_bf16eq']:.0f} GB/s, "
            f"batched_covariance {c['batched_covariance']['GBps_bf16eq']:.0f} GB/s, "
            f"relerr {c['relerr']:.1e}"
        )
    print(
        f"{'D':>4} {'B':>5} {'variant':<24} {'GB/s':>8} {'ms':>9} {'spread':>7} "
        f"{'rec':>8} {'orthF':>8} {'werr':>8} {'top8':>8} {'bad':>4} {'rec2':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['D']:>4} {r['B']:>5} {r['variant']:<24} ERROR {r['error'][:80]}")
            continue
        spread = (r["max_s"] - r["min_s"]) / r["median_s"]
        sw = r.get("sweeps_min_mean_max", [0, 0, 0])
        extra = (
            f" sweeps {sw[0]}/{sw[1]:.1f}/{sw[2]} sweep {r['sweep_s'] * 1e3:.2f} ms"
            if "sweep_s" in r
            else ""
        )
        print(
            f"{r['D']:>4} {r['B']:>5} {r['variant']:<24} {r['GBps_bf16eq']:8.2f} "
            f"{r['median_s'] * 1e3:9.2f} {spread:7.1%} {r['rec_max']:8.1e} {r['orthF_max']:8.1e} "
            f"{r['w_relerr_max']:8.1e} {r['top8_1mcos_max']:8.1e} {r['nan_or_poison']:>4} "
            f"{r['check2']['rec_max']:8.1e}{extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
