"""Where a codec's GPU time goes: wall time vs summed kernel time, and the host-side hot spots.

    PYTHONPATH=src python tools/gpu_codec_prof.py --capture .benchcap/smollm2 --codecs kakeya_v1
    ncu --metrics gpu__time_duration.sum --print-summary per-kernel --csv \\
        python tools/gpu_codec_prof.py --capture .benchcap/smollm2 --codecs kakeya_v1 --once

Without ``--once`` it prints, per codec, the median wall time of encode+decode on the real capture
(full layers concatenated along tokens, tiled to ``--tile-gib``) and the top host functions by own
time (cProfile): time spent blocked in device-to-host copies and syncs shows up there. With
``--once`` under ncu, summed kernel time far below the wall time means the codec is launch/sync
bound, not compute or bandwidth bound.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import yaml

from kvbench.backend import get_xp, synchronize
from kvbench.bench import load_full_layers, stack_input
from kvbench.codecs.base import STREAMS, build_codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--capture", required=True)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--codecs", nargs="+", required=True)
    ap.add_argument("--once", action="store_true", help="one encode+decode per stream (for ncu)")
    ap.add_argument("--tile-gib", type=float, default=0.5, help="input size (GiB of bf16)")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    xp = get_xp("gpu")
    x = xp.asarray(
        stack_input(load_full_layers(Path(args.capture), None), int(args.tile_gib * 2**30))
    )
    for name in args.codecs:
        codec = build_codec(name, cfg["codecs"], xp)
        for stream in STREAMS:  # warm-up
            codec.decode(codec.encode(x, stream=stream))
        synchronize(xp)
        if args.once:
            for stream in STREAMS:
                codec.decode(codec.encode(x, stream=stream))
            synchronize(xp)
            continue
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for stream in STREAMS:
                codec.decode(codec.encode(x, stream=stream))
            synchronize(xp)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        prof = cProfile.Profile()
        prof.enable()
        for stream in STREAMS:
            codec.decode(codec.encode(x, stream=stream))
        synchronize(xp)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        gb = 2 * 2 * x.size / 1e9
        print(f"== {name}: input {tuple(x.shape)} x 2 streams, {t * 1e3:.1f} ms, {gb / t:.2f} GB/s")
        print(out.getvalue())


if __name__ == "__main__":
    main()
