"""Synthetic captures that follow the manifest contract, for tests that need no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvbench.shards import BF16_STORAGE, MANIFEST_FORMAT, float_to_bf16_bits, write_shard


def make_capture(
    out: Path,
    layers: list[tuple[str, int, int, int]],
    n_heads: int = 4,
    n_q: int = 8,
    model: str = "synthetic",
    ctx: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a capture of correlated data; ``layers = [(type, n_kv, tokens, head_dim), ...]``."""
    rng = np.random.default_rng(seed)
    entries = []
    for i, (kind, n_kv, tokens, d) in enumerate(layers):
        shards = {}
        mix = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
        for stream, shape in (
            ("k", (n_kv, tokens, d)),
            ("v", (n_kv, tokens, d)),
            ("q", (n_heads, n_q, d)),
        ):
            x = rng.standard_normal(shape).astype(np.float32) @ mix
            x[..., 0] += 3.0  # a dominant direction, as real keys have
            name = f"L{i:02d}.{stream}.npy"
            digest = write_shard(out / name, float_to_bf16_bits(x))
            shards[stream] = {"file": name, "shape": list(shape), "sha256": digest}
        entries.append(
            {
                "index": i,
                "type": kind,
                "n_kv": n_kv,
                "n_heads": n_heads,
                "tokens": tokens,
                "token_start": ctx - tokens,
                "q_positions": sorted(
                    int(p) for p in rng.choice(tokens, n_q, replace=False) + ctx - tokens
                ),
                "head_dim": d,
                "sliding_window": tokens + 1 if kind == "sliding" else None,
                "shards": shards,
            }
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "storage": BF16_STORAGE,
        "model": model,
        "ctx": ctx,
        "layers": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
