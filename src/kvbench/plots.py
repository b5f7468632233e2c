"""Report figures (matplotlib Agg, PNG, deterministic: fixed size/dpi, no Software/date metadata).

- ``ratio_vs_ctx_{model}.png``: total and full-attention ratio vs context, one line per codec;
  measured points solid, projections dashed (hollow markers where bytes are estimated).
- ``rate_distortion_{k,v}.png``: bits per value vs mean relative MSE over the layers each codec
  compresses, one panel per model at its error context, Pareto frontier drawn as a step line.
- ``layer_error_{model}.png``: per-layer relative MSE heatmap (codec x layer), K and V panels;
  layers a codec passes through are blank.
- ``rate_vs_dppl.png``: bits per value (every cached layer, as stored) vs relative ΔPPL of the
  continuation runs, log scale, one labelled point per codec, one panel per model; error bars
  are ±1 s.e. of ΔNLL, dashed lines the ``quality.thresholds`` ΔPPL levels. Drawn (as a note)
  also when there are no continuation tables, so the rule's outputs do not depend on them.
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
    quality_thresholds,
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


#: Relative ΔPPL values at or below this are drawn on the floor (log axis; identity gives 0).
DPPL_FLOOR = 1e-4
CTX_MARKERS = "osD^v<>"


def plot_rate_vs_dppl(cells: pd.DataFrame | None, cfg: dict, path, dpi: int = 110) -> None:
    """``cells``: :func:`kvbench.report.quality_cells` (None or empty: a note is drawn)."""
    plt = _plt()
    r = report_settings(cfg)
    c = None if cells is None else cells[~cells["codec"].isin(r["exclude_from_wins"])]
    c = None if c is None else c.dropna(subset=["bits_per_value", "delta_ppl_rel"])
    if c is None or c.empty:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "No continuation (delta-PPL) tables in this run\n(config quality.codecs)",
            ha="center",
            va="center",
        )
        _save(fig, path, dpi)
        return
    models = model_order(cfg, c["model"])
    # the same colour per codec as the other figures (configured order)
    colors = codec_colors(codec_order(cfg, [*(cfg.get("codecs") or {}), *c["codec"]]))
    ctxs = sorted(c["ctx"].unique())
    marker = {x: CTX_MARKERS[i % len(CTX_MARKERS)] for i, x in enumerate(ctxs)}
    th = quality_thresholds(cfg)
    n = len(models)
    fig, axes = plt.subplots(
        1, n, figsize=(4.8 * n, 4.2), squeeze=False, sharey=True, layout="constrained"
    )
    y_all = np.maximum(c["delta_ppl_rel"].to_numpy(float), DPPL_FLOOR)
    ymax = max(float(y_all.max()), th["marginal"]["delta_ppl"]) * 3
    ybottom = min(float(y_all.min()), th["accept"]["delta_ppl"]) / 4
    for ax, model in zip(axes[0], models, strict=True):
        g = c[c["model"] == model]
        for x in g.to_dict("records"):
            d = float(x["delta_ppl_rel"])
            y = max(d, DPPL_FLOOR)
            col = colors[x["codec"]]
            on_floor = d <= DPPL_FLOOR
            se = x.get("delta_nll_se")
            dnll = x.get("delta_nll")
            if se is not None and dnll is not None and np.isfinite(se) and np.isfinite(dnll):
                lo = max(math.expm1(dnll - se), DPPL_FLOOR)
                hi = max(math.expm1(dnll + se), DPPL_FLOOR)
                ax.plot([x["bits_per_value"]] * 2, [lo, hi], "-", color=col, lw=1.2, alpha=0.7)
            ax.plot(
                x["bits_per_value"],
                y,
                marker[x["ctx"]],
                color=col,
                ms=8,
                mfc="white" if on_floor else col,
                mec="black" if x["quality_verdict"] == "ACCEPT" else col,
                mew=1.2,
            )
            label = x["codec"] + (f" @{fmt_ctx(x['ctx'])}" if len(ctxs) > 1 else "")
            if on_floor:
                label += f" (ΔPPL ≤ {DPPL_FLOOR:g})"
            ax.annotate(
                label,
                (x["bits_per_value"], y),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize=8,
                color="black",
            )
        for level, ls in (("accept", "--"), ("marginal", ":")):
            v = th[level]["delta_ppl"]
            ax.axhline(v, color="grey", ls=ls, lw=1)
            ax.annotate(
                f"{level} ΔPPL ≤ {100 * v:g}%",
                (0.01, v),
                xycoords=("axes fraction", "data"),
                xytext=(0, 2),
                textcoords="offset points",
                fontsize=7,
                color="grey",
            )
        ax.set_yscale("log")
        ax.set_ylim(ybottom, ymax)
        xs = g["bits_per_value"].to_numpy(float)
        ax.set_xlim(max(0.0, xs.min() - 1), xs.max() + 2.5)
        ax.set_xlabel("bits per value (all cached layers, as stored)")
        ax.set_title(f"{model}, ctx {', '.join(fmt_ctx(x) for x in sorted(g['ctx'].unique()))}")
    axes[0][0].set_ylabel("relative ΔPPL vs uncompressed cache")
    if len(ctxs) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker=marker[x], color="grey") for x in ctxs]
        fig.legend(handles, [fmt_ctx(x) for x in ctxs], loc="outside right center", frameon=False)
    fig.suptitle(
        "Rate vs continuation quality (bars: ±1 s.e. of ΔNLL; black edge: KL/ΔPPL ACCEPT; "
        "identity omitted)",
        fontsize=10,
    )
    _save(fig, path, dpi)


def make_figures(
    summary: pd.DataFrame,
    metrics: pd.DataFrame,
    extrap: pd.DataFrame,
    cfg: dict,
    out_dir: str | Path,
    quality_cells: pd.DataFrame | None = None,
) -> list[Path]:
    """Every report figure into ``out_dir``; returns the paths (names from ``figure_names``).

    ``quality_cells``: :func:`kvbench.report.quality_cells` for ``rate_vs_dppl.png``."""
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
    for name in names["rate_dppl"]:
        plot_rate_vs_dppl(quality_cells, cfg, out_dir / name, dpi)
        paths.append(out_dir / name)
    return paths
