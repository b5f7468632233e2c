"""K-side ``variance_ratio x d_res`` ablation (spec kakeya.md §2.11; results §4.6; caveats §5.14+).

For every full-attention layer of a capture with at least two blocks, the K stream is flattened
head-major to ``[n_kv*T, D]`` and cut into blocks of ``block_size`` rows (one head's consecutive
tokens). Per variance ratio ``vr``:

1. one PCA per block (``kvbench.codecs.kakeyaturbo.fit_pca``: f32 covariance, eigenvalue rule of the
   Rust crate for ``d_eff``, mean and basis rounded to IEEE f16 before use);
2. ``base = unproject(project(x))`` and ``e = x - base`` per row;
3. for each ``d_res``: keep the ``d_res`` coordinates of largest ``|e|`` **in the original D-dim
   space, exactly** (f32), zero the rest: ``x_hat = base + e_kept``. No K-means, WHT or quantiser.

Per layer and cell: ``mean_mse`` = mean over blocks of ``sum((x-x_hat)^2)/(block*D)`` (the study's
metric), ``inflation`` = metric / metric at the baseline cell (0.95, 0). With ``metric:
ip_rel_err`` the layer's attention-logit error on the captured queries
(``kvbench.metrics.inner_product_error``) replaces the MSE (spec §5.17: MSE-only thresholds do
not predict quality).

Bytes per cell are *computed from the measured per-block d_eff* with the study's K byte model
(spec §2.11, ``estimate_k_ratio``): per row ``4 + 6 + ceil(next_pow2(d_eff)*b/8) + outlier_bytes *
d_res``, per block ``s*(D + d_eff*D + centres*d_eff)``. The study took d_eff from Qwen3 layer 0
only; here every block of every layer contributes its own. Note (§5.15) that the outliers are
exact in the original space but charged ``outlier_bytes`` each, and that the MSE is PCA-only while
the bytes include the K-means and residual code of the full codec.

Summaries: per model, mean/median/max/p90 (numpy linear) of the per-layer inflation per cell; the
cross-model grid is the unweighted mean over models of the per-model mean inflation, tagged
ACCEPT (<= ``accept``), MARGINAL (<= ``marginal``) or REJECT.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.errors import KvbenchError

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "models": [],  # empty: every model
    "ctx": 4096,
    "variance_ratios": [0.95, 0.90, 0.85, 0.80, 0.70],
    "d_res": [0, 2, 4, 8],
    "baseline": [0.95, 0],
    "accept": 1.10,
    "marginal": 1.30,
    "metric": "mse",
    "stream": "k",
    "block_size": 512,
    "skeleton_dtype": "f16",
    "bytes": {"bit_width": 3, "centres": 16, "outlier_bytes": 4},
}
METRICS = ("mse", "ip_rel_err")
#: The study's cross-model grid (spec kakeya.md §4.6: mean K-MSE inflation, 7 models, ctx 4096).
PUBLISHED_GRID: dict[tuple[float, int], float] = {
    (0.95, 0): 1.00, (0.95, 2): 0.82, (0.95, 4): 0.71, (0.95, 8): 0.57,
    (0.90, 0): 2.00, (0.90, 2): 1.66, (0.90, 4): 1.45, (0.90, 8): 1.16,
    (0.85, 0): 3.00, (0.85, 2): 2.49, (0.85, 4): 2.19, (0.85, 8): 1.76,
    (0.80, 0): 3.99, (0.80, 2): 3.32, (0.80, 4): 2.92, (0.80, 8): 2.36,
    (0.70, 0): 5.96, (0.70, 2): 4.96, (0.70, 4): 4.35, (0.70, 8): 3.52,
}  # fmt: skip
MARKS = {"ACCEPT": "✅ ACCEPT", "MARGINAL": "⚠ MARGINAL", "REJECT": "❌ REJECT"}


def settings(cfg: dict | None) -> dict[str, Any]:
    """The ``ablation:`` config section with defaults filled in and checked."""
    s = {**DEFAULTS, **(cfg or {})}
    s["bytes"] = {**DEFAULTS["bytes"], **((cfg or {}).get("bytes") or {})}
    if s["metric"] not in METRICS:
        raise KvbenchError(f"ablation.metric must be one of {list(METRICS)}, got {s['metric']!r}")
    if s["stream"] not in ("k", "v"):
        raise KvbenchError(f"ablation.stream must be 'k' or 'v', got {s['stream']!r}")
    vr0, d0 = s["baseline"]
    if not any(abs(v - vr0) < 1e-6 for v in s["variance_ratios"]) or d0 not in s["d_res"]:
        raise KvbenchError(
            f"ablation.baseline {s['baseline']} is not a cell of the grid "
            f"(variance_ratios {s['variance_ratios']} x d_res {s['d_res']})"
        )
    if not 0 < s["accept"] <= s["marginal"]:
        raise KvbenchError("ablation: need 0 < accept <= marginal")
    return s


def classify(inflation: float, accept: float, marginal: float) -> str:
    if not math.isfinite(inflation):
        return "REJECT"
    if inflation <= accept:
        return "ACCEPT"
    return "MARGINAL" if inflation <= marginal else "REJECT"


def k_bytes(
    d_eff: Sequence[int],
    rows_per_block: int,
    dim: int,
    d_res: int,
    bit_width: int = 3,
    centres: int = 16,
    outlier_bytes: int = 4,
    skeleton_bytes: int = 2,
) -> int:
    """The study's K byte model (spec §2.11) summed over blocks with their own ``d_eff``."""
    from kvbench.codecs.kakeyaturbo import kt_code_nbytes

    total = 0
    k_eff = min(centres, rows_per_block)
    for d in d_eff:
        d = int(d)
        skel = skeleton_bytes * (dim + d * dim + k_eff * d)
        row = kt_code_nbytes(d, bit_width) + outlier_bytes * d_res
        total += skel + rows_per_block * row
    return total


def ablate_stream(
    x: np.ndarray,
    variance_ratios: Iterable[float],
    d_res: Iterable[int],
    block_size: int = 512,
    q: np.ndarray | None = None,
    metric: str = "mse",
    skeleton_dtype: str = "f16",
    bytes_cfg: dict | None = None,
    xp=np,
) -> list[dict]:
    """All cells for one layer-stream ``x: [n_kv, T, D]``; one dict per (vr, d_res).

    Blocks are batched (one ``fit_pca`` per variance ratio for all blocks of the layer).
    """
    from kvbench.backend import to_numpy
    from kvbench.codecs.kakeyaturbo import fit_pca, pca_project, pca_unproject

    bytes_cfg = {**DEFAULTS["bytes"], **(bytes_cfg or {})}
    n_kv, t, dim = x.shape
    flat = xp.asarray(x, dtype=xp.float32).reshape(n_kv * t, dim)
    nb = flat.shape[0] // block_size
    if nb < 1:
        return []
    blocks = flat[: nb * block_size].reshape(nb, block_size, dim)
    d_res = sorted({int(d) for d in d_res})
    kmax = min(max(d_res), dim)
    out = []
    sb = 2 if skeleton_dtype == "f16" else 4
    for vr in variance_ratios:
        fit = fit_pca(xp, blocks, float(vr), skeleton_dtype)
        base = pca_unproject(xp, pca_project(xp, blocks, fit), fit)
        e = blocks - base  # [nb, B, D] f32
        sq = (e * e).astype(xp.float64)
        total = sq.sum(axis=(1, 2))  # [nb]
        top = -xp.sort(-sq, axis=-1)[..., :kmax] if kmax > 0 else None  # descending
        cum = xp.cumsum(top, axis=-1).sum(axis=1) if kmax > 0 else None  # [nb, kmax]
        d_eff = np.asarray(fit.d_eff, dtype=np.int64)
        for d in d_res:
            kept = 0.0 if d == 0 else cum[:, min(d, dim) - 1]
            block_mse = to_numpy((total - kept) / (block_size * dim))
            if d >= dim:
                block_mse = np.zeros(nb)
            cell = {
                "variance_ratio": float(vr),
                "d_res": d,
                "n_blocks": nb,
                "d_eff_mean": float(d_eff.mean()),
                "d_eff": int(d_eff.sum() // nb),
                "d_eff_min": int(d_eff.min()),
                "d_eff_max": int(d_eff.max()),
                "mean_mse": float(np.mean(block_mse)),
                "median_mse": float(np.median(block_mse)),
                "min_mse": float(np.min(block_mse)),
                "max_mse": float(np.max(block_mse)),
                "baseline_bytes": 2 * nb * block_size * dim,
                "bytes": k_bytes(
                    d_eff,
                    block_size,
                    dim,
                    d,
                    bit_width=int(bytes_cfg["bit_width"]),
                    centres=int(bytes_cfg["centres"]),
                    outlier_bytes=int(bytes_cfg["outlier_bytes"]),
                    skeleton_bytes=sb,
                ),
            }
            if metric == "ip_rel_err":
                cell["ip_rel_err"] = _ip_error(xp, x, flat, base, e, nb, block_size, d, q)
            out.append(cell)
    return out


def _ip_error(xp, x, flat, base, e, nb, block_size, d, q) -> float:
    from kvbench.metrics import inner_product_error

    if q is None:
        raise KvbenchError("ablation.metric ip_rel_err needs the capture's query shards (q)")
    n_kv, t, dim = x.shape
    if d > 0:
        order = xp.argsort(-xp.abs(e), axis=-1, kind="stable")[..., :d]
        kept = xp.zeros_like(e)
        xp.put_along_axis(kept, order, xp.take_along_axis(e, order, axis=-1), axis=-1)
        rec = base + kept
    else:
        rec = base
    x_hat = flat.copy()
    x_hat[: nb * block_size] = rec.reshape(nb * block_size, dim)
    return inner_product_error(
        xp, xp.asarray(q), flat.reshape(n_kv, t, dim), x_hat.reshape(n_kv, t, dim)
    )


def run_ablation(capture_dir: str | Path, cfg: dict | None = None, backend: str = "cpu"):
    """Run the grid on every full-attention layer with >= 2 blocks of one capture.

    Returns one row per (layer, variance_ratio, d_res) with the metric, the inflation over the
    baseline cell and the bytes of the cell (see the module docstring).
    """
    from kvbench.backend import get_xp
    from kvbench.shards import load_manifest, read_shard

    s = settings(cfg)
    xp = get_xp(backend)
    manifest = load_manifest(capture_dir)
    rows = []
    for entry in manifest["layers"]:
        if entry["type"] != "full":
            continue
        shard = entry["shards"][s["stream"]]
        n_kv, t, dim = shard["shape"]
        if (n_kv * t) // s["block_size"] < 2:
            continue
        x = read_shard(capture_dir, shard)
        q = None
        if s["metric"] == "ip_rel_err":
            q = read_shard(capture_dir, entry["shards"]["q"]) if "q" in entry["shards"] else None
        cells = ablate_stream(
            x,
            s["variance_ratios"],
            s["d_res"],
            s["block_size"],
            q=q,
            metric=s["metric"],
            skeleton_dtype=s["skeleton_dtype"],
            bytes_cfg=s["bytes"],
            xp=xp,
        )
        for c in cells:
            c.update(
                model=manifest["model"],
                ctx=int(manifest["ctx"]),
                layer=int(entry["index"]),
                stream=s["stream"],
                n_kv=int(n_kv),
                head_dim=int(dim),
                block_size=int(s["block_size"]),
            )
        rows.extend(cells)
    if not rows:
        raise KvbenchError(
            f"{capture_dir}: no full-attention layer with >= 2 blocks of {s['block_size']} rows; "
            "raise ablation.ctx or lower ablation.block_size"
        )
    return add_inflation(pd.DataFrame(rows), s)


def add_inflation(df: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Add ``value`` (the configured metric), ``baseline_value``, ``inflation``, ``ratio``."""
    s = settings(s)
    metric_col = "mean_mse" if s["metric"] == "mse" else s["metric"]
    vr0, d0 = s["baseline"]
    df = df.copy()
    df["metric"] = s["metric"]
    df["value"] = df[metric_col].astype(float)
    base = df[(np.abs(df["variance_ratio"] - vr0) < 1e-6) & (df["d_res"] == d0)]
    base = base.set_index(["model", "layer"])["value"].rename("baseline_value")
    df = df.join(base, on=["model", "layer"])
    eps = np.finfo(np.float64).eps
    df["inflation"] = df["value"] / np.maximum(df["baseline_value"], eps)
    df["ratio"] = df["baseline_bytes"] / df["bytes"]
    first = [
        "model",
        "ctx",
        "layer",
        "stream",
        "variance_ratio",
        "d_res",
        "metric",
        "value",
        "baseline_value",
        "inflation",
    ]
    rest = [c for c in df.columns if c not in first]
    df = df[first + rest]
    return df.sort_values(
        ["model", "layer", "variance_ratio", "d_res"],
        ascending=[True, True, False, True],
        kind="stable",
    ).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# summaries


def summarize_model(df: pd.DataFrame, cfg: dict | None = None) -> pd.DataFrame:
    """Per (model, vr, d_res): mean/median/max/p90 of per-layer inflation, bytes and mark."""
    s = settings(cfg)
    rows = []
    for (model, vr, d), g in df.groupby(["model", "variance_ratio", "d_res"], sort=True):
        infl = g["inflation"].to_numpy(dtype=float)
        r = {
            "model": model,
            "variance_ratio": float(vr),
            "d_res": int(d),
            "n_layers": len(g),
            "mean_inflation": float(np.mean(infl)),
            "median_inflation": float(np.median(infl)),
            "max_inflation": float(np.max(infl)),
            "p90_inflation": float(np.percentile(infl, 90)),
            "d_eff_mean": float(g["d_eff_mean"].mean()),
            "bytes": int(g["bytes"].sum()),
            "baseline_bytes": int(g["baseline_bytes"].sum()),
        }
        r["ratio"] = r["baseline_bytes"] / r["bytes"]
        r["mark"] = classify(r["mean_inflation"], s["accept"], s["marginal"])
        rows.append(r)
    out = pd.DataFrame(rows)
    return out.sort_values(
        ["model", "variance_ratio", "d_res"], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)


def cross_model_grid(per_model: pd.DataFrame, cfg: dict | None = None) -> pd.DataFrame:
    """Unweighted mean over models of the per-model mean inflation (and ratio), tagged."""
    s = settings(cfg)
    vr0 = s["baseline"][0]
    rows = []
    for (vr, d), g in per_model.groupby(["variance_ratio", "d_res"], sort=True):
        r = {
            "variance_ratio": float(vr),
            "d_res": int(d),
            "n_models": len(g),
            "n_layers": int(g["n_layers"].sum()),
            "mean_inflation": float(g["mean_inflation"].mean()),
            "worst_model_inflation": float(g["mean_inflation"].max()),
            "worst_model": str(g.loc[g["mean_inflation"].idxmax(), "model"]),
            "max_layer_inflation": float(g["max_inflation"].max()),
            "mean_ratio": float(g["ratio"].mean()),
            "bytes": int(g["bytes"].sum()),
            "baseline_bytes": int(g["baseline_bytes"].sum()),
            # PCA-only error ~ discarded variance (spec §5.14): the "tautology" prediction
            "pca_tail_prediction": (1 - float(vr)) / (1 - vr0) if vr0 < 1 else math.nan,
        }
        r["mark"] = classify(r["mean_inflation"], s["accept"], s["marginal"])
        rows.append(r)
    out = pd.DataFrame(rows)
    return out.sort_values(
        ["variance_ratio", "d_res"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)


def best_accept(grid: pd.DataFrame) -> dict | None:
    """The ACCEPT cell with the fewest measured bytes (ties: higher vr, then lower d_res)."""
    ok = grid[grid["mark"] == "ACCEPT"]
    if ok.empty:
        return None
    ok = ok.sort_values(
        ["bytes", "variance_ratio", "d_res"], ascending=[True, False, True], kind="stable"
    )
    return ok.iloc[0].to_dict()


def baseline_cell(grid: pd.DataFrame, cfg: dict | None = None) -> dict:
    s = settings(cfg)
    vr0, d0 = s["baseline"]
    b = grid[(np.abs(grid["variance_ratio"] - vr0) < 1e-6) & (grid["d_res"] == d0)]
    return b.iloc[0].to_dict()


def verdict(grid: pd.DataFrame, cfg: dict | None = None) -> str:
    """One plain sentence generated from the grid."""
    s = settings(cfg)
    base = baseline_cell(grid, s)
    best = best_accept(grid)
    vr0, d0 = s["baseline"]
    cheaper = grid[grid["bytes"] < base["bytes"]]
    thr = f"{(s['accept'] - 1) * 100:.0f}%"
    if best is None:
        return (
            f"No cell stays within the ACCEPT threshold (mean {s['metric']} inflation <= "
            f"{s['accept']:.2f}); not even the baseline itself, so the grid is inconclusive."
        )
    if abs(best["variance_ratio"] - vr0) < 1e-6 and best["d_res"] == d0:
        lowest = cheaper.sort_values("mean_inflation").iloc[0] if len(cheaper) else None
        tail = (
            f" The least-inflating cheaper cell, ({lowest['variance_ratio']:.2f}, "
            f"{int(lowest['d_res'])}), inflates K {s['metric']} {lowest['mean_inflation']:.2f}x "
            f"({lowest['mark']})."
            if lowest is not None
            else ""
        )
        return (
            f"Keep the baseline (variance_ratio {vr0:.2f}, d_res {d0}): no cell that stores fewer "
            f"K bytes keeps the mean K {s['metric']} inflation within {thr}.{tail}"
        )
    saving = 1 - best["bytes"] / base["bytes"]
    if saving > 0:
        return (
            f"Adopt (variance_ratio {best['variance_ratio']:.2f}, d_res {int(best['d_res'])}): it "
            f"keeps the mean K {s['metric']} inflation at {best['mean_inflation']:.2f}x (<= "
            f"{s['accept']:.2f}) and stores {saving * 100:.1f}% fewer K bytes than the baseline "
            f"({best['mean_ratio']:.2f}x vs {base['mean_ratio']:.2f}x)."
        )
    return (
        f"Keep the baseline (variance_ratio {vr0:.2f}, d_res {d0}): the accepted cells that "
        f"lower the error all store more K bytes (best by bytes: ({best['variance_ratio']:.2f}, "
        f"{int(best['d_res'])}), {best['mean_ratio']:.2f}x vs {base['mean_ratio']:.2f}x)."
    )
