"""Attention-level distortion of a compressed layer, measured with the model's post-RoPE queries.

MSE on K and V does not say what the model sees: a small error along the directions queries probe
can change which keys win the softmax (turboquant spec §5: a K codebook with lower MSE gave
70-90% worse next-token KL). For one cached layer, :func:`attention_metrics` replays the captured
queries against the exact and the decoded keys/values and reports

====================  ===========================================================================
``attn_kl``           KL(softmax(s q.K) || softmax(s q.K_hat)) in nats, over the keys a query sees
``attn_top1``         fraction of queries whose highest-scoring key is unchanged
``attn_top8``         mean overlap of the 8 highest-scoring keys (|top8 ∩ top8_hat| / 8)
``attn_out_rel_err``  ||P V - P_hat V_hat|| / ||P V|| per query (attention output, before o_proj)
``attn_queries``      number of query samples that see at least one stored key
====================  ===========================================================================

each averaged over queries per query head, then over heads. Masking follows the model: a query
at absolute position ``p`` sees stored keys at positions ``<= p`` and, on sliding layers,
``> p - window`` (transformers' ``sliding_window_overlay``); stored keys cover
``[token_start, token_start + T)``. GQA: query head ``h`` reads KV head ``h // (n_heads // n_kv)``.
Scores are ``scaling * q.k`` with the layer's real scaling (Gemma-3:
``query_pre_attn_scalar ** -0.5``; Gemma-4: 1.0), optionally soft-capped (Gemma-2). Scores are
float32 matmuls (the model itself runs bf16); softmax, KL and outputs are float64, on the array
module of the inputs (NumPy or CuPy). An identical reconstruction gives exactly 0 / 1 / 1 / 0.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np

from kvbench.backend import array_module
from kvbench.cpu_threads import one_blas_thread
from kvbench.errors import KvbenchError

#: Column names the compress runner writes for :func:`attention_metrics` (per layer).
ATTN_COLUMNS = ("attn_kl", "attn_top1", "attn_top8", "attn_out_rel_err", "attn_queries")

#: Elements of one [group, queries, T] score block; bounds memory on long contexts.
_MAX_BLOCK = 1 << 22
#: Queries per block: small blocks of sorted queries skip the keys none of them can see.
_QUERY_CHUNK = 16


def visible_mask(xp, positions, token_start: int, n_keys: int, window: int | None):
    """``[n_q, n_keys]`` bool: stored key j (at ``token_start + j``) is visible to each query."""
    kpos = token_start + xp.arange(n_keys, dtype=xp.int64)
    qpos = xp.asarray(positions, dtype=xp.int64)[:, None]
    mask = kpos[None, :] <= qpos
    if window:
        mask &= kpos[None, :] > qpos - int(window)
    return mask


def _log_softmax(xp, s):
    m = s.max(axis=-1, keepdims=True)
    return s - (m + xp.log(xp.exp(s - m).sum(axis=-1, keepdims=True)))


def _topk_idx(xp, s, k: int):
    """Indices of the k largest entries along the last axis (unordered)."""
    if k >= s.shape[-1]:
        return xp.broadcast_to(xp.arange(s.shape[-1]), s.shape)
    return xp.argpartition(-s, k - 1, axis=-1)[..., :k]


def _check_shapes(q, k, v, k_hat, v_hat, positions) -> tuple[int, int, int, int]:
    if q.ndim != 3 or k.ndim != 3:
        raise KvbenchError(
            "attention_metrics: want q [n_heads, n_q, D] and k [n_kv, T, D], "
            f"got {q.shape}, {k.shape}"
        )
    n_heads, n_q, d = q.shape
    n_kv, t, dk = k.shape
    if dk != d:
        raise KvbenchError(f"attention_metrics: q head_dim {d} != k head_dim {dk}")
    if n_heads % n_kv:
        raise KvbenchError(f"attention_metrics: n_heads {n_heads} not a multiple of n_kv {n_kv}")
    for name, a in (("v", v), ("k_hat", k_hat), ("v_hat", v_hat)):
        if a is not None and tuple(a.shape[:2]) != (n_kv, t):
            raise KvbenchError(
                f"attention_metrics: {name} shape {a.shape} does not match k {k.shape}"
            )
    if len(positions) != n_q:
        raise KvbenchError(f"attention_metrics: {len(positions)} positions for {n_q} queries")
    return n_heads, n_q, n_kv, t


def attention_metrics(
    q,
    k,
    v,
    k_hat,
    v_hat,
    positions,
    token_start: int,
    window: int | None,
    scaling: float,
    *,
    softcap: float | None = None,
    top_k: int = 8,
    per_head: bool = False,
) -> dict[str, Any]:
    """Attention distortion of one layer (see the module docstring for the definitions).

    Parameters
    ----------
    q : [n_heads, n_q, D] post-RoPE queries (any float dtype; NumPy or CuPy)
    k, v : [n_kv, T, D] exact keys / values as stored (T tokens from absolute ``token_start``)
    k_hat, v_hat : decoded keys / values; ``None`` means "exact" (e.g. measure K error alone)
    positions : [n_q] absolute positions of the queries
    window : sliding window of the layer, ``None`` or 0 for full attention
    scaling : score scale (``module.scaling`` of the attention layer)
    softcap : attention logit soft-capping (``s <- c * tanh(s / c)``) if the model uses it
    per_head : also return ``<metric>_per_head`` lists (length n_heads)

    Returns
    -------
    dict with the floats ``attn_kl, attn_top1, attn_top8, attn_out_rel_err`` and the int
    ``attn_queries``. Metrics are NaN when no query sees a stored key (e.g. a sliding layer whose
    window lies after every sampled query).
    """
    xp = array_module(k if k_hat is None else k_hat)
    f64, f32 = xp.float64, xp.float32
    k_hat = k if k_hat is None else k_hat
    v_hat = v if v_hat is None else v_hat
    q, k, v, k_hat, v_hat = (xp.asarray(a) for a in (q, k, v, k_hat, v_hat))
    n_heads, _, n_kv, t = _check_shapes(q, k, v, k_hat, v_hat, positions)
    group = n_heads // n_kv
    if v.shape[2] != v_hat.shape[2]:
        raise KvbenchError(f"attention_metrics: v {v.shape} and v_hat {v_hat.shape} differ")

    mask_all = visible_mask(xp, positions, int(token_start), t, window)
    keep = xp.nonzero(mask_all.any(axis=1))[0]
    n_valid = int(keep.shape[0])
    names = ("attn_kl", "attn_top1", "attn_top8", "attn_out_rel_err")
    if n_valid == 0:
        out: dict[str, Any] = {n: math.nan for n in names}
        out["attn_queries"] = 0
        if per_head:
            out.update({f"{n}_per_head": [math.nan] * n_heads for n in names})
        return out
    # Sorted queries in small chunks: each chunk reads only the keys its queries can see
    # (causal: up to its last position; sliding: from its first position's window start).
    pos = xp.asarray(positions, dtype=xp.int64)[keep]
    order = xp.argsort(pos, kind="stable")
    pos, q = pos[order], q[:, keep[order]]
    pos_host = np.asarray(pos.get() if hasattr(pos, "get") else pos)
    sums = xp.zeros((4, n_heads), dtype=f64)  # per-head sums over queries of each metric
    chunk = max(1, min(_QUERY_CHUNK, _MAX_BLOCK // max(1, group * t)))
    spans = []
    for a in range(0, n_valid, chunk):
        b = min(n_valid, a + chunk)
        lo = 0 if not window else max(0, int(pos_host[a]) - int(window) + 1 - int(token_start))
        hi = min(t, int(pos_host[b - 1]) - int(token_start) + 1)
        spans.append((a, b, lo, hi))

    with one_blas_thread() if xp is np else nullcontext():
        for g in range(n_kv):
            heads = slice(g * group, (g + 1) * group)
            kg, khg = k[g].astype(f32), k_hat[g].astype(f32)
            vg, vhg = v[g].astype(f64), v_hat[g].astype(f64)
            for a, b, lo, hi in spans:
                c, tt = b - a, hi - lo
                qg = xp.ascontiguousarray(q[heads, a:b], dtype=f32).reshape(group * c, -1)
                mask = visible_mask(xp, pos[a:b], int(token_start) + lo, tt, window)[None]
                # scores in float32 (like the model), softmax / KL / outputs in float64; 2-D BLAS
                # matmuls on contiguous operands (numpy's batched path is slow on slices)
                r = xp.where(mask, (qg @ kg[lo:hi].T).reshape(group, c, tt), -xp.inf)
                rh = xp.where(mask, (qg @ khg[lo:hi].T).reshape(group, c, tt), -xp.inf)
                s, sh = r.astype(f64) * scaling, rh.astype(f64) * scaling
                if softcap:  # tanh(-inf) is finite: mask again
                    s = xp.where(mask, softcap * xp.tanh(s / softcap), -xp.inf)
                    sh = xp.where(mask, softcap * xp.tanh(sh / softcap), -xp.inf)
                lp, lph = _log_softmax(xp, s), _log_softmax(xp, sh)
                p, ph = xp.exp(lp), xp.exp(lph)
                with np.errstate(invalid="ignore"):  # -inf - -inf on masked keys, dropped by where
                    diff = xp.where(mask, lp - lph, 0.0)
                kl = xp.maximum((p * diff).sum(axis=-1), 0.0)  # [group, c]
                # rankings from the float32 scores (scaling > 0 and soft-capping keep the order)
                top1 = (r.argmax(axis=-1) == rh.argmax(axis=-1)).astype(f64)
                n_vis = mask.sum(axis=-1)  # [1, c]
                kk = min(top_k, tt)
                ia, ib = _topk_idx(xp, r, kk), _topk_idx(xp, rh, kk)
                vis_a = xp.take_along_axis(xp.broadcast_to(mask, r.shape), ia, axis=-1)
                vis_b = xp.take_along_axis(xp.broadcast_to(mask, r.shape), ib, axis=-1)
                same = (
                    (ia[..., :, None] == ib[..., None, :])
                    & vis_a[..., :, None]
                    & vis_b[..., None, :]
                )
                topk = same.any(axis=-1).sum(axis=-1) / xp.minimum(n_vis, kk)
                o = (p.reshape(group * c, tt) @ vg[lo:hi]).reshape(group, c, -1)
                oh = (ph.reshape(group * c, tt) @ vhg[lo:hi]).reshape(group, c, -1)
                on = xp.sqrt((o * o).sum(axis=-1))
                en = xp.sqrt(((o - oh) ** 2).sum(axis=-1))
                rel = xp.where(on > 0, en / xp.where(on > 0, on, 1.0), xp.nan)
                for i, m in enumerate((kl, top1, topk, rel)):
                    sums[i, heads] += m.sum(axis=-1)

    per = sums / n_valid  # [4, n_heads]
    per_np = np.asarray(per.get() if hasattr(per, "get") else per)
    out = {n: float(per_np[i].mean()) for i, n in enumerate(names)}
    out["attn_queries"] = n_valid
    if per_head:
        out.update({f"{n}_per_head": per_np[i].tolist() for i, n in enumerate(names)})
    return out


def layer_attention_metrics(
    layer: dict[str, Any],
    q,
    k,
    v,
    k_hat,
    v_hat,
    *,
    scaling: float | None = None,
    **kwargs,
) -> dict[str, Any]:
    """:func:`attention_metrics` with positions, window and scaling from a manifest layer entry.

    Uses the manifest fields ``q_positions`` (absolute positions of the stored query samples),
    ``token_start``, ``type`` (``sliding`` -> ``sliding_window``), ``scaling`` (falls back to
    ``head_dim ** -0.5`` when the capture did not record it) and ``softcap`` if present.
    """
    positions = layer_query_positions(layer)
    window = layer.get("sliding_window") if layer.get("type") == "sliding" else None
    if scaling is None:
        scaling = layer_scaling(layer, q.shape[-1])
    kwargs.setdefault("softcap", layer.get("softcap"))
    return attention_metrics(
        q,
        k,
        v,
        k_hat,
        v_hat,
        positions,
        int(layer.get("token_start", 0)),
        window,
        scaling,
        **kwargs,
    )


def layer_query_positions(layer: dict[str, Any]) -> list[int]:
    """Absolute positions of a layer's stored query samples (manifest ``q_positions``)."""
    for key in ("q_positions", "query_positions"):
        if key in layer:
            return [int(p) for p in layer[key]]
    raise KvbenchError(
        f"manifest layer {layer.get('index', '?')}: no q_positions (absolute positions of the "
        "query samples); re-run capture_kv"
    )


def layer_scaling(layer: dict[str, Any], head_dim: int) -> float:
    """The layer's score scale: manifest ``scaling``, else the default ``head_dim ** -0.5``."""
    s = layer.get("scaling")
    return float(s) if s is not None else float(head_dim) ** -0.5
