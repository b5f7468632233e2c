"""Per layer-stream reconstruction errors, computed the same way for every codec."""

from __future__ import annotations

from types import ModuleType


def reconstruction_errors(xp: ModuleType, x, x_hat) -> dict[str, float]:
    """MSE, relative MSE (MSE / mean x^2), max |error| and mean per-vector cosine similarity.

    ``x``/``x_hat`` are ``[n_kv, T, D]``; sums run in float64 so the numbers do not depend on the
    codec's working precision.
    """
    x = xp.asarray(x, dtype=xp.float64)
    diff = xp.asarray(x_hat, dtype=xp.float64) - x
    mse = float(xp.mean(diff * diff))
    power = float(xp.mean(x * x))
    xh = x + diff
    dots = xp.sum(x * xh, axis=-1)
    norms = xp.linalg.norm(x, axis=-1) * xp.linalg.norm(xh, axis=-1)
    # A zero vector reconstructed as zero is a perfect match, not 0/0.
    cos = xp.where(norms > 0, dots / xp.where(norms > 0, norms, 1.0), 1.0)
    return {
        "mse": mse,
        "rel_mse": mse / power if power > 0 else float("nan"),
        "max_abs_err": float(xp.max(xp.abs(diff))) if diff.size else 0.0,
        "cos_sim": float(xp.mean(cos)),
    }


def inner_product_error(xp: ModuleType, q, k, k_hat) -> float:
    """mean |q.k - q.k_hat| / mean |q.k| over captured queries and every key of their KV head.

    ``q: [n_heads, n_q, D]`` (post-RoPE), ``k, k_hat: [n_kv, T, D]``; query head ``h`` reads KV head
    ``h // (n_heads // n_kv)`` (GQA).
    """
    n_heads, n_kv = q.shape[0], k.shape[0]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not group onto {n_kv} KV heads")
    group = n_heads // n_kv
    # float32 products of bf16-valued inputs are accurate to ~1e-7 relative, far below any codec
    # error, and 4x cheaper than float64; the means are taken in float64.
    qg = xp.asarray(q, dtype=xp.float32).reshape(n_kv, group * q.shape[1], q.shape[2])
    k32 = xp.asarray(k, dtype=xp.float32)
    exact = qg @ k32.transpose(0, 2, 1)
    err = qg @ (xp.asarray(k_hat, dtype=xp.float32) - k32).transpose(0, 2, 1)
    denom = float(xp.mean(xp.abs(exact), dtype=xp.float64))
    return float(xp.mean(xp.abs(err), dtype=xp.float64)) / denom if denom > 0 else float("nan")
