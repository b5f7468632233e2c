"""Throughput benchmark: encode+decode MB/s of bf16 input for every configured codec.

    python -m kvbench.bench --capture results/kv/smollm2-135m/ctx8192            # CPU
    python -m kvbench.bench --device gpu --capture ... --tile-gib 2             # GPU + CPU ratio

Input is real captured KV: the K and V streams of the capture's first full-attention layer,
concatenated along the token axis, so that every block (and every head-pooled KV1 problem) is one
real layer-stream's block with the model's own KV-head count; on GPU the capture's full layers are
concatenated the same way and repeated until the input reaches ``--tile-gib`` GiB of bf16. The CPU
path (NumPy) runs on the first layer's K and V only (``--cpu-repeat`` timed runs); each codec's
failure is reported in its row and the run goes on. Results go to stdout (and ``--json``);
record them in BENCHMARKS.md with the machine named. This is a benchmark, not a test: nothing
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import yaml

from kvbench.backend import get_xp, synchronize
from kvbench.codecs.base import STREAMS, build_codec
from kvbench.shards import load_manifest, read_shard


def load_full_layers(capture_dir: Path, max_layers: int | None) -> list[np.ndarray]:
    """K and V streams of the first ``max_layers`` full-attention layers, as float32 host arrays."""
    manifest = load_manifest(capture_dir)
    full = [e for e in manifest["layers"] if e["type"] == "full"][:max_layers]
    return [read_shard(capture_dir, e["shards"][s]) for e in full for s in STREAMS]


def stack_input(streams: list[np.ndarray], min_bytes: int) -> np.ndarray:
    """Concatenate same-shaped ``[n_kv, T, D]`` streams along tokens, repeating them until
    >= ``min_bytes`` of bf16.

    Along tokens rather than heads: a block of T rows never straddles two streams (T is a
    multiple of the block size in every capture), and head-pooled codecs keep the model's KV-head
    count per problem instead of pooling thousands of tiled heads into one giant problem.
    """
    shape = (streams[0].shape[0], streams[0].shape[2])
    usable = [s for s in streams if (s.shape[0], s.shape[2]) == shape]
    x = np.concatenate(usable, axis=1)
    reps = max(1, -(-min_bytes // (2 * x.size)))
    return np.concatenate([x] * reps, axis=1) if reps > 1 else x


def time_codec(codec, x, repeat: int) -> dict:
    """Seconds per ``x`` of encode+decode, the mean of its K and V code paths (a cache holds as
    much of each), median over ``repeat`` repetitions; likewise encode and decode alone (a sync
    between them) and each stream's encode+decode."""
    xp = codec.xp
    xd = xp.asarray(x)
    # warm-up at full size, both streams: a warm-up on a slice left first-use kernel compilation
    # in the timed runs on a fresh machine (identity: 7.6 GB/s there, 420 GB/s once CuPy's
    # kernel cache was warm)
    for stream in STREAMS:
        codec.decode(codec.encode(xd, stream=stream))
    runs = []
    for _ in range(repeat):
        run = {}
        for stream in STREAMS:
            synchronize(xp)
            t0 = time.perf_counter()
            enc = codec.encode(xd, stream=stream)
            synchronize(xp)
            t1 = time.perf_counter()
            codec.decode(enc)
            synchronize(xp)
            t2 = time.perf_counter()
            del enc
            run[stream] = (t1 - t0, t2 - t1)
        runs.append(run)

    def median(f) -> float:
        return statistics.median(f(r) for r in runs)

    return {
        "s": median(lambda r: sum(map(sum, r.values())) / len(STREAMS)),
        "enc_s": median(lambda r: sum(e for e, _ in r.values()) / len(STREAMS)),
        "dec_s": median(lambda r: sum(d for _, d in r.values()) / len(STREAMS)),
        **{f"{st}_s": median(lambda r, st=st: sum(r[st])) for st in STREAMS},
    }


def _free(xp) -> None:
    if xp is not np:
        synchronize(xp)
        xp.get_default_memory_pool().free_all_blocks()


def run(args) -> list[dict]:
    cfg = yaml.safe_load(Path(args.config).read_text())
    codecs = args.codecs or list(cfg["codecs"])
    streams = load_full_layers(Path(args.capture), args.layers)
    cpu_x = stack_input(streams[:2], 0)
    dev_x = stack_input(streams, int(args.tile_gib * 2**30)) if args.device == "gpu" else None
    xp = get_xp("gpu") if args.device == "gpu" else np
    dev_xd = xp.asarray(dev_x) if dev_x is not None else None
    rows = []
    for name in codecs:
        row = {"codec": name, "cpu_mb_s": None, "gpu_gb_s": None}
        if args.device == "gpu":
            row |= {"gpu_shape": list(dev_x.shape), "gpu_input_gib": 2 * dev_x.size / 2**30}
            try:
                t = time_codec(build_codec(name, cfg["codecs"], xp), dev_xd, args.repeat)
                row |= {
                    "gpu_gb_s": 2 * dev_x.size / t["s"] / 1e9,
                    "gpu_enc_gb_s": 2 * dev_x.size / t["enc_s"] / 1e9,
                    "gpu_dec_gb_s": 2 * dev_x.size / t["dec_s"] / 1e9,
                    "gpu_s": t["s"],
                    "gpu_k_s": t["k_s"],
                    "gpu_v_s": t["v_s"],
                }
            except Exception as e:  # report and go on: one failing codec must not hide the rest
                row["gpu_error"] = f"{type(e).__name__}: {e}"[:500]
            _free(xp)
        if not args.skip_cpu:
            try:
                t = time_codec(build_codec(name, cfg["codecs"], np), cpu_x, args.cpu_repeat)
                row |= {"cpu_mb_s": 2 * cpu_x.size / t["s"] / 1e6, "cpu_shape": list(cpu_x.shape)}
            except Exception as e:
                row["cpu_error"] = f"{type(e).__name__}: {e}"[:500]
        if row["cpu_mb_s"] and row["gpu_gb_s"]:
            row["gpu_over_cpu"] = row["gpu_gb_s"] * 1e3 / row["cpu_mb_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--capture", default="results/kv/smollm2-135m/ctx8192")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--codecs", nargs="*", help="codec names (default: every configured codec)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--tile-gib", type=float, default=2.0, help="GPU input size (GiB of bf16)")
    ap.add_argument("--layers", type=int, default=None, help="use only the first N full layers")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs on the --device")
    ap.add_argument("--cpu-repeat", type=int, default=1, help="timed runs of the CPU path")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU only (no CPU ratio)")
    ap.add_argument("--json", help="write the result rows here")
    args = ap.parse_args(argv)
    rows = run(args)
    header = f"\n{'codec':<20} {'CPU MB/s':>10} {'GPU GB/s':>10} {'GPU/CPU':>8}"
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(header + f"   ({host}, capture {args.capture})")
    for r in rows:
        cpu = f"{r['cpu_mb_s']:.1f}" if r["cpu_mb_s"] else "-"
        gpu = f"{r['gpu_gb_s']:.2f}" if r["gpu_gb_s"] else "-"
        ratio = f"{r['gpu_over_cpu']:.0f}x" if r.get("gpu_over_cpu") else "-"
        print(f"{r['codec']:<20} {cpu:>10} {gpu:>10} {ratio:>8}")
    if args.json:
        meta = {"capture": args.capture, "tile_gib": args.tile_gib, "cpu": host}
        if args.device == "gpu":
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            meta["gpu"] = name.decode() if isinstance(name, bytes) else name
            meta["cupy"] = cupy.__version__
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
