"""Run one codec over every cached layer of a capture and tabulate exact bytes and errors.

The codec table (deterministic) and the timing table (wall clock) are kept apart so reruns and
cluster runs reproduce the codec table bit for bit. Column contract: docs/tables.md.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.attention import ATTN_COLUMNS, layer_attention_metrics
from kvbench.backend import get_xp, synchronize, to_numpy
from kvbench.codecs.base import BYTE_FIELDS, STREAMS, Codec
from kvbench.codecs.skip import build_codec_for_capture, layer_compressed
from kvbench.metrics import inner_product_error, reconstruction_errors
from kvbench.shards import load_manifest, n_cached_layers, read_shard

log = logging.getLogger(__name__)

KEY_COLUMNS = ["model", "ctx", "codec", "layer", "stream"]


def stream_codec_name(codec: Codec, stream: str) -> str:
    """The codec that actually handles ``stream`` (the part's name for split codecs)."""
    part = getattr(codec, "part", None)
    return part(stream).name if part is not None else codec.name


def compress_stream(codec: Codec, x: np.ndarray, stream: str, layer: int, compress: bool):
    """Encode+decode one layer-stream; return (x_hat on host, bytes, legacy bytes, timing)."""
    xp = codec.xp
    n_kv, t, d = x.shape
    if not compress:
        return x, {"passthrough": 2 * n_kv * t * d}, {}, {"encode_s": 0.0, "decode_s": 0.0}
    x_dev = xp.asarray(x)
    synchronize(xp)
    t0 = time.perf_counter()
    enc = codec.encode(x_dev, stream=stream, layer=layer)
    synchronize(xp)
    t1 = time.perf_counter()
    x_hat = codec.decode(enc)
    synchronize(xp)
    t2 = time.perf_counter()
    nbytes = codec.nbytes(enc)
    bad = set(nbytes) - set(BYTE_FIELDS)
    if bad:
        raise ValueError(f"codec {codec.name!r} reported unknown byte fields {sorted(bad)}")
    timing = {"encode_s": t1 - t0, "decode_s": t2 - t1}
    return to_numpy(x_hat), nbytes, codec.legacy_nbytes(enc), timing


def compress_capture(
    capture_dir: str | Path,
    codec_name: str,
    codecs_cfg: dict[str, dict[str, Any]],
    backend: str = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compress every cached layer of ``capture_dir`` with ``codec_name``.

    Returns the codec table and the timing table (see docs/tables.md).
    """
    manifest = load_manifest(capture_dir)
    xp = get_xp(backend)
    codec = build_codec_for_capture(codec_name, codecs_cfg, n_cached_layers(manifest), xp)
    rows, timings = [], []
    for entry in manifest["layers"]:
        layer, shards = entry["index"], entry["shards"]
        q = read_shard(capture_dir, shards["q"]) if "q" in shards else None
        layer_rows, exact, decoded = [], {}, {}
        for stream in STREAMS:
            x = read_shard(capture_dir, shards[stream])
            compress = layer_compressed(codec, entry, stream)
            x_hat, nbytes, legacy, timing = compress_stream(codec, x, stream, layer, compress)
            exact[stream], decoded[stream] = x, x_hat
            n_kv, tokens, head_dim = x.shape
            total = sum(int(nbytes.get(f, 0)) for f in BYTE_FIELDS)
            row = {
                "model": manifest["model"],
                "ctx": int(manifest["ctx"]),
                "codec": codec_name,
                "family": codec.family,
                "stream_codec": stream_codec_name(codec, stream) if compress else "passthrough",
                "layer": int(layer),
                "layer_type": entry["type"],
                "stream": stream,
                "n_kv": n_kv,
                "tokens": tokens,
                "head_dim": head_dim,
                "compressed": compress,
                "baseline_bytes": 2 * x.size,
                **{f"bytes_{f}": int(nbytes.get(f, 0)) for f in BYTE_FIELDS},
                "bytes_total": total,
                "bits_per_value": 8 * total / x.size,
                **{f"legacy_{k.removeprefix('legacy_')}": float(v) for k, v in legacy.items()},
                **reconstruction_errors(np, x, x_hat),
                "ip_rel_err": (
                    inner_product_error(np, q, x, x_hat)
                    if stream == "k" and q is not None
                    else math.nan
                ),
            }
            layer_rows.append(row)
            timings.append(
                {
                    **{k: row[k] for k in KEY_COLUMNS},
                    **timing,
                    "backend": "gpu" if xp is not np else "cpu",
                }
            )
        if q is not None:
            # Attention error is a property of the layer (K and V together): same on both rows.
            attn = layer_attention_metrics(
                entry, q, exact["k"], exact["v"], decoded["k"], decoded["v"]
            )
            for row in layer_rows:
                row.update({c: attn[c] for c in ATTN_COLUMNS})
        rows += layer_rows
        log.info(
            "layer %02d (%s): K %s B, V %s B",
            layer,
            entry["type"],
            layer_rows[0]["bytes_total"],
            layer_rows[1]["bytes_total"],
        )
    table = pd.DataFrame(rows)
    legacy_cols = sorted(c for c in table.columns if c.startswith("legacy_"))
    fixed = [c for c in table.columns if not c.startswith("legacy_")]
    return table[fixed + legacy_cols], pd.DataFrame(timings)
