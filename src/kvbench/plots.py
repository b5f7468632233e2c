"""Report figures (matplotlib Agg, PNG, deterministic: fixed size/dpi, no Software/date metadata).

- ``ratio_vs_ctx_{model}.png``: total and full-attention ratio vs context, one line per codec;
  measured points solid, projections dashed (hollow markers where bytes are estimated).
- ``rate_distortion_{k,v}.png``: bits per value vs mean relative MSE over the layers each codec
  compresses, one panel per model at its error context, Pareto frontier drawn as a step line.
- ``layer_error_{model}.png``: per-layer relative MSE heatmap (codec x layer), K and V panels;
  layers a codec passes through are blank.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.report import (
    codec_order,
    error_ctx,
    figure_names,
    fmt_ctx,
    model_order,
    pareto_front,
    report_settings,
)
from kvbench.shards import atomic_write_bytes

PNG_METADATA = {"Software": None}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.titlesize": 10,
            "legend.fontsize": 8,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "svg.hashsalt": "kvbench",
        }
    )
    return plt


def codec_colors(codecs: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {c: cmap(i % 20) for i, c in enumerate(codecs)}


def _save(fig, path: str | Path, dpi: int) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_ratio_vs_ctx(extrap: pd.DataFrame, model: str, cfg: dict, path, dpi: int = 110) -> None:
    plt = _plt()
    e = extrap[extrap["model"] == model]
    codecs = codec_order(cfg, e["codec"])
    colors = codec_colors(codec_order(cfg, extrap["codec"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, metric, title in zip(
        axes,
        ("total_ratio", "full_ratio"),
        ("total ratio (all cached layers)", "full-attention ratio"),
        strict=True,
    ):
        for c in codecs:
            g = e[e["codec"] == c].sort_values("ctx")
            meas = g[g["source"] == "measured"]
            proj = g[g["source"] == "extrapolated"]
            col = colors[c]
            ax.plot(meas["ctx"], meas[metric], "-o", color=col, ms=4, label=c)
            if len(proj):
                link = pd.concat([meas.tail(1), proj])
                ax.plot(link["ctx"], link[metric], "--", color=col, lw=1)
                ex = proj[proj["exact"]]
                est = proj[~proj["exact"]]
                ax.plot(ex["ctx"], ex[metric], "o", color=col, ms=4)
                ax.plot(est["ctx"], est[metric], "o", mfc="white", mec=col, ms=4)
        ax.set_xscale("log", base=2)
        ctxs = sorted(e["ctx"].unique())
        ax.set_xticks(ctxs)
        ax.set_xticklabels([fmt_ctx(c) for c in ctxs])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("bf16 bytes / stored bytes")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(
        f"{model}: compression ratio vs context (solid: measured; dashed: projected, "
        "hollow = estimated bytes)",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path, dpi)


def plot_rate_distortion(
    summary: pd.DataFrame, stream: str, cfg: dict, path, dpi: int = 110
) -> None:
    plt = _plt()
    r = report_settings(cfg)
    models = model_order(cfg, summary["model"])
    colors = codec_colors(codec_order(cfg, summary["codec"]))
    n = len(models)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False, layout="constrained"
    )
    xcol, ycol = f"{stream}_bpv_compressed", f"{stream}_rel_mse_mean"
    for i, model in enumerate(models):
        ax = axes[i // cols][i % cols]
        ctx = error_ctx(summary, cfg, model)
        s = summary[(summary["model"] == model) & (summary["ctx"] == ctx)]
        s = s[~s["codec"].isin(r["exclude_from_wins"])]
        s = s[(s[ycol] > 0) & s[xcol].notna()]
        front = pareto_front(list(zip(s["codec"], s[xcol], s[ycol], strict=True)))
        seen: dict[tuple[float, float], int] = {}
        for c in codec_order(cfg, s["codec"]):
            row = s[s["codec"] == c].iloc[0]
            on = c in front
            xy = (float(row[xcol]), float(row[ycol]))
            dup = seen.get(xy, 0)  # identical points (e.g. a split's K = its K codec): rings
            seen[xy] = dup + 1
            ax.plot(
                *xy,
                "o",
                color=colors[c],
                ms=7 + 5 * dup,
                mfc="none" if dup else colors[c],
                mec=colors[c] if dup or not on else "black",
                mew=2.0 if dup else 1.0,
                label=c,
            )
        f = s[s["codec"].isin(front)].sort_values(xcol)
        if len(f):
            ax.step(f[xcol], f[ycol], where="post", color="black", lw=1, alpha=0.6, zorder=0)
        ax.set_yscale("log")
        ax.set_xlabel("bits per value (compressed layers)")
        ax.set_ylabel(f"mean relative MSE ({stream.upper()})")
        ax.set_title(f"{model}, ctx {fmt_ctx(ctx)}")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    labels = codec_order(cfg, handles)
    fig.legend(
        [handles[k] for k in labels],
        labels,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )
    fig.suptitle(
        f"Rate-distortion, {stream.upper()} stream (black edge and step line: Pareto frontier)",
        fontsize=10,
    )
    _save(fig, path, dpi)


def plot_layer_error(
    metrics: pd.DataFrame, summary: pd.DataFrame, model: str, cfg: dict, path, dpi: int = 110
) -> None:
    plt = _plt()
    r = report_settings(cfg)
    ctx = error_ctx(summary, cfg, model)
    m = metrics[(metrics["model"] == model) & (metrics["ctx"] == ctx)]
    m = m[~m["codec"].isin(r["exclude_from_wins"])]
    codecs = codec_order(cfg, m["codec"])
    layers = sorted(m["layer"].unique())
    grids = {}
    for stream in ("k", "v"):
        g = np.full((len(codecs), len(layers)), np.nan)
        sm = m[(m["stream"] == stream) & m["compressed"]]
        for ci, c in enumerate(codecs):
            rows = sm[sm["codec"] == c].set_index("layer")["rel_mse"]
            for li, layer in enumerate(layers):
                v = rows.get(layer, np.nan)
                g[ci, li] = math.log10(v) if v and v > 0 else np.nan
        grids[stream] = g
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-6.0, 0.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    width = min(5 + 0.3 * len(layers), 14)
    kinds = m.drop_duplicates("layer").set_index("layer")["layer_type"]
    ticks = [f"{la}{'s' if kinds.get(la) == 'sliding' else ''}" for la in layers]
    height = 1.4 + 2 * (0.5 + 0.3 * len(codecs))
    fig, axes = plt.subplots(2, 1, figsize=(width, height), squeeze=False, layout="constrained")
    im = None
    for ax, stream in zip(axes[:, 0], ("k", "v"), strict=True):
        ax.grid(False)
        im = ax.imshow(
            grids[stream],
            aspect="auto",
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_yticks(range(len(codecs)))
        ax.set_yticklabels(codecs)
        step = max(1, math.ceil(len(layers) / 32))
        ax.set_xticks(range(0, len(layers), step))
        ax.set_xticklabels([ticks[i] for i in range(0, len(layers), step)], fontsize=7)
        ax.set_title(f"{stream.upper()}: log10 relative MSE (blank = passed through)")
    axes[-1, 0].set_xlabel("layer (s = sliding window)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01)
    fig.suptitle(f"{model}, ctx {fmt_ctx(ctx)}: per-layer error", fontsize=10)
    _save(fig, path, dpi)


def make_figures(
    summary: pd.DataFrame,
    metrics: pd.DataFrame,
    extrap: pd.DataFrame,
    cfg: dict,
    out_dir: str | Path,
) -> list[Path]:
    """Every report figure into ``out_dir``; returns the paths (names from ``figure_names``)."""
    out_dir = Path(out_dir)
    dpi = int(report_settings(cfg)["figure_dpi"])
    models = model_order(cfg, summary["model"])
    names = figure_names(models)
    paths = []
    for model, name in zip(models, names["ratio"], strict=True):
        plot_ratio_vs_ctx(extrap, model, cfg, out_dir / name, dpi)
        paths.append(out_dir / name)
    for stream, name in zip(("k", "v"), names["rd"], strict=True):
        plot_rate_distortion(summary, stream, cfg, out_dir / name, dpi)
        paths.append(out_dir / name)
    for model, name in zip(models, names["heatmap"], strict=True):
        plot_layer_error(metrics, summary, model, cfg, out_dir / name, dpi)
        paths.append(out_dir / name)
    return paths
