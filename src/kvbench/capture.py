"""Capture a model's KV cache (and a sample of post-RoPE queries) once, as checksummed bf16 shards.

Protocol (spec kakeya.md §3.2): the first ``ctx`` tokens of the corpus, batch 1, bf16,
``torch.inference_mode``, one prefill forward (or chunked forwards of ``prefill_chunk`` tokens
reusing one ``DynamicCache``). After the forward every cached layer's keys/values ``[n_kv, T_i,
D_i]`` are written losslessly as bf16 bit patterns. Keys are post-RoPE (and post k-norm where the
model has one), exactly what the HF cache holds.

Queries come from a registered attention function (``transformers.AttentionInterface``) named
``kvbench_capture``: it records ``query`` (post-RoPE) at a fixed-seed sample of absolute positions
for each cached layer and delegates to the stock sdpa function; the same name is registered with the
sdpa mask builder so masks (causal, sliding) are exactly those of ``attn_implementation="sdpa"``. No
model code is patched.

Layer plan (spec §1.8): ``layer_types`` of the text config (fallback: all sliding if
``sliding_window`` or ``attention_chunk_size`` is set, else all full), the last
``num_kv_shared_layers`` are KV-shared (absent from the cache; listed in the manifest). Sliding
layers keep what the HF cache keeps (``sliding_window - 1`` tokens, e.g. Gemma's 511).

``manifest.json`` (format ``kvbench-capture/1``) is written last and atomically; a failed capture
leaves none, so Snakemake reruns it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.shards import (
    BF16_STORAGE,
    MANIFEST_FORMAT,
    atomic_write_text,
    load_manifest,
    read_shard,
    write_shard,
)

log = logging.getLogger(__name__)

CAPTURE_ATTN = "kvbench_capture"
STREAMS = ("k", "v", "q")


# --------------------------------------------------------------------------------------------------
# Layer plan
# --------------------------------------------------------------------------------------------------


def layer_plan(config) -> list[dict[str, Any]]:
    """One entry per decoder layer: ``{index, type, sliding_window}``, type in
    full|sliding|kv_shared.

    ``config`` may be a composite (multimodal) config; its decoder text config is used.
    """
    text = config.get_text_config(decoder=True)
    n = int(text.num_hidden_layers)
    n_shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * n
    if len(types) < n:
        raise KvbenchError(f"config has {len(types)} layer_types for {n} layers")
    plan = []
    for i in range(n):
        if i >= n - n_shared:
            kind = "kv_shared"
        elif types[i] in ("sliding_attention", "chunked_attention") and window:
            kind = "sliding"
        else:
            kind = "full"
        plan.append(
            {"index": i, "type": kind, "sliding_window": window if kind == "sliding" else None}
        )
    return plan


def kept_span(entry: dict[str, Any], ctx: int) -> tuple[int, int]:
    """``(token_start, tokens)`` a layer's cache holds after a ``ctx``-token prefill."""
    # DynamicSlidingWindowLayer keeps the last sliding_window - 1 tokens.
    sliding = entry["type"] == "sliding"
    tokens = min(ctx, int(entry["sliding_window"]) - 1) if sliding else ctx
    return ctx - tokens, tokens


def sample_positions(seed: int, start: int, stop: int, n: int) -> list[int]:
    """``n`` sorted distinct positions in ``[start, stop)``, drawn by ``default_rng(seed)``."""
    n = min(n, stop - start)
    rng = np.random.default_rng(seed)
    return sorted(int(p) for p in rng.choice(np.arange(start, stop), size=n, replace=False))


# --------------------------------------------------------------------------------------------------
# Query recording attention function
# --------------------------------------------------------------------------------------------------


class _QueryRecorder:
    """Collects post-RoPE queries at absolute positions, per layer, across chunked forwards."""

    def __init__(self, positions: dict[int, list[int]]):
        self.positions = {i: np.asarray(p, dtype=np.int64) for i, p in positions.items()}
        self.offset = 0  # absolute position of the first token of the current forward
        self.rows: dict[int, list] = {i: [] for i in positions}
        self.scaling: dict[int, float | None] = {}
        self.calls: dict[int, int] = {i: 0 for i in positions}

    def record(self, module, query, kwargs) -> None:
        idx = getattr(module, "layer_idx", None)
        if idx not in self.positions:
            return
        self.calls[idx] += 1
        q_len = query.shape[2]
        pos = self.positions[idx]
        sel = pos[(pos >= self.offset) & (pos < self.offset + q_len)] - self.offset
        if len(sel):
            import torch

            self.rows[idx].append(query[0][:, torch.as_tensor(sel), :].detach().to("cpu").clone())
        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
        self.scaling[idx] = None if scaling is None else float(scaling)

    def queries(self, idx: int):
        import torch

        rows = self.rows[idx]
        got = sum(r.shape[1] for r in rows)
        if got != len(self.positions[idx]):
            raise KvbenchError(
                f"layer {idx}: recorded {got} of {len(self.positions[idx])} sampled queries "
                f"(attention function called {self.calls[idx]} times); the model did not run "
                f"attention through {CAPTURE_ATTN!r}"
            )
        return torch.cat(rows, dim=1)


_RECORDER: _QueryRecorder | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _RECORDER is not None:
        _RECORDER.record(module, query, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture_attention() -> str:
    """Register ``kvbench_capture`` (attention + its sdpa mask); return the name. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
    # Without a mask function for this name transformers builds *no* mask (not even sliding ones).
    AttentionMaskInterface.register(CAPTURE_ATTN, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return CAPTURE_ATTN


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------


def cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or the older ``past_key_values`` forward argument name."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _bits(t) -> np.ndarray:
    """bf16 torch tensor -> uint16 numpy bit pattern (lossless)."""
    import torch

    if t.dtype != torch.bfloat16:
        raise KvbenchError(
            f"expected a bf16 tensor, got {t.dtype} (capture runs the model in bf16)"
        )
    return t.detach().to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import kvbench

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "kvbench": kvbench.__version__,
    }


def capture_kv(
    model_name: str,
    cfg: dict[str, Any],
    ctx: int,
    model_dir: str | Path | None,
    out_dir: str | Path,
    *,
    model=None,
    tokenizer=None,
    weights: dict[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Capture model ``model_name`` at context ``ctx`` into ``out_dir``; return the manifest.

    ``cfg`` is the validated config (``kvbench.config.load_config``). The model is loaded from
    ``model_dir`` (``resources/models/{model}``) unless an in-memory ``model`` + ``tokenizer`` are
    given (tests); ``weights`` then describes them for the manifest (default ``{"source":
    "in-memory"}``). ``threads`` sets ``torch.set_num_threads``.
    """
    import torch
    from transformers import DynamicCache

    global _RECORDER
    model_cfg = cfg["models"][model_name]
    cap = cfg.get("capture", {})
    if cap.get("dtype", "bfloat16") != "bfloat16":
        raise KvbenchError(f"capture.dtype {cap.get('dtype')!r}: only bfloat16 is supported")
    seed = int(cfg.get("seed", 0))
    n_q = int(cap.get("query_positions", 128))
    chunk = int(model_cfg.get("prefill_chunk", 0) or 0)
    out_dir = Path(out_dir)
    if threads:
        torch.set_num_threads(int(threads))

    # A stale manifest must never describe new shards.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("L*.npy"):
        old.unlink()

    register_capture_attention()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if model is None:
        from kvbench.models import load_model, weights_info

        if model_dir is None:
            raise KvbenchError("capture_kv: give model_dir or an in-memory model")
        weights = weights_info(model_name, model_cfg, model_dir)
        model, tokenizer = load_model(
            model_name,
            model_cfg,
            model_dir,
            attn_implementation=CAPTURE_ATTN,
            allow_download=bool(cap.get("allow_download", False)),
        )
        timings["load_s"] = time.perf_counter() - t0
        log.info("%s: model loaded in %.1f s", model_name, timings["load_s"])
    elif tokenizer is None:
        raise KvbenchError("capture_kv: an in-memory model needs its tokenizer")
    weights = dict(weights or {"source": "in-memory"})
    if (dtype := next(model.parameters()).dtype) != torch.bfloat16:
        raise KvbenchError(f"{model_name}: the model is {dtype}; capture runs it in bf16")
    device = cap.get("device", "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise KvbenchError("capture.device: cuda, but torch sees no CUDA GPU; use device: cpu")
        model.to("cuda")
    prev_attn = model.config._attn_implementation
    if prev_attn != CAPTURE_ATTN:
        model.set_attn_implementation(CAPTURE_ATTN)

    from kvbench.corpus import build_token_ids

    corpus_name = cfg.get("corpus", {}).get("name", "pydoc_topics")
    ids, corpus_info = build_token_ids(corpus_name, tokenizer, ctx)

    text_cfg = model.config.get_text_config(decoder=True)
    plan = layer_plan(model.config)
    cached = [e for e in plan if e["type"] != "kv_shared"]
    positions: dict[int, list[int]] = {}
    spans: dict[int, tuple[int, int]] = {}
    for e in cached:
        start, tokens = kept_span(e, ctx)
        spans[e["index"]] = (start, tokens)
        positions[e["index"]] = sample_positions(seed, start, ctx, n_q)

    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    cache = DynamicCache(config=model.config)
    step = chunk if 0 < chunk < ctx else ctx
    cache_kw = cache_kwarg(model)
    _RECORDER = _QueryRecorder(positions)
    try:
        t1 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, ctx, step):
                _RECORDER.offset = s
                model(
                    input_ids=input_ids[:, s : s + step],
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_kw: cache},
                )
                if step < ctx:
                    log.info("%s: prefill %d/%d tokens", model_name, min(s + step, ctx), ctx)
        timings["prefill_s"] = time.perf_counter() - t1
        log.info(
            "%s: prefill of %d tokens (chunk %s) in %.2f s",
            model_name, ctx, chunk or "none", timings["prefill_s"],
        )  # fmt: skip
        recorder = _RECORDER
    finally:
        _RECORDER = None
        if prev_attn != CAPTURE_ATTN:
            model.set_attn_implementation(prev_attn)

    if len(cache.layers) != len(plan):
        raise KvbenchError(
            f"{model_name}: the cache has {len(cache.layers)} layers, the layer plan {len(plan)}"
        )
    t2 = time.perf_counter()
    layers = []
    n_heads = int(text_cfg.num_attention_heads)
    for e in plan:
        i = e["index"]
        layer = cache.layers[i]
        keys = getattr(layer, "keys", None)
        if e["type"] == "kv_shared":
            if keys is not None and getattr(keys, "numel", lambda: 0)() > 0:
                raise KvbenchError(
                    f"{model_name}: layer {i} is KV-shared by config but holds a cache"
                )
            continue
        if keys is None:
            raise KvbenchError(
                f"{model_name}: layer {i} ({e['type']}) holds no cache after prefill"
            )
        start, tokens = spans[i]
        k, v = keys[0], layer.values[0]
        if k.shape[1] != tokens or v.shape[1] != tokens:
            raise KvbenchError(
                f"{model_name}: layer {i} ({e['type']}) holds {k.shape[1]} tokens, "
                f"expected {tokens} "
                "(transformers' cache behaviour differs from what kvbench assumes)"
            )
        q = recorder.queries(i)
        entry = {
            "index": i,
            "type": e["type"],
            "n_kv": int(k.shape[0]),
            "n_heads": int(q.shape[0]),
            "tokens": int(tokens),
            "token_start": int(start),
            "head_dim": int(k.shape[2]),
            "v_head_dim": int(v.shape[2]),
            "sliding_window": e["sliding_window"],
            "scaling": recorder.scaling.get(i),
            "q_positions": positions[i],
            "shards": {},
        }
        if entry["n_heads"] != n_heads:
            log.warning(
                "%s: layer %d has %d query heads, config %d", model_name, i, q.shape[0], n_heads
            )
        for stream, t in (("k", k), ("v", v), ("q", q)):
            bits = _bits(t)
            fname = f"L{i:02d}.{stream}.npy"
            digest = write_shard(out_dir / fname, bits)
            entry["shards"][stream] = {"file": fname, "shape": list(bits.shape), "sha256": digest}
        layers.append(entry)
        log.info(
            "%s: layer %02d %-7s K/V %s q %s",
            model_name, i, e["type"], list(k.shape), list(q.shape),
        )  # fmt: skip
    timings["write_s"] = time.perf_counter() - t2

    manifest = {
        "format": MANIFEST_FORMAT,
        "storage": BF16_STORAGE,
        "model": model_name,
        "source": weights,
        "weights_sha256": weights.get("weights_sha256"),
        "architecture": text_cfg.model_type,
        "model_type": model.config.model_type,
        "dtype": "bfloat16",
        "ctx": int(ctx),
        "prefill_chunk": chunk,
        "attn_implementation": f"sdpa (recorded via {CAPTURE_ATTN})",
        "device": str(device),
        "corpus": corpus_info,
        "seed": seed,
        "query_sample": {
            "n": n_q,
            "rule": "sorted(numpy.random.default_rng(seed).choice(arange(token_start, ctx), "
            "min(n, tokens), replace=False)) per layer span",
        },
        "num_hidden_layers": len(plan),
        "kv_shared_layers": [e["index"] for e in plan if e["type"] == "kv_shared"],
        "layer_types": [e["type"] for e in plan],
        "versions": _versions(),
        "layers": layers,
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    log.info(
        "%s ctx%d: %d cached layers captured to %s (write %.2f s, total %.1f s)",
        model_name, ctx, len(layers), out_dir, timings["write_s"], time.perf_counter() - t0,
    )  # fmt: skip
    return manifest


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


def iter_layers(
    capture_dir: str | Path, verify: bool = True, streams: tuple[str, ...] = STREAMS
) -> Iterator[tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
    """Yield ``(layer_entry, k, v, q)`` float32 arrays for each cached layer of a capture.

    ``k``/``v`` are ``[n_kv, tokens, head_dim]``, ``q`` is ``[n_heads, n_q, head_dim]`` (positions
    in ``layer_entry["q_positions"]``). Streams not in ``streams`` are None. Every shard read is
    checked against the manifest's sha256 and shape (KvbenchError naming the file) unless
    ``verify=False``.
    """
    manifest = load_manifest(capture_dir)
    for entry in manifest["layers"]:
        arrs = {
            s: read_shard(capture_dir, entry["shards"][s], verify=verify) if s in streams else None
            for s in STREAMS
        }
        yield entry, arrs["k"], arrs["v"], arrs["q"]


def verify_capture(capture_dir: str | Path) -> dict[str, Any]:
    """Check every shard of a capture against its manifest; return the manifest."""
    manifest = load_manifest(capture_dir)
    for entry in manifest["layers"]:
        for s in STREAMS:
            read_shard(capture_dir, entry["shards"][s], verify=True)
    return manifest
