"""Quality beyond MSE: continuation perplexity / KL on a compressed prefix cache, and verdicts.

Protocol (one model x ctx x codec):

1. Read the capture's K/V shards (verified; the same tensors every codec sees) and replace every
   layer by ``decode(encode(kv))`` of the codec, layer by layer as the compress runner does:
   sliding layers as the codec leaves them (Kakeya passes them through), exact tails inside the
   codec's own decode, boundary layers left exact when the codec has ``skip_layers``.
2. Build a transformers ``DynamicCache`` from those tensors (model dtype; sliding layers hold only
   their window, their ``cumulative_length`` set to the prefix length) — no prefill forward.
3. Teacher-force the next ``n_tokens`` corpus tokens ``t[ctx : ctx+n]`` on top of that cache and
   score the predictions of ``t[ctx+1 : ctx+n+1]``.
4. The reference is the very same path with the captured tensors themselves (bf16 values), run in
   the same process: the identity codec (a bf16 passthrough) gives bit-identical logits, so its
   delta-PPL and KL are exactly 0.

Continuation tokens attend to the compressed prefix and to their own exact K/V (the "compressed
prefix, exact decode" setting of llama.cpp's KLD runs on a fixed prefix).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.attention import ATTN_COLUMNS, layer_attention_metrics
from kvbench.codecs.base import STREAMS, Codec
from kvbench.codecs.skip import build_codec_for_capture, layer_compressed
from kvbench.corpus import token_ids_sha256
from kvbench.errors import KvbenchError
from kvbench.shards import load_manifest, n_cached_layers, read_shard

log = logging.getLogger(__name__)

#: Columns of ``results/quality/{model}/ctx{ctx}/{codec}.parquet`` (one row: model x ctx x codec).
QUALITY_COLUMNS = (
    "model", "ctx", "codec", "family", "n_tokens", "layers_cached", "layers_compressed",
    "skip_layers", "nll", "ppl", "ref_nll", "ref_ppl", "delta_nll", "delta_nll_se", "delta_ppl",
    "delta_ppl_rel",
    "kl_mean", "kl_p99", "kl_max", "top1_agree", "top1_acc", "ref_top1_acc",
    "mean_attn_kl", "max_attn_kl", "max_attn_kl_layer", "mean_attn_top1", "mean_attn_top8",
    "mean_attn_out_rel_err",
)  # fmt: skip

#: Default verdict thresholds (``quality.thresholds`` in the config). Relative delta-PPL and mean
#: next-token KL (nats) vs the uncompressed cache; a codec gets the worse of the two verdicts.
#: Anchors (turboquant spec §5, Qwen3.5-35B): q8_0 KLD 0.0015 / +0%, turbo4 0.0096 / +0.23%,
#: turbo3 0.016 / +1.06%, turbo2 +6.5%.
DEFAULT_THRESHOLDS = {
    "accept": {"kl": 0.01, "delta_ppl": 0.01},
    "marginal": {"kl": 0.05, "delta_ppl": 0.05},
}

VERDICTS = ("ACCEPT", "MARGINAL", "REJECT")


# --------------------------------------------------------------------------------------------------
# Decoded capture


def decoded_capture(
    capture_dir: str | Path,
    codec: Codec | None,
    manifest: dict[str, Any] | None = None,
    attention: bool = True,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[dict[str, Any]]]:
    """``{layer: (k_hat, v_hat)}`` float32 host arrays and per-layer attention metrics.

    ``codec=None`` returns the captured tensors themselves (the reference).
    """
    from kvbench.backend import to_numpy

    manifest = manifest or load_manifest(capture_dir)
    kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    for entry in manifest["layers"]:
        layer, shards = int(entry["index"]), entry["shards"]
        exact = {s: np.asarray(read_shard(capture_dir, shards[s])) for s in STREAMS}
        hat = {}
        for s in STREAMS:
            if codec is None or not layer_compressed(codec, entry, s):
                hat[s] = exact[s]
                continue
            x = codec.xp.asarray(exact[s])
            hat[s] = np.ascontiguousarray(
                to_numpy(codec.decode(codec.encode(x, stream=s, layer=layer)))
            )
            if hat[s].shape != exact[s].shape:
                raise KvbenchError(
                    f"codec {codec.name!r} decoded layer {layer} {s} to {hat[s].shape}, "
                    f"want {exact[s].shape}"
                )
        kv[layer] = (hat["k"], hat["v"])
        if attention and "q" in shards:
            q = read_shard(capture_dir, shards["q"])
            m = layer_attention_metrics(entry, q, exact["k"], exact["v"], hat["k"], hat["v"])
            rows.append({"layer": layer, "layer_type": entry["type"], **m})
    return kv, rows


# --------------------------------------------------------------------------------------------------
# Cache construction and continuation


def build_cache(model_config, kv: dict[int, tuple[Any, Any]], seq_len: int, dtype, device="cpu"):
    """A ``DynamicCache`` holding ``kv[layer] = (k, v)`` ([n_kv, T, D]) after ``seq_len`` tokens.

    Sliding layers hold only their last tokens (as the capture stores them); their
    ``cumulative_length`` is set to ``seq_len`` so positions and masks match a real prefill.
    Layers absent from ``kv`` (KV-shared consumers) stay empty.
    """
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model_config)
    if len(cache.layers) < len(kv):
        raise KvbenchError(f"model has {len(cache.layers)} cache layers, capture has {len(kv)}")
    for i, (k, v) in sorted(kv.items()):
        layer = cache.layers[i]
        kt = torch.as_tensor(np.asarray(k, dtype=np.float32)).to(device=device, dtype=dtype)
        vt = torch.as_tensor(np.asarray(v, dtype=np.float32)).to(device=device, dtype=dtype)
        layer.update(kt[None], vt[None])
        if getattr(layer, "is_sliding", False):
            window = int(layer.sliding_window)
            if kt.shape[1] != min(seq_len, window - 1):
                raise KvbenchError(
                    f"layer {i}: sliding cache of window {window} after {seq_len} tokens holds "
                    f"{min(seq_len, window - 1)} tokens, the capture has {kt.shape[1]}"
                )
            layer.cumulative_length = int(seq_len)
        elif kt.shape[1] != seq_len:
            raise KvbenchError(
                f"layer {i}: full-attention cache has {kt.shape[1]} tokens, want {seq_len}"
            )
    return cache


def continuation_logits(model, kv, seq_len: int, cont_ids: Sequence[int]):
    """Logits ``[n, vocab]`` (float32, CPU) of ``cont_ids`` teacher-forced after a prefix cache."""
    import torch

    param = next(model.parameters())
    cache = build_cache(model.config, kv, seq_len, param.dtype, param.device)
    ids = torch.as_tensor(np.asarray(cont_ids, dtype=np.int64), device=param.device)[None]
    pos = torch.arange(seq_len, seq_len + ids.shape[1], device=param.device)
    # transformers >= 5.2x calls it ``cache``; earlier 5.x ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=pos[None], use_cache=True, **{name: cache})
    return out.logits[0].float().cpu()


def continuation_stats(ref_logits, logits, targets, chunk: int = 32) -> dict[str, float]:
    """NLL/PPL of ``targets`` under both logits, next-token KL(ref || codec), top-1 agreement.

    Sums in float64, ``chunk`` tokens at a time (vocabularies of 256k are large).
    """
    import torch

    targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    n = targets.shape[0]
    if ref_logits.shape[0] != n or logits.shape != ref_logits.shape:
        raise KvbenchError(
            f"logits {tuple(logits.shape)} / {tuple(ref_logits.shape)} vs {n} targets"
        )
    nll = torch.zeros(n, dtype=torch.float64)
    ref_nll = torch.zeros(n, dtype=torch.float64)
    kl = torch.zeros(n, dtype=torch.float64)
    agree = torch.zeros(n, dtype=torch.bool)
    hit = torch.zeros(n, dtype=torch.bool)
    ref_hit = torch.zeros(n, dtype=torch.bool)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        lr = torch.log_softmax(ref_logits[a:b].double(), -1)
        lc = torch.log_softmax(logits[a:b].double(), -1)
        t = targets[a:b, None]
        ref_nll[a:b] = -lr.gather(1, t)[:, 0]
        nll[a:b] = -lc.gather(1, t)[:, 0]
        kl[a:b] = (lr.exp() * (lr - lc)).sum(-1).clamp_min(0.0)
        am, amr = logits[a:b].argmax(-1), ref_logits[a:b].argmax(-1)
        agree[a:b] = am == amr
        hit[a:b] = am == targets[a:b]
        ref_hit[a:b] = amr == targets[a:b]
    m_nll, m_ref = float(nll.mean()), float(ref_nll.mean())
    d = nll - ref_nll  # paired per-token differences: their standard error sizes delta_nll's noise
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    ppl, ref_ppl = math.exp(m_nll), math.exp(m_ref)
    return {
        "nll": m_nll,
        "ppl": ppl,
        "ref_nll": m_ref,
        "ref_ppl": ref_ppl,
        "delta_nll": m_nll - m_ref,
        "delta_nll_se": se,
        "delta_ppl": ppl - ref_ppl,
        "delta_ppl_rel": (ppl - ref_ppl) / ref_ppl,
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "top1_agree": float(agree.double().mean()),
        "top1_acc": float(hit.double().mean()),
        "ref_top1_acc": float(ref_hit.double().mean()),
    }


def attention_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Layer means of the attention metrics (passthrough layers count as exact), worst layer."""
    if not rows:
        return {
            "mean_attn_kl": math.nan, "max_attn_kl": math.nan, "max_attn_kl_layer": -1,
            "mean_attn_top1": math.nan, "mean_attn_top8": math.nan,
            "mean_attn_out_rel_err": math.nan,
        }  # fmt: skip
    df = pd.DataFrame(rows)
    worst = df["attn_kl"].idxmax() if df["attn_kl"].notna().any() else None
    return {
        "mean_attn_kl": float(df["attn_kl"].mean()),
        "max_attn_kl": float(df["attn_kl"].max()),
        "max_attn_kl_layer": int(df.loc[worst, "layer"]) if worst is not None else -1,
        "mean_attn_top1": float(df["attn_top1"].mean()),
        "mean_attn_top8": float(df["attn_top8"].mean()),
        "mean_attn_out_rel_err": float(df["attn_out_rel_err"].mean()),
    }


def quality_with_model(
    model,
    capture_dir: str | Path,
    codec_name: str,
    codecs_cfg: dict[str, dict],
    token_ids: Sequence[int],
    n_tokens: int = 256,
    backend: str = "cpu",
    reference_logits=None,
    attention: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
    """Score one codec on one capture with a loaded ``model`` and the corpus ``token_ids``.

    ``token_ids`` must start with the capture's ``ctx`` tokens and hold ``n_tokens + 1`` more.
    Returns the one-row quality table, the per-layer attention table and the reference logits
    (pass them back in as ``reference_logits`` to score several codecs in one process).
    """
    from kvbench.backend import get_xp

    manifest = load_manifest(capture_dir)
    ctx = int(manifest["ctx"])
    check_tokens(manifest, token_ids, n_tokens)
    n_layers = n_cached_layers(manifest)
    codec = build_codec_for_capture(codec_name, codecs_cfg, n_layers, get_xp(backend))
    cont = list(token_ids[ctx : ctx + n_tokens])
    targets = list(token_ids[ctx + 1 : ctx + n_tokens + 1])

    t0 = time.perf_counter()
    if reference_logits is None:
        ref_kv, _ = decoded_capture(capture_dir, None, manifest, attention=False)
        reference_logits = continuation_logits(model, ref_kv, ctx, cont)
        del ref_kv
    t1 = time.perf_counter()
    kv, attn_rows = decoded_capture(capture_dir, codec, manifest, attention=attention)
    t2 = time.perf_counter()
    logits = continuation_logits(model, kv, ctx, cont)
    t3 = time.perf_counter()
    log.info(
        "%s ctx %d %s: reference %.1fs, encode/decode+attention %.1fs, continuation %.1fs",
        manifest["model"], ctx, codec_name, t1 - t0, t2 - t1, t3 - t2,
    )  # fmt: skip
    compressed = sum(
        any(layer_compressed(codec, e, s) for s in STREAMS) for e in manifest["layers"]
    )
    row = {
        "model": manifest["model"],
        "ctx": ctx,
        "codec": codec_name,
        "family": codec.family,
        "n_tokens": len(targets),
        "layers_cached": len(manifest["layers"]),
        "layers_compressed": int(compressed),
        "skip_layers": ",".join(str(i) for i in sorted(getattr(codec, "skip", ()))),
        **continuation_stats(reference_logits, logits, targets),
        **attention_summary(attn_rows),
    }
    table = pd.DataFrame([row])[list(QUALITY_COLUMNS)]
    layers = pd.DataFrame(attn_rows)
    if not layers.empty:
        layers.insert(0, "codec", codec_name)
        layers.insert(0, "ctx", ctx)
        layers.insert(0, "model", manifest["model"])
        layers = layers[["model", "ctx", "codec", "layer", "layer_type", *ATTN_COLUMNS]]
    return table, layers, reference_logits


def run_quality(
    capture_dir: str | Path,
    model_name: str,
    model_cfg: dict[str, Any],
    codec_names: str | Sequence[str],
    codecs_cfg: dict[str, dict],
    *,
    corpus_name: str = "pydoc_topics",
    n_tokens: int = 256,
    backend: str = "cpu",
    model_dir: str | Path | None = None,
    threads: int | None = None,
    model=None,
    tokenizer=None,
    attention: bool = True,
    allow_download: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load the model once, rebuild the capture's token ids, score one or several codecs.

    Returns the quality table (one row per codec, :data:`QUALITY_COLUMNS`) and the per-layer
    attention table (empty, and the ``*_attn_*`` summary columns NaN, when ``attention`` is off).
    The reference continuation is computed once, in this process, through the same code path as
    every codec (so ``identity`` is exactly 0). ``model``/``tokenizer`` may be passed in (tests);
    otherwise :func:`kvbench.models.load_model` loads them (bf16, sdpa).
    """
    import torch

    from kvbench.corpus import build_token_ids

    if threads:
        torch.set_num_threads(int(threads))
    names = [codec_names] if isinstance(codec_names, str) else list(codec_names)
    manifest = load_manifest(capture_dir)
    ctx = int(manifest["ctx"])
    t0 = time.perf_counter()
    if model is None:
        from kvbench.models import load_model

        model, tokenizer = load_model(
            model_name, model_cfg, model_dir, "sdpa", allow_download=allow_download
        )
    if backend in ("gpu", "auto") and torch.cuda.is_available():
        model = model.to("cuda")  # the continuation runs where the codecs do
    log.info("%s: model ready in %.1f s", model_name, time.perf_counter() - t0)
    ids, _ = build_token_ids(corpus_name, tokenizer, ctx, extra=n_tokens + 1)
    tables, layers, ref = [], [], None
    for name in names:
        t, la, ref = quality_with_model(
            model, capture_dir, name, codecs_cfg, ids, n_tokens, backend, ref, attention
        )
        r = t.iloc[0]
        log.info(
            "%s ctx %d %s: ppl %.4f (ref %.4f, %+.3f%%), KL %.3g, top-1 agree %.3f, attn KL %.3g",
            model_name, ctx, name, r["ppl"], r["ref_ppl"], 100 * r["delta_ppl_rel"], r["kl_mean"],
            r["top1_agree"], r["mean_attn_kl"],
        )  # fmt: skip
        tables.append(t)
        layers.append(la)
    return pd.concat(tables, ignore_index=True), pd.concat(layers, ignore_index=True)


def check_tokens(manifest: dict[str, Any], token_ids: Sequence[int], n_tokens: int) -> None:
    """The corpus tokens must be the capture's (sha256 of the first ctx ids) and long enough."""
    ctx = int(manifest["ctx"])
    if len(token_ids) < ctx + n_tokens + 1:
        raise KvbenchError(
            f"quality needs {ctx + n_tokens + 1} corpus tokens (ctx {ctx} + n_tokens "
            f"{n_tokens} + 1), "
            f"the corpus gives {len(token_ids)}; lower quality.n_tokens or use a longer corpus"
        )
    want = _manifest_token_sha(manifest)
    if want is not None:
        got = token_ids_sha256(list(token_ids[:ctx]))
        if got != want:
            raise KvbenchError(
                f"corpus tokens differ from the capture's (sha256 {got[:12]}… vs manifest "
                f"{want[:12]}…): the corpus or tokenizer changed; rerun capture_kv"
            )


def _manifest_token_sha(manifest: dict[str, Any]) -> str | None:
    corpus = manifest.get("corpus")
    if isinstance(corpus, dict) and "token_ids_sha256" in corpus:
        return corpus["token_ids_sha256"]
    return manifest.get("token_ids_sha256")


# --------------------------------------------------------------------------------------------------
# Workflow targets


def quality_targets(cfg: dict[str, Any]) -> list[str]:
    """``results/quality/{model}/ctx{ctx}/{codec}.parquet`` for the ``quality:`` section of ``cfg``.

    Contexts are ``quality.contexts`` that are also captured for the model (its own ``contexts``
    or the global list): quality never triggers a capture of its own. Unknown codec names raise.
    """
    from kvbench.config import model_contexts

    q = cfg.get("quality") or {}
    codecs = list(q.get("codecs", []))
    unknown = sorted(set(codecs) - set(cfg.get("codecs") or {}))
    if unknown:
        raise KvbenchError(
            f"config key 'quality.codecs': unknown codec(s) {unknown}; "
            f"configured codecs: {sorted(cfg.get('codecs') or {})}"
        )
    out = []
    for model in cfg["models"]:
        captured = model_contexts(cfg, model)
        for ctx in q.get("contexts", []):
            if ctx in captured:
                out += [f"results/quality/{model}/ctx{ctx}/{codec}.parquet" for codec in codecs]
    return out


# --------------------------------------------------------------------------------------------------
# Verdicts


def quality_verdict(kl_mean: float, delta_ppl_rel: float, thresholds: dict | None = None) -> str:
    """ACCEPT / MARGINAL / REJECT from next-token KL and relative delta-PPL (worse of the two).

    ``thresholds = {"accept": {"kl": .., "delta_ppl": ..}, "marginal": {...}}``; a missing or NaN
    metric gives ``"n/a"``. Negative delta-PPL counts as 0 (a lossy cache does not earn credit).
    """
    th = thresholds or DEFAULT_THRESHOLDS
    if any(x is None or (isinstance(x, float) and math.isnan(x)) for x in (kl_mean, delta_ppl_rel)):
        return "n/a"
    dppl = max(float(delta_ppl_rel), 0.0)
    for verdict, key in (("ACCEPT", "accept"), ("MARGINAL", "marginal")):
        if float(kl_mean) <= th[key]["kl"] and dppl <= th[key]["delta_ppl"]:
            return verdict
    return "REJECT"


def quality_verdicts(table: pd.DataFrame, thresholds: dict | None = None) -> pd.DataFrame:
    """One row per (model, ctx, codec) of a quality table: the metrics and ``quality_verdict``."""
    cols = ["model", "ctx", "codec", "kl_mean", "delta_ppl_rel", "top1_agree"]
    out = table[cols].copy()
    out["quality_verdict"] = [
        quality_verdict(k, d, thresholds)
        for k, d in zip(out["kl_mean"], out["delta_ppl_rel"], strict=True)
    ]
    return out.reset_index(drop=True)
