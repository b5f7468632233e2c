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


def ar1_kv(rng, n_kv: int, T: int, D: int, spread: float | None = None) -> np.ndarray:
    """KV-like rows ``[n_kv, T, D]``: AR(1) in time, a spectrum decaying as exp(-i / spread) in a
    random basis (default spread D/3: d_eff ~ D/3 at 0.95), per-head offsets and two outlier
    channels."""
    decay = np.exp(-np.arange(D) / (spread or D / 3.0))
    q = np.linalg.qr(rng.standard_normal((D, D)))[0]
    e = rng.standard_normal((n_kv, T, D))
    z = np.empty_like(e)
    z[:, 0] = e[:, 0]
    for i in range(1, T):
        z[:, i] = 0.8 * z[:, i - 1] + 0.6 * e[:, i]
    x = (z * decay) @ q + 0.3 * rng.standard_normal((n_kv, 1, D))
    x[..., :2] *= 6.0
    return x.astype(np.float32)


def kv1_directions(x: np.ndarray, B: int, invalid_lead: int = 0):
    """K-means input of the kakeya_v1 preset (pooled heads, legacy t_dir) as encode builds it:
    ``(U, valid, k_act, d_eff)``; ``invalid_lead`` rows of the first problem are marked invalid
    (a problem that starts with rows without a direction)."""
    from kvbench.codecs import kakeya

    nb = kakeya.n_compressed_blocks(x.shape[1], B, 256)
    X = kakeya.problem_rows(np, kakeya.block_view(x, nb, B), 0, nb, True)
    Xc = X - X.mean(axis=1)[:, None, :]
    basis, d_eff = kakeya.fit_pca(np, Xc, 0.95)
    A = np.matmul(Xc, basis.transpose(0, 2, 1))
    tdir = kakeya.temporal_direction(np, A, "legacy_noise")
    _, Pp = kakeya.split_temporal(np, A, tdir, "legacy_noise", False)
    nrm = kakeya._row_norms(np, Pp)
    valid = nrm > kakeya.EPS
    valid[0, :invalid_lead] = False
    U = Pp * np.where(valid, 1.0 / np.where(valid, nrm, 1.0), 0.0)[:, :, None]
    return U.astype(np.float32), valid, np.minimum(16, valid.sum(axis=1)), d_eff
