"""Copy the first N full-attention layers of a KV capture into a small, self-contained capture.

    python tools/make_bench_capture.py results/kv/smollm2-135m/ctx8192 .benchcap/smollm2 --layers 4
    python tools/make_bench_capture.py results/kv/gemma3-270m/ctx8192 .benchcap/gemma --layers 2

The GPU benchmark (``python -m kvbench.bench --device gpu --capture DST``) reads only the
full-attention layers of a capture and tiles them up to ``--tile-gib``; a few real layers are
enough input, and small enough to travel to a machine that has no captures (results/ is
git-ignored). Shard files are copied byte for byte, so every sha256 of the manifest still holds;
the manifest keeps all its fields, with ``layers`` cut to the copied layers and a
``subset_of`` note naming the source and the layer indices kept. Sliding-window layers are not
copied. Nothing is written when DST already holds a manifest, unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kvbench.shards import load_manifest, sha256_file  # noqa: E402


def make_subset(src: Path, dst: Path, layers: int, force: bool = False) -> dict:
    """Copy the first ``layers`` full-attention layers of capture ``src`` to ``dst``."""
    if layers < 1:
        raise SystemExit("--layers must be >= 1")
    manifest = load_manifest(src)
    full = [e for e in manifest["layers"] if e.get("type") == "full"][:layers]
    if not full:
        raise SystemExit(f"{src}: the capture has no full-attention layer")
    if (dst / "manifest.json").exists() and not force:
        raise SystemExit(f"{dst}: already holds a capture (use --force to replace it)")
    dst.mkdir(parents=True, exist_ok=True)
    for entry in full:
        for shard in entry["shards"].values():
            out = dst / shard["file"]
            shutil.copyfile(src / shard["file"], out)
            if sha256_file(out) != shard["sha256"]:
                raise SystemExit(f"{out}: sha256 differs from the manifest after the copy")
    sub = dict(manifest)
    sub["layers"] = full
    sub["subset_of"] = {"capture": str(src), "layer_indices": [int(e["index"]) for e in full]}
    (dst / "manifest.json").write_text(json.dumps(sub, indent=1))
    return sub


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", type=Path, help="capture directory (holds manifest.json)")
    ap.add_argument("dst", type=Path, help="output directory")
    ap.add_argument("--layers", type=int, default=2, help="full-attention layers to copy")
    ap.add_argument("--force", action="store_true", help="replace an existing capture in dst")
    args = ap.parse_args(argv)
    sub = make_subset(args.src, args.dst, args.layers, args.force)
    size = sum(f.stat().st_size for f in args.dst.iterdir() if f.is_file())
    idx = sub["subset_of"]["layer_indices"]
    print(f"{args.dst}: layers {idx} of {args.src}, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
