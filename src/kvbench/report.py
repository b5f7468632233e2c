"""SUMMARY.md and DECISION.md from the result tables (Jinja2 templates in ``kvbench/templates``).

Everything shown is computed here from the Parquet tables (summary, metrics, extrapolation,
ablation, optional quality and timing tables) and the capture manifests; the templates only lay
out pre-formatted strings. Statements such as "turbo3 beats kakeya on total ratio in 6/6 cells"
are generated from the numbers, and each carries the structured data it was generated from
(``Statement``) so tests can recompute it.

Claims (config ``claims:``, a mapping ``id -> {claim, type, params}``) are checked by type:

``compare``
    per (model, ctx) cell, the best of codec group ``a`` vs the best of group ``b`` on a summary
    or extrapolation ``metric`` (``better: higher|lower``, optional ``min_factor``); filters
    ``ctx`` (list), ``ctx_min``, ``ctx_max``, ``models``; ``source: measured|extrapolated``
    (extrapolated = the extrapolation table, measured rows included); ``legacy: [conventions]``
    re-evaluates with each codec's first available legacy ratio, for comparison only.
``error_compare``
    per (model, ctx) cell, ``mean(metric of b) / mean(metric of a)`` over the layers *both* codecs
    compressed on ``stream`` (apples to apples); passes when >= ``min_factor`` (``max_factor`` is
    reported, not enforced).
``threshold``
    per model at the filtered contexts, the best of ``codecs`` on ``metric`` must be >= ``min``
    (and <= ``max`` when given, reported only).

Status: ``confirmed`` (every cell passes), ``refuted`` (some cell fails) or ``not testable here``
(no cell has the data: codecs or contexts missing from this run).

Verdicts (issue #5). Each (model, ctx, codec) with a continuation table gets two verdicts:

``MSE verdict``
    from the mean relative MSE over the layers the codec compresses, K and V separately, the
    worse of the two: ACCEPT when both are within ``report.mse_thresholds.accept`` (default: the
    error budget ``report.budget``, so ACCEPT = "within the budget" of the codec choice),
    MARGINAL within ``report.mse_thresholds.marginal`` (default: twice the accept levels), else
    REJECT. Keys: ``{accept|marginal: {k_rel_mse: .., v_rel_mse: ..}}``.
``KL/ΔPPL verdict``
    :func:`kvbench.quality.quality_verdict` with ``quality.thresholds`` (mean next-token KL and
    relative ΔPPL, the worse of the two).

DECISION.md flags every cell where the two differ ("MSE optimistic": the MSE verdict is the
better one; "MSE pessimistic": the worse one). Ablation cells have MSE-inflation verdicts only
(no continuation is run per cell).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.errors import KvbenchError

TEMPLATES = Path(__file__).parent / "templates"
NA = "–"

REPORT_DEFAULTS: dict[str, Any] = {
    "headline_ctx": [32768, 131072],
    "extrapolate_ctx": [16384, 32768, 65536, 131072],
    "error_ctx": None,  # None = the largest measured context of each model
    "pairs": [["turbo3", "kakeya"], ["turbo4", "kakeya"], ["turbo3", "kakeyaturbo"]],
    "budget": {"k_rel_mse": 0.05, "v_rel_mse": 0.05},
    # MSE verdict levels; None: accept = budget, marginal = 2 x accept (see the module docstring)
    "mse_thresholds": None,
    "exclude_from_wins": ["identity"],
    "figure_dpi": 110,
}
#: marginal = this factor x accept when ``report.mse_thresholds.marginal`` is not given
MSE_MARGINAL_FACTOR = 2.0
VERDICTS = ("ACCEPT", "MARGINAL", "REJECT")


def report_settings(cfg: dict | None) -> dict[str, Any]:
    r = {**REPORT_DEFAULTS, **((cfg or {}).get("report") or {})}
    r["budget"] = {**REPORT_DEFAULTS["budget"], **(r.get("budget") or {})}
    mt = r.get("mse_thresholds") or {}
    accept = {**r["budget"], **(mt.get("accept") or {})}
    marginal = {k: MSE_MARGINAL_FACTOR * float(v) for k, v in accept.items()}
    marginal.update(mt.get("marginal") or {})
    r["mse_thresholds"] = {
        "accept": {k: float(v) for k, v in accept.items()},
        "marginal": {k: float(v) for k, v in marginal.items()},
    }
    return r


def quality_thresholds(cfg: dict | None) -> dict[str, dict[str, float]]:
    """``quality.thresholds`` of the config over kvbench.quality's defaults, level by level."""
    from kvbench.quality import DEFAULT_THRESHOLDS

    given = ((cfg or {}).get("quality") or {}).get("thresholds") or {}
    return {
        level: {**DEFAULT_THRESHOLDS[level], **(given.get(level) or {})}
        for level in ("accept", "marginal")
    }


# ---------------------------------------------------------------------------------------------
# formatting


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x)


def fmt_ratio(x, digits: int = 2) -> str:
    return NA if _nan(x) else f"{float(x):.{digits}f}×"


def fmt_err(x) -> str:
    if _nan(x):
        return NA
    return "0" if float(x) == 0 else f"{float(x):.2e}"


def fmt_num(x, digits: int = 2) -> str:
    return NA if _nan(x) else f"{float(x):.{digits}f}"


def fmt_mib(n) -> str:
    return NA if _nan(n) else f"{float(n) / 2**20:.2f} MiB"


def fmt_ctx(c: int) -> str:
    c = int(c)
    return f"{c // 1024}k" if c % 1024 == 0 and c >= 1024 else str(c)


def fmt_pct(x) -> str:
    return NA if _nan(x) else f"{100 * float(x):.1f}%"


def ctx_span(ctxs: Iterable[int]) -> str:
    c = sorted({int(x) for x in ctxs})
    if not c:
        return NA
    return fmt_ctx(c[0]) if len(c) == 1 else f"{fmt_ctx(c[0])}–{fmt_ctx(c[-1])}"


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)  # "l" | "r" per column

    def __post_init__(self):
        if not self.align:
            self.align = ["l"] * len(self.head)

    def md(self) -> str:
        """GitHub-flavoured Markdown (``|`` inside cells escaped), no trailing newline."""

        def esc(x) -> str:
            return str(x).replace("|", "\\|")

        lines = [
            "| " + " | ".join(esc(h) for h in self.head) + " |",
            "|" + "|".join("---:" if a == "r" else ":---" for a in self.align) + "|",
        ]
        lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines)


@dataclass
class Statement:
    text: str
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# ordering


def codec_order(cfg: dict, present: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(present))
    order = [c for c in (cfg.get("codecs") or {}) if c in present]
    return order + sorted(c for c in present if c not in order)


def model_order(cfg: dict, present: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(present))
    order = [m for m in (cfg.get("models") or {}) if m in present]
    return order + sorted(m for m in present if m not in order)


# ---------------------------------------------------------------------------------------------
# method & environment


def environment(
    manifests: list[dict], machine: dict | None = None, order: list[str] | None = None
) -> dict[str, Any]:
    """Models, corpus, seeds, versions from the capture manifests (+ the rendering machine).

    ``order``: model order of the other tables (the rest follow by name)."""
    by_model: dict[str, list[dict]] = {}
    for m in manifests:
        by_model.setdefault(str(m.get("model")), []).append(m)
    rank = {m: i for i, m in enumerate(order or [])}
    rows = []
    corpus_rows = []
    versions: dict[str, set] = {}
    seeds, corpora, attn = set(), set(), set()
    for model in sorted(by_model, key=lambda m: (rank.get(m, len(rank)), m)):
        ms = sorted(by_model[model], key=lambda m: int(m.get("ctx", 0)))
        m0 = ms[-1]
        layers = m0.get("layers") or []
        n_full = sum(1 for e in layers if e.get("type") == "full")
        n_slide = sum(1 for e in layers if e.get("type") == "sliding")
        windows = sorted({e.get("sliding_window") for e in layers if e.get("sliding_window")})
        l0 = layers[0] if layers else {}
        src = m0.get("source") or {}
        if isinstance(src, dict):
            where = src.get("hf_id") or src.get("gguf_file") or src.get("path") or ""
            rev = src.get("resolved_revision") or src.get("revision") or ""
            source = " ".join(x for x in (str(src.get("source", "")), where, rev) if x)
        else:
            source = str(src)
        sha = m0.get("weights_sha256") or (
            src.get("weights_sha256") if isinstance(src, dict) else None
        )
        head_dims = sorted({int(e.get("head_dim", 0)) for e in layers})
        rows.append(
            [
                model,
                str(m0.get("architecture", NA)),
                source or NA,
                f"`{sha[:12]}`" if sha else NA,
                str(m0.get("dtype", NA)),
                f"{n_full} full + {n_slide} sliding"
                + (f" (window {', '.join(map(str, windows))})" if windows else ""),
                f"{l0.get('n_heads', NA)} / {l0.get('n_kv', NA)}",
                "/".join(map(str, head_dims)) or NA,
                ", ".join(fmt_ctx(m["ctx"]) for m in ms),
            ]
        )
        for m in ms:
            c = m.get("corpus") or {}
            corpora.add(str(c.get("name", NA)))
            tok = c.get("token_ids_sha256") or c.get("sha256")
            corpus_rows.append(
                [model, fmt_ctx(m["ctx"]), str(c.get("name", NA)), f"`{tok[:12]}`" if tok else NA]
            )
            if m.get("seed") is not None:
                seeds.add(str(m["seed"]))
            if m.get("attn_implementation"):
                attn.add(str(m["attn_implementation"]))
            for k, v in (m.get("versions") or {}).items():
                versions.setdefault(k, set()).add(str(v))
    return {
        "models": Table(
            [
                "model",
                "architecture",
                "weights",
                "sha256",
                "dtype",
                "cached layers",
                "q / kv heads",
                "head_dim",
                "contexts",
            ],
            rows,
        ),
        "corpus": Table(["model", "ctx", "corpus", "token ids sha256"], corpus_rows),
        "corpora": ", ".join(sorted(corpora)) or NA,
        "seeds": ", ".join(sorted(seeds)) or NA,
        "attn": ", ".join(sorted(attn)) or NA,
        "versions": ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items()))
        or NA,
        "machine": machine or {},
    }


def machine_info() -> dict[str, str]:
    """The machine that renders the report (captures/compression may have run elsewhere)."""
    import os

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
    }


# ---------------------------------------------------------------------------------------------
# ratio tables


def ratio_table(summary: pd.DataFrame, cfg: dict, metric: str = "total_ratio") -> Table:
    """Rows model x ctx, one column per codec; the best non-excluded codec in bold."""
    r = report_settings(cfg)
    codecs = codec_order(cfg, summary["codec"])
    rows = []
    for model in model_order(cfg, summary["model"]):
        sm = summary[summary["model"] == model]
        for ctx in sorted(sm["ctx"].unique()):
            s = sm[sm["ctx"] == ctx].set_index("codec")[metric]
            cand = s.drop([c for c in r["exclude_from_wins"] if c in s.index]).dropna()
            best = cand.idxmax() if len(cand) else None
            cells = []
            for c in codecs:
                v = s.get(c, math.nan)
                txt = fmt_ratio(v)
                cells.append(f"**{txt}**" if c == best else txt)
            rows.append([model, fmt_ctx(ctx), *cells])
    return Table(["model", "ctx", *codecs], rows, ["l", "r"] + ["r"] * len(codecs))


def extrapolated_table(extrap: pd.DataFrame, cfg: dict, metric: str = "total_ratio") -> Table:
    """Rows model x headline ctx, one column per codec; ``~`` marks estimated bytes."""
    r = report_settings(cfg)
    codecs = codec_order(cfg, extrap["codec"])
    rows = []
    for model in model_order(cfg, extrap["model"]):
        em = extrap[extrap["model"] == model]
        for ctx in r["headline_ctx"]:
            e = em[em["ctx"] == int(ctx)].set_index("codec")
            if e.empty:
                continue
            cells = []
            for c in codecs:
                if c not in e.index:
                    cells.append(NA)
                    continue
                row = e.loc[c]
                txt = fmt_ratio(row[metric])
                if row["source"] == "extrapolated" and not bool(row["exact"]):
                    txt = "~" + txt
                cells.append(txt)
            src = sorted(set(e["source"]))
            basis = (
                "measured" if src == ["measured"] else f"from {fmt_ctx_list(e['from_ctx'].iloc[0])}"
            )
            rows.append([model, fmt_ctx(ctx), *cells, basis])
    return Table(["model", "ctx", *codecs, "basis"], rows, ["l", "r"] + ["r"] * len(codecs) + ["l"])


def extrapolation_methods(extrap: pd.DataFrame, cfg: dict) -> Table:
    """How each codec's projection was obtained, and the share of estimated bytes."""
    r = report_settings(cfg)
    e = extrap[(extrap["source"] == "extrapolated") & extrap["ctx"].isin(r["headline_ctx"])]
    from kvbench.codecs.base import BYTE_FIELDS

    rows = []
    for codec in codec_order(cfg, e["codec"]):
        g = e[e["codec"] == codec]
        parts = []
        for f in BYTE_FIELDS:
            ms = sorted({m for v in g[f"method_{f}"] for m in str(v).split("/")} - {"zero", ""})
            if ms:
                parts.append(f"{f}: {'/'.join(ms)}")
        methods = "; ".join(parts) or "zero"
        rows.append(
            [
                codec,
                "yes" if g["exact"].all() else "no",
                fmt_pct(g["estimated_fraction"].max()),
                methods,
            ]
        )
    return Table(
        ["codec", "exact", "max estimated share", "method per byte category"],
        rows,
        ["l", "l", "r", "l"],
    )


def extrapolation_check(metrics: pd.DataFrame, cfg: dict) -> tuple[Table | None, str]:
    """Predict each model's longest measured context from the shorter ones; compare."""
    from kvbench.extrapolate import validate

    parts = []
    for model in sorted(metrics["model"].unique()):
        ctxs = sorted(metrics.loc[metrics["model"] == model, "ctx"].unique())
        if len(ctxs) < 3:
            continue
        mm = metrics[metrics["model"] == model]
        parts.append(validate(mm, ctxs[:-1], int(ctxs[-1]), cfg.get("codecs") or {}))
    if not parts:
        return None, (
            "not run: no model has three or more measured contexts (two to fit, one to check)"
        )
    v = pd.concat(parts, ignore_index=True)
    rows = []
    for codec in codec_order(cfg, v["codec"]):
        g = v[v["codec"] == codec]
        rows.append(
            [
                codec,
                ", ".join(
                    sorted(
                        {
                            f"{m}: {fmt_ctx_list(f)} → {fmt_ctx(t)}"
                            for m, f, t in zip(g["model"], g["fit_ctx"], g["ctx"], strict=True)
                        }
                    )
                ),
                "yes" if g["exact"].all() else "no",
                fmt_pct(g["rel_err_bytes"].abs().max()),
                fmt_num(g["abs_err_ratio"].max(), 4),
            ]
        )
    worst = v["abs_err_ratio"].max()
    note = (
        f"largest error in total ratio over {len(v)} cells: {fmt_num(worst, 4)}; every "
        "projection labelled exact reproduced the measurement to the byte"
        if (v.loc[v["exact"], "rel_err_bytes"] == 0).all()
        else f"largest error in total ratio over {len(v)} cells: {fmt_num(worst, 4)}; "
        "WARNING: a projection labelled exact missed its measurement"
    )
    return (
        Table(
            ["codec", "fit → check", "exact", "max |bytes error|", "max |Δ total ratio|"],
            rows,
            ["l", "l", "l", "r", "r"],
        ),
        note,
    )


def fmt_ctx_list(s: str) -> str:
    return "+".join(fmt_ctx(int(c)) for c in str(s).split(",") if c)


# ---------------------------------------------------------------------------------------------
# errors


def error_ctx(summary: pd.DataFrame, cfg: dict, model: str) -> int:
    r = report_settings(cfg)
    ctxs = sorted(summary.loc[summary["model"] == model, "ctx"].unique())
    want = r.get("error_ctx")
    return int(want) if want is not None and int(want) in ctxs else int(ctxs[-1])


def error_tables(summary: pd.DataFrame, cfg: dict) -> list[dict]:
    """Per model: mean rel. MSE over compressed layers (K, V), worst layer, IP error, cosine."""
    out = []
    for model in model_order(cfg, summary["model"]):
        ctx = error_ctx(summary, cfg, model)
        s = summary[(summary["model"] == model) & (summary["ctx"] == ctx)].set_index("codec")
        rows = []
        for c in codec_order(cfg, s.index):
            x = s.loc[c]
            rows.append(
                [
                    c,
                    f"{int(x['k_n_compressed'])}/{int(x['v_n_compressed'])}",
                    fmt_err(x["k_rel_mse_mean"]),
                    _worst(x, "k"),
                    fmt_err(x["k_ip_rel_err_mean"]),
                    fmt_num(x["k_cos_sim_mean"], 4),
                    fmt_err(x["v_rel_mse_mean"]),
                    _worst(x, "v"),
                    fmt_num(x["v_cos_sim_mean"], 4),
                ]
            )
        out.append(
            {
                "model": model,
                "ctx": fmt_ctx(ctx),
                "table": Table(
                    [
                        "codec",
                        "layers K/V",
                        "K rel. MSE",
                        "K worst layer",
                        "K q·k rel. err",
                        "K cos",
                        "V rel. MSE",
                        "V worst layer",
                        "V cos",
                    ],
                    rows,
                    ["l", "r", "r", "l", "r", "r", "r", "l", "r"],
                ),
            }
        )
    return out


def _worst(x, stream: str) -> str:
    layer = int(x[f"{stream}_worst_layer"])
    if layer < 0:
        return NA
    kind = x.get(f"{stream}_worst_layer_type", "")
    kind = f" ({kind})" if kind and kind != "full" else ""
    return f"L{layer}{kind}: {fmt_err(x[f'{stream}_worst_rel_mse'])}"


# ---------------------------------------------------------------------------------------------
# generated statements


def _cells(summary: pd.DataFrame) -> list[tuple[str, int]]:
    return sorted({(m, int(c)) for m, c in zip(summary["model"], summary["ctx"], strict=True)})


def _span_text(summary: pd.DataFrame) -> str:
    n_models = summary["model"].nunique()
    return f"{n_models} model{'s' if n_models != 1 else ''} × ctx {ctx_span(summary['ctx'])}"


METRIC_TEXT = {
    "total_ratio": ("total ratio", "higher"),
    "full_ratio": ("full-attention ratio", "higher"),
    "k_rel_mse_mean": ("K rel. MSE", "lower"),
    "v_rel_mse_mean": ("V rel. MSE", "lower"),
    "k_ip_rel_err_mean": ("K q·k rel. error", "lower"),
}


def win_statements(summary: pd.DataFrame, cfg: dict) -> list[Statement]:
    """Which codec is best per cell, counted over cells, for ratio and K/V error."""
    r = report_settings(cfg)
    s = summary[~summary["codec"].isin(r["exclude_from_wins"])]
    out = []
    cells = _cells(s)
    for metric in ("total_ratio", "full_ratio", "k_rel_mse_mean", "v_rel_mse_mean"):
        label, better = METRIC_TEXT[metric]
        wins: dict[str, int] = {}
        n = 0
        for model, ctx in cells:
            g = s[(s["model"] == model) & (s["ctx"] == ctx)].set_index("codec")[metric].dropna()
            if g.empty:
                continue
            n += 1
            best = g.idxmax() if better == "higher" else g.idxmin()
            wins[best] = wins.get(best, 0) + 1
        if not n:
            continue
        ranked = sorted(wins.items(), key=lambda kv: (-kv[1], kv[0]))
        lead, k = ranked[0]
        others = ", ".join(f"{c} {w}/{n}" for c, w in ranked[1:])
        word = "highest" if better == "higher" else "lowest"
        text = f"**{lead}** has the {word} {label} in {k}/{n} cells ({_span_text(s)})"
        text += f"; also best: {others}." if others else "."
        out.append(Statement(text, {"metric": metric, "wins": dict(ranked), "cells": n}))
    return out


def _common_layer_errors(metrics: pd.DataFrame, a: str, b: str, stream: str) -> pd.DataFrame:
    """Per (model, ctx): mean rel. MSE of ``a`` and ``b`` over the layers both compress."""
    m = metrics[
        (metrics["stream"] == stream)
        & metrics["compressed"].astype(bool)
        & metrics["codec"].isin([a, b])
    ]
    piv = m.pivot_table(
        index=["model", "ctx", "layer"], columns="codec", values="rel_mse", aggfunc="first"
    )
    if a not in piv.columns or b not in piv.columns:
        return pd.DataFrame(columns=[a, b])
    return piv[[a, b]].dropna().groupby(level=["model", "ctx"]).mean()


def _advantage(fac: np.ndarray, b: str) -> str:
    fac = fac[np.isfinite(fac) & (fac > 0)]
    if not len(fac):
        return ""
    lo, hi = float(fac.min()), float(fac.max())
    if lo >= 1:
        return f" (advantage {fmt_num(lo)}–{fmt_num(hi)}×)"
    if hi <= 1:
        return f" ({b} better by {fmt_num(1 / hi)}–{fmt_num(1 / lo)}×)"
    return f" (advantage {fmt_num(lo)}–{fmt_num(hi)}×; below 1: {b} better)"


def pair_statements(
    summary: pd.DataFrame, cfg: dict, metrics: pd.DataFrame | None = None
) -> list[Statement]:
    """For each configured pair (a, b): in how many cells a beats b, per metric.

    With ``metrics``, the K/V rel. MSE of a cell is the mean over the layers *both* codecs
    compress (apples to apples: Kakeya skips sliding layers that TurboQuant compresses);
    otherwise each codec's own summary mean."""
    r = report_settings(cfg)
    out = []
    for a, b in r["pairs"]:
        sa = summary[summary["codec"] == a].set_index(["model", "ctx"])
        sb = summary[summary["codec"] == b].set_index(["model", "ctx"])
        common = sa.index.intersection(sb.index)
        if not len(common):
            continue
        parts, data = [], {"a": a, "b": b, "cells": len(common)}
        for metric in ("total_ratio", "k_rel_mse_mean", "v_rel_mse_mean"):
            label, better = METRIC_TEXT[metric]
            if metric != "total_ratio" and metrics is not None:
                e = _common_layer_errors(metrics, a, b, metric[0]).reindex(common)
                va, vb = e[a], e[b]
            else:
                va, vb = sa.loc[common, metric], sb.loc[common, metric]
            ok = (va > vb) if better == "higher" else (va < vb)
            both = va.notna() & vb.notna()
            k, n = int((ok & both).sum()), int(both.sum())
            data[metric] = (k, n)
            if n:
                if better == "higher":
                    fac = (va[both] / vb[both]).to_numpy(float)
                else:
                    fac = (vb[both] / va[both]).to_numpy(float)
                parts.append(f"on {label} in {k}/{n}{_advantage(fac, b)}")
        cells = summary.set_index(["model", "ctx"]).loc[common].reset_index()
        text = f"**{a}** beats **{b}** " + ", ".join(parts) + f" of the cells ({_span_text(cells)}"
        text += "; errors over the layers both compress)." if metrics is not None else ")."
        out.append(Statement(text, data))
    return out


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both bits (lower) and error (lower)."""
    pts = [(n, b, e) for n, b, e in points if not (_nan(b) or _nan(e))]
    front = []
    for n, b, e in pts:
        dominated = any(
            (b2 <= b and e2 <= e) and (b2 < b or e2 < e) for n2, b2, e2 in pts if n2 != n
        )
        if not dominated:
            front.append(n)
    return sorted(front)


def pareto_statements(summary: pd.DataFrame, cfg: dict) -> list[Statement]:
    r = report_settings(cfg)
    s = summary[~summary["codec"].isin(r["exclude_from_wins"])]
    out = []
    for stream in ("k", "v"):
        counts: dict[str, int] = {}
        n = 0
        for model, ctx in _cells(s):
            g = s[(s["model"] == model) & (s["ctx"] == ctx)]
            pts = list(
                zip(
                    g["codec"],
                    g[f"{stream}_bpv_compressed"],
                    g[f"{stream}_rel_mse_mean"],
                    strict=True,
                )
            )
            front = pareto_front(pts)
            if not front:
                continue
            n += 1
            for c in front:
                counts[c] = counts.get(c, 0) + 1
        if not n:
            continue
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        text = (
            f"On **{stream.upper()}**, the Pareto frontier (bits per value vs rel. MSE, over "
            f"the layers each codec compresses) holds: "
            + ", ".join(f"{c} in {k}/{n}" for c, k in ranked)
            + " cells."
        )
        out.append(Statement(text, {"stream": stream, "front": dict(ranked), "cells": n}))
    return out


def recommendations(summary: pd.DataFrame, cfg: dict) -> tuple[Table, list[Statement]]:
    """Per cell: the highest total ratio among codecs within the error budget."""
    r = report_settings(cfg)
    bk, bv = float(r["budget"]["k_rel_mse"]), float(r["budget"]["v_rel_mse"])
    rows, stmts = [], []
    for model in model_order(cfg, summary["model"]):
        for ctx in sorted(summary.loc[summary["model"] == model, "ctx"].unique()):
            g = summary[(summary["model"] == model) & (summary["ctx"] == ctx)]
            g = g[~g["codec"].isin(r["exclude_from_wins"])]
            ok = g[(g["k_rel_mse_mean"].fillna(0) <= bk) & (g["v_rel_mse_mean"].fillna(0) <= bv)]
            if ok.empty:
                rows.append([model, fmt_ctx(ctx), "none within budget", NA, NA, NA])
                continue
            best = ok.sort_values(["total_ratio", "codec"], ascending=[False, True]).iloc[0]
            rows.append(
                [
                    model,
                    fmt_ctx(ctx),
                    f"**{best['codec']}**",
                    fmt_ratio(best["total_ratio"]),
                    fmt_err(best["k_rel_mse_mean"]),
                    fmt_err(best["v_rel_mse_mean"]),
                ]
            )
            stmts.append(
                Statement(
                    best["codec"],
                    {
                        "model": model,
                        "ctx": int(ctx),
                        "codec": best["codec"],
                        "total_ratio": float(best["total_ratio"]),
                    },
                )
            )
    return (
        Table(
            ["model", "ctx", "codec", "total ratio", "K rel. MSE", "V rel. MSE"],
            rows,
            ["l", "r", "l", "r", "r", "r"],
        ),
        stmts,
    )


# ---------------------------------------------------------------------------------------------
# legacy conventions


def legacy_table(summary: pd.DataFrame, cfg: dict) -> Table | None:
    """Honest ratios next to each legacy convention, at each model's error context."""
    convs = sorted(
        c.removeprefix("legacy_").removesuffix("_total_ratio")
        for c in summary.columns
        if c.startswith("legacy_") and c.endswith("_total_ratio")
    )
    if not convs:
        return None
    rows = []
    for model in model_order(cfg, summary["model"]):
        ctx = error_ctx(summary, cfg, model)
        s = summary[(summary["model"] == model) & (summary["ctx"] == ctx)].set_index("codec")
        for codec in codec_order(cfg, s.index):
            x = s.loc[codec]
            for conv in convs:
                lt = x.get(f"legacy_{conv}_total_ratio", math.nan)
                if _nan(lt):
                    continue
                rows.append(
                    [
                        model,
                        fmt_ctx(ctx),
                        codec,
                        fmt_ratio(x["total_ratio"]),
                        fmt_ratio(x["full_ratio"]),
                        f"`{conv}`",
                        fmt_ratio(lt),
                        fmt_ratio(x.get(f"legacy_{conv}_full_ratio", math.nan)),
                    ]
                )
    if not rows:
        return None
    return Table(
        [
            "model",
            "ctx",
            "codec",
            "honest total",
            "honest full",
            "legacy convention",
            "legacy total",
            "legacy full",
        ],
        rows,
        ["l", "r", "l", "r", "r", "l", "r", "r"],
    )


# ---------------------------------------------------------------------------------------------
# claims


CLAIM_STATUS = ("confirmed", "refuted", "not testable here")


@dataclass
class ClaimResult:
    id: str
    claim: str
    status: str
    evidence: str
    passed: int = 0
    cells: int = 0
    table: Table | None = None
    note: str = ""


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _ctx_filter(df: pd.DataFrame, p: dict) -> pd.DataFrame:
    if p.get("ctx"):
        df = df[df["ctx"].isin([int(c) for c in _as_list(p["ctx"])])]
    if p.get("ctx_min") is not None:
        df = df[df["ctx"] >= int(p["ctx_min"])]
    if p.get("ctx_max") is not None:
        df = df[df["ctx"] <= int(p["ctx_max"])]
    if p.get("models"):
        df = df[df["model"].isin(_as_list(p["models"]))]
    return df


def _legacy_value(row: pd.Series, conventions: list[str], metric: str) -> float:
    kind = "full" if metric.startswith("full") else "total"
    for conv in conventions:
        v = row.get(f"legacy_{conv}_{kind}_ratio", math.nan)
        if not _nan(v):
            return float(v)
    return float(row[metric])


def _group_best(g: pd.DataFrame, codecs: list[str], col: str, better: str):
    sub = g[g["codec"].isin(codecs)].dropna(subset=[col])
    if sub.empty:
        return None, math.nan
    sub = sub.sort_values(col, ascending=(better == "lower"), kind="stable")
    return str(sub.iloc[0]["codec"]), float(sub.iloc[0][col])


def _claim_compare(cid, text, p, tables) -> ClaimResult:
    a, b = _as_list(p["a"]), _as_list(p["b"])
    metric = p.get("metric", "total_ratio")
    better = p.get("better", METRIC_TEXT.get(metric, ("", "higher"))[1])
    factor = float(p.get("min_factor", 1.0))
    src = (
        tables["extrapolation"]
        if p.get("source", "measured") == "extrapolated"
        else tables["summary"]
    )
    if src is None or metric not in src.columns:
        return ClaimResult(cid, text, CLAIM_STATUS[2], f"metric `{metric}` is not in the tables")
    df = _ctx_filter(src[src["codec"].isin(a + b)], p).copy()
    legacy = _as_list(p.get("legacy"))
    if legacy:
        df["_legacy"] = [_legacy_value(r, legacy, metric) for _, r in df.iterrows()]
    rows, passed, n, legacy_pass, estimated = [], 0, 0, 0, 0
    for (model, ctx), g in df.groupby(["model", "ctx"], sort=True):
        ca, va = _group_best(g, a, metric, better)
        cb, vb = _group_best(g, b, metric, better)
        if ca is None or cb is None:
            continue
        n += 1
        ok = va > vb * factor if better == "higher" else va * factor < vb
        passed += ok
        if "exact" in g.columns:
            estimated += not bool(g[g["codec"].isin([ca, cb])]["exact"].all())
        row = [
            model,
            fmt_ctx(ctx),
            f"{ca} {_fmt_metric(metric, va)}",
            f"{cb} {_fmt_metric(metric, vb)}",
            "yes" if ok else "no",
        ]
        if legacy:
            la = _group_best(g, a, "_legacy", better)
            lb = _group_best(g, b, "_legacy", better)
            lok = la[1] > lb[1] * factor if better == "higher" else la[1] * factor < lb[1]
            legacy_pass += bool(lok)
            row += [f"{la[0]} {_fmt_metric(metric, la[1])} vs {lb[0]} {_fmt_metric(metric, lb[1])}"]
        rows.append(row)
    label = METRIC_TEXT.get(metric, (metric, better))[0]
    if not n:
        missing = [c for c in a + b if c not in set(src["codec"])]
        why = (
            f"codecs {missing} are not in this run"
            if missing
            else "no context matches the claim's filter in this run"
        )
        return ClaimResult(cid, text, CLAIM_STATUS[2], why)
    status = CLAIM_STATUS[0] if passed == n else CLAIM_STATUS[1]
    fac = f" by more than {factor:g}×" if factor != 1 else ""
    ev = (
        f"best of {{{', '.join(a)}}} {'beats' if better == 'higher' else 'is below'} best of "
        f"{{{', '.join(b)}}} on {label}{fac} in {passed}/{n} cells "
        f"({p.get('source', 'measured')}, ctx {ctx_span(df['ctx'])})."
    )
    if estimated:
        ev += f" {estimated}/{n} cells rest on projections with estimated bytes."
    if legacy:
        ev += (
            f" Under the study's own byte conventions ({', '.join(legacy)}, where a codec "
            f"has one): {legacy_pass}/{n}."
        )
    head = ["model", "ctx", "a", "b", "holds"] + (["legacy conventions"] if legacy else [])
    return ClaimResult(cid, text, status, ev, passed, n, Table(head, rows))


def _fmt_metric(metric: str, v: float) -> str:
    return fmt_ratio(v) if "ratio" in metric else fmt_err(v)


def _claim_error(cid, text, p, tables) -> ClaimResult:
    m = tables["metrics"]
    a, b = str(p["a"]), str(p["b"])
    stream, metric = p.get("stream", "k"), p.get("metric", "mse")
    lo, hi = float(p.get("min_factor", 1.0)), p.get("max_factor")
    df = _ctx_filter(m[(m["stream"] == stream) & m["codec"].isin([a, b]) & m["compressed"]], p)
    rows, passed, n, in_range, facs = [], 0, 0, 0, []
    for (model, ctx), g in df.groupby(["model", "ctx"], sort=True):
        ga = g[g["codec"] == a].set_index("layer")[metric]
        gb = g[g["codec"] == b].set_index("layer")[metric]
        common = ga.index.intersection(gb.index)
        if not len(common):
            continue
        ea, eb = float(ga.loc[common].mean()), float(gb.loc[common].mean())
        fac = eb / ea if ea > 0 else math.inf
        n += 1
        ok = fac >= lo
        passed += ok
        facs.append(fac)
        in_range += ok and (hi is None or fac <= float(hi))
        rows.append(
            [
                model,
                fmt_ctx(ctx),
                str(len(common)),
                fmt_err(ea),
                fmt_err(eb),
                fmt_ratio(fac, 1),
                "yes" if ok else "no",
            ]
        )
    if not n:
        missing = [c for c in (a, b) if c not in set(m["codec"])]
        why = (
            f"codecs {missing} are not in this run"
            if missing
            else f"no layer where both {a} and {b} compress {stream.upper()}"
        )
        return ClaimResult(cid, text, CLAIM_STATUS[2], why)
    status = CLAIM_STATUS[0] if passed == n else CLAIM_STATUS[1]
    ev = (
        f"{stream.upper()} {metric} of {a} is {fmt_num(min(facs), 1)}–{fmt_num(max(facs), 1)}× "
        f"lower than {b}'s (mean over the layers both compress); ≥ {lo:g}× in {passed}/{n} "
        f"cells"
    )
    if hi is not None:
        ev += f", within the stated {lo:g}–{float(hi):g}× in {in_range}/{n}"
    ev += "."
    return ClaimResult(
        cid,
        text,
        status,
        ev,
        passed,
        n,
        Table(
            ["model", "ctx", "layers", f"{a} {metric}", f"{b} {metric}", f"{b}/{a}", "holds"], rows
        ),
    )


def _claim_threshold(cid, text, p, tables) -> ClaimResult:
    codecs = _as_list(p["codecs"])
    metric = p.get("metric", "total_ratio")
    src = (
        tables["extrapolation"]
        if p.get("source", "measured") == "extrapolated"
        else tables["summary"]
    )
    lo, hi = float(p["min"]), p.get("max")
    df = _ctx_filter(src[src["codec"].isin(codecs)], p)
    rows, passed, n, vals = [], 0, 0, []
    for (model, ctx), g in df.groupby(["model", "ctx"], sort=True):
        c, v = _group_best(g, codecs, metric, "higher")
        if c is None:
            continue
        n += 1
        ok = v >= lo
        passed += ok
        vals.append(v)
        est = ""
        if "exact" in g.columns and not bool(g[g["codec"] == c].iloc[0]["exact"]):
            est = " (estimated bytes)"
        rows.append([model, fmt_ctx(ctx), c, _fmt_metric(metric, v) + est, "yes" if ok else "no"])
    if not n:
        missing = [c for c in codecs if c not in set(src["codec"])]
        why = (
            f"none of the codecs {codecs} is in this run"
            if len(missing) == len(codecs)
            else "no context matches the claim's filter in this run"
        )
        return ClaimResult(cid, text, CLAIM_STATUS[2], why)
    status = CLAIM_STATUS[0] if passed == n else CLAIM_STATUS[1]
    label = METRIC_TEXT.get(metric, (metric,))[0]
    rng = f"{lo:g}" + (f"–{float(hi):g}" if hi is not None else "+")
    ev = (
        f"best of {{{', '.join(codecs)}}} reaches {_fmt_metric(metric, min(vals))}–"
        f"{_fmt_metric(metric, max(vals))} {label} (claimed {rng}×); ≥ {lo:g} in {passed}/{n} "
        f"cells ({p.get('source', 'measured')}, ctx {ctx_span(df['ctx'])})."
    )
    return ClaimResult(
        cid, text, status, ev, passed, n, Table(["model", "ctx", "codec", label, "holds"], rows)
    )


CLAIM_TYPES = {
    "compare": _claim_compare,
    "error_compare": _claim_error,
    "threshold": _claim_threshold,
}


def check_claims(claims_cfg: dict | list | None, tables: dict[str, pd.DataFrame | None]):
    """Evaluate every configured claim; see the module docstring for the types."""
    if not claims_cfg:
        return []
    items = (
        claims_cfg.items()
        if isinstance(claims_cfg, dict)
        else ((c.get("id", f"C{i + 1}"), c) for i, c in enumerate(claims_cfg))
    )
    out = []
    for cid, c in items:
        kind = c.get("type")
        if kind not in CLAIM_TYPES:
            raise KvbenchError(f"claims.{cid}: unknown type {kind!r}; known: {sorted(CLAIM_TYPES)}")
        try:
            res = CLAIM_TYPES[kind](
                str(cid), str(c.get("claim", "")), c.get("params") or {}, tables
            )
        except KeyError as e:
            raise KvbenchError(f"claims.{cid}: missing parameter {e}") from e
        res.note = str(c.get("note") or "")
        out.append(res)
    return out


# ---------------------------------------------------------------------------------------------
# other sections


def limitations(
    summary: pd.DataFrame,
    extrap: pd.DataFrame | None,
    manifests: list[dict],
    quality: pd.DataFrame | None,
    cfg: dict | None = None,
) -> list[str]:
    """``quality``: the per-cell quality frame of :func:`quality_cells` (or None)."""
    out = []
    n_models = summary["model"].nunique()
    ctxs = sorted(summary["ctx"].unique())
    out.append(
        f"{n_models} model{'s' if n_models != 1 else ''} and {len(ctxs)} measured context"
        f"{'s' if len(ctxs) != 1 else ''} ({', '.join(fmt_ctx(c) for c in ctxs)}); every longer "
        "context is a projection (see *Extrapolated*)."
    )
    if extrap is not None and (extrap["source"] == "extrapolated").any():
        e = extrap[extrap["source"] == "extrapolated"]
        out.append(
            "Projected bytes are exact only where labelled; block codecs' skeleton bytes (PCA "
            "bases, centres) come from the measured mean per block and make up to "
            f"{fmt_pct(e['estimated_fraction'].max())} of a projected cell."
        )
    sliding = summary[summary["n_sliding_layers"] > 0]
    if len(sliding):
        out.append(
            "Sliding-window layers ("
            + ", ".join(sorted(sliding["model"].unique()))
            + ") are passed through by the Kakeya family but compressed by TurboQuant/ggml, so "
            "*total* ratios are not like for like there; the full-attention ratio is."
        )
    # attention errors for every cell (a partial rerun leaves older tables without them)
    has_attn = "attn_n_layers" in summary.columns and bool((summary["attn_n_layers"] > 0).all())
    if quality is None or quality.empty:
        out.append(
            "Errors are reconstruction errors of the captured tensors (K and V separately, plus "
            "q·k error on sampled queries"
            + (" and attention metrics on them" if has_attn else "")
            + "), not end-to-end quality: no continuation (ΔPPL / KL) measurements in this run."
        )
    else:
        n_tok = sorted({int(x) for x in quality.get("n_tokens", pd.Series(dtype=float)).dropna()})
        measured = set(quality["codec"])
        others = [c for c in codec_order(cfg or {}, summary["codec"]) if c not in measured]
        out.append(
            f"Continuation quality (ΔPPL, next-token KL) is measured for {len(measured)} of "
            f"{summary['codec'].nunique()} codecs at ctx "
            f"{', '.join(fmt_ctx(c) for c in sorted(quality['ctx'].unique()))}"
            + (f", over {'/'.join(map(str, n_tok))} teacher-forced tokens" if n_tok else "")
            + " of one corpus: small ΔPPL differences are within noise (see the ΔNLL standard "
            "errors)"
            + (
                f"; {', '.join(others)} {'has' if len(others) == 1 else 'have'} reconstruction"
                + (" and attention" if has_attn else "")
                + " errors only."
                if others
                else "."
            )
        )
    out.append(
        "Legacy columns reproduce the original studies' byte conventions for comparison only; "
        "every headline number here uses the honest stored bytes."
    )
    corp = sorted({str((m.get("corpus") or {}).get("name")) for m in manifests})
    if corp:
        out.append(f"One corpus ({', '.join(corp)}); errors on other text may differ.")
    out.append(
        "Timings depend on the machine and backend and are not part of the deterministic tables."
    )
    return out


def timing_table(timings: pd.DataFrame | None, summary: pd.DataFrame, cfg: dict) -> Table | None:
    """Encode/decode seconds summed over layers, per model at its error context (or, when that
    context has no timing rows, the longest timed one); None when there are no timings."""
    if timings is None or timings.empty:
        return None
    rows = []
    for model in model_order(cfg, timings["model"]):
        tm = timings[timings["model"] == model]
        ctx = error_ctx(summary, cfg, model) if model in set(summary["model"]) else None
        if ctx is None or ctx not in set(tm["ctx"]):
            ctx = int(tm["ctx"].max())
        t = tm[tm["ctx"] == ctx]
        for codec in codec_order(cfg, t["codec"]):
            g = t[t["codec"] == codec]
            rows.append(
                [
                    model,
                    fmt_ctx(ctx),
                    codec,
                    fmt_num(g["encode_s"].sum(), 3),
                    fmt_num(g["decode_s"].sum(), 3),
                    "/".join(sorted(set(g["backend"].astype(str)))),
                ]
            )
    if not rows:
        return None
    return Table(
        ["model", "ctx", "codec", "encode s", "decode s", "backend"],
        rows,
        ["l", "r", "l", "r", "r", "l"],
    )


# ---------------------------------------------------------------------------------------------
# quality: continuation (results/quality) and attention (codec tables), MSE vs KL/ΔPPL verdicts


CELL_KEYS = ["model", "ctx", "codec"]


def mse_verdict(k_rel_mse, v_rel_mse, thresholds: dict) -> str:
    """ACCEPT / MARGINAL / REJECT from the mean relative MSE of K and V (the worse of the two).

    ``thresholds = {"accept": {"k_rel_mse": .., "v_rel_mse": ..}, "marginal": {...}}`` (see
    :func:`report_settings`); a NaN gives ``"n/a"`` (pass 0 for a stream the codec leaves exact).
    """
    if _nan(k_rel_mse) or _nan(v_rel_mse):
        return "n/a"
    for verdict, key in (("ACCEPT", "accept"), ("MARGINAL", "marginal")):
        th = thresholds[key]
        if float(k_rel_mse) <= th["k_rel_mse"] and float(v_rel_mse) <= th["v_rel_mse"]:
            return verdict
    return "REJECT"


def verdict_flag(mse: str, quality: str) -> str:
    """``""`` when the verdicts agree (or one is n/a), else which way the MSE verdict errs."""
    if mse not in VERDICTS or quality not in VERDICTS or mse == quality:
        return ""
    return "MSE optimistic" if VERDICTS.index(mse) < VERDICTS.index(quality) else "MSE pessimistic"


def _stream_error(df: pd.DataFrame, stream: str) -> pd.Series:
    """Mean rel. MSE of a stream; 0 where the codec compresses no layer of it; NaN: no row."""
    n, e = df[f"{stream}_n_compressed"], df[f"{stream}_rel_mse_mean"]
    return pd.Series(np.where(n.isna(), np.nan, np.where(n > 0, e, 0.0)), index=df.index)


def quality_cells(
    quality: pd.DataFrame | None, summary: pd.DataFrame, cfg: dict
) -> pd.DataFrame | None:
    """One row per (model, ctx, codec) with a continuation table: its metrics (mean over its
    rows), the summary's bits per value / ratio / mean rel. MSE at the same cell, the KL/ΔPPL
    verdict (:func:`kvbench.quality.quality_verdicts`), the MSE verdict and the flag."""
    from kvbench.quality import quality_verdicts

    if quality is None or quality.empty:
        return None
    num = [
        c
        for c in quality.columns
        if c not in CELL_KEYS
        and pd.api.types.is_numeric_dtype(quality[c])
        and not pd.api.types.is_bool_dtype(quality[c])
    ]
    q = quality.groupby(CELL_KEYS, sort=True)[num].mean().reset_index()
    for c in ("kl_mean", "delta_ppl_rel", "top1_agree"):
        if c not in q.columns:
            q[c] = math.nan
    qv = quality_verdicts(q, quality_thresholds(cfg))
    q["quality_verdict"] = qv["quality_verdict"].to_numpy()
    cols = [
        "bits_per_value",
        "total_ratio",
        "k_rel_mse_mean",
        "v_rel_mse_mean",
        "k_n_compressed",
        "v_n_compressed",
    ]
    q = q.merge(summary[CELL_KEYS + cols], on=CELL_KEYS, how="left", validate="one_to_one")
    q["k_err"], q["v_err"] = _stream_error(q, "k"), _stream_error(q, "v")
    th = report_settings(cfg)["mse_thresholds"]
    q["mse_verdict"] = [mse_verdict(k, v, th) for k, v in zip(q["k_err"], q["v_err"], strict=True)]
    q["flag"] = [
        verdict_flag(m, v) for m, v in zip(q["mse_verdict"], q["quality_verdict"], strict=True)
    ]
    mr = {m: i for i, m in enumerate(model_order(cfg, q["model"]))}
    cr = {c: i for i, c in enumerate(codec_order(cfg, q["codec"]))}
    q = q.assign(_m=q["model"].map(mr), _c=q["codec"].map(cr))
    q = q.sort_values(["_m", "ctx", "_c"], kind="stable").drop(columns=["_m", "_c"])
    return q.reset_index(drop=True)


def fmt_signed_pct(x) -> str:
    if _nan(x):
        return NA
    return "0" if float(x) == 0 else f"{100 * float(x):+.1f}%"


def fmt_dnll(x, se) -> str:
    if _nan(x):
        return NA
    if float(x) == 0 and (_nan(se) or float(se) == 0):
        return "0"
    return f"{float(x):+.4f}" + ("" if _nan(se) else f" ± {float(se):.4f}")


def continuation_table(cells: pd.DataFrame) -> Table:
    rows = []
    for r in cells.to_dict("records"):
        rows.append(
            [
                r["model"],
                fmt_ctx(r["ctx"]),
                r["codec"],
                fmt_num(r["bits_per_value"]),
                fmt_signed_pct(r.get("delta_ppl_rel")),
                fmt_dnll(r.get("delta_nll"), r.get("delta_nll_se")),
                fmt_err(r.get("kl_mean")),
                fmt_err(r.get("kl_p99")),
                fmt_pct(r.get("top1_agree")),
                r["quality_verdict"],
            ]
        )
    return Table(
        [
            "model",
            "ctx",
            "codec",
            "bits/value",
            "Δ PPL",
            "Δ NLL ± s.e. (nats)",
            "KL mean",
            "KL p99",
            "top-1 agree",
            "verdict (KL/ΔPPL)",
        ],
        rows,
        ["l", "r", "l", "r", "r", "r", "r", "r", "r", "l"],
    )


def _by_verdict(g: pd.DataFrame, col: str) -> str:
    parts = []
    for v in (*VERDICTS, "n/a"):
        names = list(g.loc[g[col] == v, "codec"])
        if names:
            parts.append(f"{v} {', '.join(names)}")
    return "; ".join(parts)


def quality_statements(cells: pd.DataFrame, cfg: dict) -> list[Statement]:
    """Per (model, ctx): codecs by KL/ΔPPL verdict, the fewest bits with ACCEPT, and the count
    of cells where the MSE verdict disagrees."""
    r = report_settings(cfg)
    c = cells[~cells["codec"].isin(r["exclude_from_wins"])]
    out = []
    if c.empty:
        ref = ", ".join(sorted(set(cells["codec"])))
        return [
            Statement(
                f"Only the reference ({ref}) has a continuation table: no lossy codec is "
                "measured (config `quality.codecs`).",
                {"flagged": 0, "cells": 0},
            )
        ]
    for (model, ctx), g in c.groupby(["model", "ctx"], sort=False):
        ok = g[g["quality_verdict"] == "ACCEPT"].dropna(subset=["bits_per_value"])
        best = ok.sort_values(["bits_per_value", "codec"]).iloc[0] if len(ok) else None
        text = f"**{model}**, ctx {fmt_ctx(ctx)}: {_by_verdict(g, 'quality_verdict')}."
        if best is not None:
            text += (
                " Fewest bits among the measured codecs with a KL/ΔPPL ACCEPT: "
                f"**{best['codec']}** "
                f"({fmt_num(best['bits_per_value'])} bits/value, {fmt_ratio(best['total_ratio'])})."
            )
        else:
            text += " No codec measured here reaches a KL/ΔPPL ACCEPT."
        out.append(
            Statement(
                text,
                {
                    "model": model,
                    "ctx": int(ctx),
                    "verdicts": dict(zip(g["codec"], g["quality_verdict"], strict=True)),
                    "best_accept": None if best is None else best["codec"],
                },
            )
        )
    flagged = c[c["flag"] != ""]
    n = int((c["mse_verdict"].isin(VERDICTS) & c["quality_verdict"].isin(VERDICTS)).sum())
    out.append(
        Statement(
            f"The MSE verdict disagrees with the KL/ΔPPL verdict in {len(flagged)}/{n} measured "
            "codec cells"
            + (
                " (" + ", ".join(f"{x.codec} on {x.model}" for x in flagged.itertuples()) + ")"
                if len(flagged)
                else ""
            )
            + "; see DECISION.md.",
            {"flagged": len(flagged), "cells": n},
        )
    )
    return out


#: Attention columns of the summary (kvbench.aggregate), with labels and formats.
ATTN_SHOWN = (
    ("attn_kl_mean", "attn KL", fmt_err),
    ("attn_kl_max", "worst-layer attn KL", fmt_err),
    ("attn_top1_mean", "top-1 key kept", fmt_pct),
    ("attn_top8_mean", "top-8 overlap", fmt_pct),
    ("attn_out_rel_err_mean", "output rel. err", fmt_err),
)
#: The same from the quality tables (layer means over every cached layer).
QUALITY_ATTN_SHOWN = (
    ("mean_attn_kl", "attn KL", fmt_err),
    ("max_attn_kl", "worst-layer attn KL", fmt_err),
    ("mean_attn_top1", "top-1 key kept", fmt_pct),
    ("mean_attn_top8", "top-8 overlap", fmt_pct),
    ("mean_attn_out_rel_err", "output rel. err", fmt_err),
)


def _attn_table(df: pd.DataFrame, cols, with_ctx: bool, layers: bool = True) -> Table:
    rows = []
    for r in df.to_dict("records"):
        row = [fmt_ctx(r["ctx"])] if with_ctx else []
        row.append(r["codec"])
        if layers:
            row.append(f"{int(r['attn_n_layers'])}/{int(r['n_layers'])}")
        row += [f(r.get(c)) for c, _, f in cols]
        rows.append(row)
    head = (["ctx"] if with_ctx else []) + ["codec"] + (["layers"] if layers else [])
    align = (["r"] if with_ctx else []) + ["l"] + (["r"] if layers else [])
    return Table(head + [lab for _, lab, _ in cols], rows, align + ["r"] * len(cols))


def _cell_order(df: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    rank = {c: i for i, c in enumerate(codec_order(cfg, df["codec"]))}
    return df.assign(_r=df["codec"].map(rank)).sort_values(["ctx", "_r"]).drop(columns="_r")


def attention_section(
    summary: pd.DataFrame, quality: pd.DataFrame | None, cfg: dict
) -> dict[str, Any] | None:
    """Attention tables per model from the summary's ``attn_*`` columns (layers each codec
    compresses); the quality tables' layer means are shown when the codec tables do not cover
    every cell. None when neither source has attention values."""
    out: dict[str, Any] = {"models": [], "notes": [], "quality_tables": []}
    has = "attn_n_layers" in summary.columns and bool((summary["attn_n_layers"] > 0).any())
    complete = has and bool((summary["attn_n_layers"] > 0).all())
    if has:
        s = summary[summary["attn_n_layers"] > 0]
        for model in model_order(cfg, s["model"]):
            sm = s[s["model"] == model]
            ctxs = sorted(sm["ctx"].unique())
            want = error_ctx(summary, cfg, model)
            ctx = want if want in ctxs else int(ctxs[-1])
            main = _cell_order(sm[sm["ctx"] == ctx], cfg)
            out["models"].append(
                {
                    "model": model,
                    "ctx": fmt_ctx(ctx),
                    "table": _attn_table(main, ATTN_SHOWN, with_ctx=False),
                    "all": _attn_table(_cell_order(sm, cfg), ATTN_SHOWN, with_ctx=True)
                    if len(ctxs) > 1
                    else None,
                    "n_ctx": len(ctxs),
                }
            )
        if not complete:
            missing = int((summary["attn_n_layers"].fillna(0) == 0).sum())
            out["notes"].append(
                f"{missing} of {len(summary)} (model, ctx, codec) cells have no attention values: "
                "their codec tables predate the attention columns (rerun `compress` for them)"
            )
    else:
        out["notes"].append(
            "The codec tables carry no attention columns (they predate them; rerun `compress`)"
        )
    q_cols = [c for c in QUALITY_ATTN_SHOWN if quality is not None and c[0] in quality.columns]
    if not complete and q_cols:
        q = quality.groupby(CELL_KEYS, sort=True)[[c for c, _, _ in q_cols]].mean().reset_index()
        q = q.dropna(subset=[q_cols[0][0]], how="all")
        for model in model_order(cfg, q["model"]):
            qm = _cell_order(q[q["model"] == model], cfg)
            out["quality_tables"].append(
                {"model": model, "table": _attn_table(qm, q_cols, with_ctx=True, layers=False)}
            )
    if not out["models"] and not out["quality_tables"]:
        return None
    return out


def verdict_table(cells: pd.DataFrame, cfg: dict) -> Table:
    """DECISION.md: both verdicts per measured codec cell and the disagreement flag."""
    r = report_settings(cfg)
    c = cells[~cells["codec"].isin(r["exclude_from_wins"])]
    rows = []
    for x in c.to_dict("records"):
        flag = f"⚑ {x['flag']}" if x["flag"] else ""
        rows.append(
            [
                x["model"],
                fmt_ctx(x["ctx"]),
                x["codec"],
                fmt_num(x["bits_per_value"]),
                fmt_err(x["k_err"]),
                fmt_err(x["v_err"]),
                f"**{x['mse_verdict']}**",
                fmt_err(x.get("kl_mean")),
                fmt_signed_pct(x.get("delta_ppl_rel")),
                f"**{x['quality_verdict']}**",
                flag,
            ]
        )
    return Table(
        [
            "model",
            "ctx",
            "codec",
            "bits/value",
            "K rel. MSE",
            "V rel. MSE",
            "MSE verdict",
            "KL mean",
            "Δ PPL",
            "KL/ΔPPL verdict",
            "flag",
        ],
        rows,
        ["l", "r", "l", "r", "r", "r", "l", "r", "r", "l", "l"],
    )


def verdict_statements(cells: pd.DataFrame, cfg: dict) -> list[Statement]:
    """One statement per flagged cell (which metric is off, by how much), then the count."""
    r = report_settings(cfg)
    c = cells[~cells["codec"].isin(r["exclude_from_wins"])]
    out = []
    for x in c[c["flag"] != ""].to_dict("records"):
        why = (
            "the reconstruction error looks acceptable but the model's predictions move more"
            if x["flag"] == "MSE optimistic"
            else "the reconstruction error overstates the damage to the model's predictions"
        )
        out.append(
            Statement(
                f"⚑ **{x['codec']}** on {x['model']} (ctx {fmt_ctx(x['ctx'])}): MSE verdict "
                f"{x['mse_verdict']} (K {fmt_err(x['k_err'])}, V {fmt_err(x['v_err'])}) but "
                f"KL/ΔPPL verdict {x['quality_verdict']} (KL {fmt_err(x.get('kl_mean'))}, "
                f"ΔPPL {fmt_signed_pct(x.get('delta_ppl_rel'))}): {why}.",
                {
                    "model": x["model"],
                    "ctx": int(x["ctx"]),
                    "codec": x["codec"],
                    "mse_verdict": x["mse_verdict"],
                    "quality_verdict": x["quality_verdict"],
                    "flag": x["flag"],
                },
            )
        )
    return out


def budget_choice_coverage(
    recs: list[Statement], cells: pd.DataFrame | None, cfg: dict
) -> list[str]:
    """Whether each codec chosen under the MSE budget has a KL/ΔPPL verdict, and which."""
    if not recs:
        return []
    chosen: dict[str, list[tuple[str, int]]] = {}
    for s in recs:
        chosen.setdefault(s.data["codec"], []).append((s.data["model"], s.data["ctx"]))
    out = []
    for codec, where in chosen.items():
        have = (
            cells[cells["codec"] == codec]
            if cells is not None
            else pd.DataFrame(columns=["model", "ctx", "quality_verdict"])
        )
        if have.empty:
            measured = ", ".join(codec_order(cfg, cells["codec"])) if cells is not None else "none"
            out.append(
                f"**{codec}** (chosen in {len(where)} cell{'s' if len(where) != 1 else ''}) has "
                f"no continuation measurement in this run (quality codecs: {measured}), so its "
                "choice rests on MSE alone; add it to `quality.codecs` to check it"
            )
        else:
            v = ", ".join(
                f"{m} {fmt_ctx(c)}: {qv}"
                for m, c, qv in zip(
                    have["model"], have["ctx"], have["quality_verdict"], strict=True
                )
            )
            out.append(f"**{codec}** KL/ΔPPL verdict where measured: {v}")
    return out


# ---------------------------------------------------------------------------------------------
# figures index


def figure_names(models: Iterable[str]) -> dict[str, list[str]]:
    """File names (under results/figures/) the report rule produces."""
    models = list(models)
    return {
        "ratio": [f"ratio_vs_ctx_{m}.png" for m in models],
        "rd": ["rate_distortion_k.png", "rate_distortion_v.png"],
        "heatmap": [f"layer_error_{m}.png" for m in models],
        "rate_dppl": ["rate_vs_dppl.png"],
    }


# ---------------------------------------------------------------------------------------------
# rendering


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env


def summary_context(
    summary: pd.DataFrame,
    metrics: pd.DataFrame,
    extrap: pd.DataFrame | None,
    cfg: dict,
    manifests: list[dict],
    timings: pd.DataFrame | None = None,
    quality: pd.DataFrame | None = None,
    machine: dict | None = None,
    figures_dir: str = "figures",
) -> dict[str, Any]:
    r = report_settings(cfg)
    tables = {"summary": summary, "metrics": metrics, "extrapolation": extrap}
    check_table, check_note = extrapolation_check(metrics, cfg)
    rec_table, recs = recommendations(summary, cfg)
    models = model_order(cfg, summary["model"])
    figs = figure_names(models)
    cells = quality_cells(quality, summary, cfg)
    continuation = None
    if cells is not None:
        n_tok = sorted({int(x) for x in cells.get("n_tokens", pd.Series(dtype=float)).dropna()})
        continuation = {
            "table": continuation_table(cells),
            "statements": quality_statements(cells, cfg),
            "n_tokens": "/".join(map(str, n_tok)) or NA,
            "contexts": ", ".join(fmt_ctx(c) for c in sorted(cells["ctx"].unique())),
            "thresholds": quality_thresholds(cfg),
            "figure": f"{figures_dir}/{figs['rate_dppl'][0]}"
            if (~cells["codec"].isin(r["exclude_from_wins"])).any()
            else None,
        }
    return {
        "env": environment(manifests, machine, models),
        "n_models": len(models),
        "models": models,
        "codecs": codec_order(cfg, summary["codec"]),
        "contexts": [fmt_ctx(c) for c in sorted(summary["ctx"].unique())],
        "codec_specs": _codec_specs(cfg, summary),
        "total": ratio_table(summary, cfg, "total_ratio"),
        "full": ratio_table(summary, cfg, "full_ratio"),
        "extrap": extrapolated_table(extrap, cfg) if extrap is not None else None,
        "extrap_full": extrapolated_table(extrap, cfg, "full_ratio")
        if extrap is not None
        else None,
        "extrap_methods": extrapolation_methods(extrap, cfg) if extrap is not None else None,
        "extrap_check": check_table,
        "extrap_check_note": check_note,
        "headline_ctx": [fmt_ctx(c) for c in r["headline_ctx"]],
        "errors": error_tables(summary, cfg),
        "wins": win_statements(summary, cfg),
        "pairs": pair_statements(summary, cfg, metrics),
        "pareto": pareto_statements(summary, cfg),
        "recommend": rec_table,
        "coverage": budget_choice_coverage(recs, cells, cfg) if cells is not None else [],
        "budget": r["budget"],
        "legacy": legacy_table(summary, cfg),
        "claims": check_claims(cfg.get("claims"), tables),
        "limitations": limitations(summary, extrap, manifests, cells, cfg),
        "timings": timing_table(timings, summary, cfg),
        "continuation": continuation,
        "attention": attention_section(summary, quality, cfg),
        "figures": {k: [f"{figures_dir}/{f}" for f in v] for k, v in figs.items()},
        "fig_models": models,
    }


def _codec_specs(cfg: dict, summary: pd.DataFrame) -> Table:
    codecs = cfg.get("codecs") or {}
    rows = []
    for c in codec_order(cfg, summary["codec"]):
        spec = codecs.get(c, {})
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "family") or "defaults"
        s = summary[summary["codec"] == c].iloc[0]
        rows.append(
            [c, str(spec.get("family", s["family"])), params, f"{s['k_codec']} / {s['v_codec']}"]
        )
    return Table(["codec", "family", "parameters", "K / V codec"], rows)


def render_summary(**kwargs) -> str:
    return _env().get_template("SUMMARY.md.j2").render(**summary_context(**kwargs))


def decision_context(
    ablation: pd.DataFrame | None,
    summary: pd.DataFrame,
    cfg: dict,
    quality: pd.DataFrame | None = None,
) -> dict[str, Any]:
    from kvbench import ablation as ab

    s = ab.settings(cfg.get("ablation"))
    r = report_settings(cfg)
    rec_table, recs = recommendations(summary, cfg)
    cells = quality_cells(quality, summary, cfg)
    verdicts = None
    c = None if cells is None else cells[~cells["codec"].isin(r["exclude_from_wins"])]
    if c is not None and not c.empty:
        both = c["mse_verdict"].isin(VERDICTS) & c["quality_verdict"].isin(VERDICTS)
        verdicts = {
            "table": verdict_table(cells, cfg),
            "flags": verdict_statements(cells, cfg),
            "n_flagged": int((c["flag"] != "").sum()),
            "n_cells": int(both.sum()),
            "n_optimistic": int((c["flag"] == "MSE optimistic").sum()),
            "n_pessimistic": int((c["flag"] == "MSE pessimistic").sum()),
            "contexts": ", ".join(fmt_ctx(x) for x in sorted(c["ctx"].unique())),
        }
    ctx: dict[str, Any] = {
        "settings": s,
        "recommend": rec_table,
        "budget": r["budget"],
        "mse_th": r["mse_thresholds"],
        "q_th": quality_thresholds(cfg),
        "verdicts": verdicts,
        "coverage": budget_choice_coverage(recs, cells, cfg),
        "has_ablation": ablation is not None and not ablation.empty,
    }
    if not ctx["has_ablation"]:
        return ctx
    per_model = ab.summarize_model(ablation, s)
    grid = ab.cross_model_grid(per_model, s)
    vrs = sorted(grid["variance_ratio"].unique(), reverse=True)
    drs = sorted(grid["d_res"].unique())
    cell = {
        (round(float(v), 6), int(d)): row
        for v, d, row in zip(
            grid["variance_ratio"], grid["d_res"], grid.to_dict("records"), strict=True
        )
    }
    published = ab.PUBLISHED_GRID if s["metric"] == "mse" else {}

    def g(v, d):
        return cell.get((round(float(v), 6), int(d)))

    infl_rows, ratio_rows, pub_rows = [], [], []
    for v in vrs:
        infl_rows.append(
            [f"{v:.2f}"]
            + [
                f"{fmt_num(g(v, d)['mean_inflation'])} {ab.MARKS[g(v, d)['mark']]}"
                if g(v, d)
                else NA
                for d in drs
            ]
        )
        ratio_rows.append(
            [f"{v:.2f}"] + [fmt_ratio(g(v, d)["mean_ratio"]) if g(v, d) else NA for d in drs]
        )
        if published:
            pub_rows.append(
                [f"{v:.2f}"]
                + [
                    f"{fmt_num(g(v, d)['mean_inflation'])} / "
                    f"{fmt_num(published[(round(float(v), 2), int(d))])}"
                    if g(v, d) and (round(float(v), 2), int(d)) in published
                    else NA
                    for d in drs
                ]
            )
    tail_rows = []
    for v in vrs:
        c = g(v, 0) if 0 in drs else None
        if c:
            tail_rows.append(
                [
                    f"{v:.2f}",
                    fmt_num(c["mean_inflation"]),
                    fmt_num(c["pca_tail_prediction"]),
                    fmt_num(c["mean_inflation"] / c["pca_tail_prediction"], 3),
                ]
            )
    per_model_tables = []
    for model in model_order(cfg, per_model["model"]):
        pm = per_model[per_model["model"] == model]
        rows = [
            [
                f"{r['variance_ratio']:.2f}",
                str(r["d_res"]),
                fmt_num(r["d_eff_mean"], 1),
                fmt_num(r["mean_inflation"]),
                fmt_num(r["median_inflation"]),
                fmt_num(r["p90_inflation"]),
                fmt_num(r["max_inflation"]),
                fmt_ratio(r["ratio"]),
                ab.MARKS[r["mark"]],
            ]
            for r in pm.to_dict("records")
        ]
        per_model_tables.append(
            {
                "model": model,
                "n_layers": int(pm["n_layers"].iloc[0]),
                "ctx": fmt_ctx(int(ablation.loc[ablation["model"] == model, "ctx"].iloc[0])),
                "table": Table(
                    ["vr", "d_res", "d_eff", "mean", "median", "p90", "max", "K ratio", "mark"],
                    rows,
                    ["r", "r", "r", "r", "r", "r", "r", "r", "l"],
                ),
            }
        )
    best = ab.best_accept(grid)
    base = ab.baseline_cell(grid, s)
    ctx.update(
        ablation_ctx=", ".join(fmt_ctx(c) for c in sorted(ablation["ctx"].unique())),
        grid=Table(["vr \\ d_res", *map(str, drs)], infl_rows, ["l"] + ["r"] * len(drs)),
        ratios=Table(["vr \\ d_res", *map(str, drs)], ratio_rows, ["l"] + ["r"] * len(drs)),
        published=Table(["vr \\ d_res", *map(str, drs)], pub_rows, ["l"] + ["r"] * len(drs))
        if published
        else None,
        tail=Table(
            ["vr", "measured (d_res 0)", "(1−vr)/(1−vr₀)", "measured/predicted"],
            tail_rows,
            ["r", "r", "r", "r"],
        )
        if tail_rows
        else None,
        per_model=per_model_tables,
        n_models=int(per_model["model"].nunique()),
        n_layers=int(per_model.groupby("model")["n_layers"].first().sum()),
        best=_fmt_cell(best) if best else None,
        base=_fmt_cell(base),
        verdict=ab.verdict(grid, s),
        counts={m: int((grid["mark"] == m).sum()) for m in ("ACCEPT", "MARGINAL", "REJECT")},
        n_cells=len(grid),
    )
    return ctx


def _fmt_cell(c: dict) -> dict:
    return {
        "vr": f"{c['variance_ratio']:.2f}",
        "d_res": int(c["d_res"]),
        "inflation": fmt_num(c["mean_inflation"]),
        "ratio": fmt_ratio(c["mean_ratio"]),
        "bytes": fmt_mib(c["bytes"]),
        "mark": c["mark"],
    }


def render_decision(
    ablation: pd.DataFrame | None,
    summary: pd.DataFrame,
    cfg: dict,
    quality: pd.DataFrame | None = None,
) -> str:
    return (
        _env()
        .get_template("DECISION.md.j2")
        .render(**decision_context(ablation, summary, cfg, quality))
    )


# ---------------------------------------------------------------------------------------------
# the report rule


def _read_all(paths: Iterable[str | Path]) -> pd.DataFrame | None:
    frames = [pd.read_parquet(p) for p in sorted(str(p) for p in paths)]
    return pd.concat(frames, ignore_index=True) if frames else None


def write_reports(
    *,
    metrics,
    summary,
    extrapolation,
    timings,
    manifests: Iterable[str | Path],
    ablation: Iterable[str | Path],
    quality: Iterable[str | Path],
    cfg: dict,
    summary_md,
    decision_md,
    figures: list[str | Path],
    machine: dict | None = None,
) -> None:
    """Read the tables, render both Markdown files and every figure (paths as the rule says)."""
    from kvbench.plots import make_figures
    from kvbench.shards import atomic_write_text, load_manifest

    m = pd.read_parquet(metrics)
    s = pd.read_parquet(summary)
    e = pd.read_parquet(extrapolation)
    t = pd.read_parquet(timings) if timings else None
    mans = [load_manifest(p) for p in manifests]
    ab = _read_all(ablation)
    q = _read_all(quality)
    fig_dir = Path(figures[0]).parent if figures else Path(summary_md).parent / "figures"
    rel = Path(fig_dir).resolve().relative_to(Path(summary_md).resolve().parent)
    text = render_summary(
        summary=s,
        metrics=m,
        extrap=e,
        cfg=cfg,
        manifests=mans,
        timings=t,
        quality=q,
        machine=machine if machine is not None else machine_info(),
        figures_dir=rel.as_posix(),
    )
    made = make_figures(s, m, e, cfg, fig_dir, quality_cells(q, s, cfg))
    missing = {Path(f).name for f in figures} - {p.name for p in made}
    if missing:
        raise KvbenchError(f"report: figures {sorted(missing)} were expected but not drawn")
    atomic_write_text(summary_md, text)
    atomic_write_text(decision_md, render_decision(ab, s, cfg, q))


# ---------------------------------------------------------------------------------------------
# workflow wiring (called from workflow/rules/report.smk and ablation.smk at parse time)


def workflow_inputs(config: dict) -> dict[str, list[str]]:
    """Paths the aggregate/report rules read, from the config's model x ctx x codec grid."""
    from kvbench.ablation import settings as ablation_settings
    from kvbench.config import model_contexts

    models = list(config.get("models") or {})
    codecs = list(config.get("codecs") or {})
    cells = [(m, c) for m in models for c in model_contexts(config, m)]
    ab = ablation_settings(config.get("ablation"))
    ab_models = (
        [m for m in models if not ab["models"] or m in ab["models"]] if ab["enabled"] else []
    )
    return {
        "tables": [f"results/codec/{m}/ctx{c}/{k}.parquet" for m, c in cells for k in codecs],
        "timings": [f"results/timing/{m}/ctx{c}/{k}.parquet" for m, c in cells for k in codecs],
        "manifests": [f"results/kv/{m}/ctx{c}/manifest.json" for m, c in cells],
        "ablation": [f"results/ablation/{m}.parquet" for m in ab_models],
    }


def report_params(config: dict) -> dict[str, Any]:
    """The config sections the report reads (a rule param: editing them reruns only the report)."""
    return {
        "models": {m: {} for m in config.get("models") or {}},
        "codecs": config.get("codecs") or {},
        "report": config.get("report") or {},
        "claims": config.get("claims") or {},
        "ablation": config.get("ablation") or {},
        # the verdict thresholds only: other quality keys change the tables, which are inputs
        "quality": {"thresholds": (config.get("quality") or {}).get("thresholds") or {}},
    }


def figure_outputs(models: Iterable[str], root: str = "results/figures"):
    """``(path, caption, category, labels)`` of every figure, for ``report(...)`` outputs."""
    models = list(models)
    names = figure_names(models)
    out = []
    for m, f in zip(models, names["ratio"], strict=True):
        out.append(
            (
                f"{root}/{f}",
                "../report/ratio_vs_ctx.rst",
                "Compression ratio",
                {"model": m, "figure": "ratio vs context"},
            )
        )
    for s, f in zip(("K", "V"), names["rd"], strict=True):
        out.append(
            (
                f"{root}/{f}",
                "../report/rate_distortion.rst",
                "Rate-distortion",
                {"stream": s, "figure": "rate-distortion"},
            )
        )
    for m, f in zip(models, names["heatmap"], strict=True):
        out.append(
            (
                f"{root}/{f}",
                "../report/layer_error.rst",
                "Per-layer error",
                {"model": m, "figure": "layer error"},
            )
        )
    for f in names["rate_dppl"]:
        out.append(
            (
                f"{root}/{f}",
                "../report/rate_vs_dppl.rst",
                "Quality",
                {"figure": "rate vs delta-PPL"},
            )
        )
    return out
