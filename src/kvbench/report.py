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
    "exclude_from_wins": ["identity"],
    "figure_dpi": 110,
}


def report_settings(cfg: dict | None) -> dict[str, Any]:
    r = {**REPORT_DEFAULTS, **((cfg or {}).get("report") or {})}
    r["budget"] = {**REPORT_DEFAULTS["budget"], **(r.get("budget") or {})}
    return r


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


def environment(manifests: list[dict], machine: dict | None = None) -> dict[str, Any]:
    """Models, corpus, seeds, versions from the capture manifests (+ the rendering machine)."""
    by_model: dict[str, list[dict]] = {}
    for m in manifests:
        by_model.setdefault(str(m.get("model")), []).append(m)
    rows = []
    corpus_rows = []
    versions: dict[str, set] = {}
    seeds, corpora, attn = set(), set(), set()
    for model in sorted(by_model):
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


def pair_statements(summary: pd.DataFrame, cfg: dict) -> list[Statement]:
    """For each configured pair (a, b): in how many cells a beats b, per metric."""
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
            va, vb = sa.loc[common, metric], sb.loc[common, metric]
            ok = (va > vb) if better == "higher" else (va < vb)
            both = va.notna() & vb.notna()
            k, n = int((ok & both).sum()), int(both.sum())
            data[metric] = (k, n)
            if n:
                if better == "higher":
                    fac = (va[both] / vb[both]).to_numpy()
                else:
                    fac = (vb[both] / va[both]).to_numpy()
                fac = fac[np.isfinite(fac)]
                rng = f" (advantage {fmt_num(fac.min())}–{fmt_num(fac.max())}×)" if len(fac) else ""
                parts.append(f"on {label} in {k}/{n}{rng}")
        cells = summary.set_index(["model", "ctx"]).loc[common].reset_index()
        text = (
            f"**{a}** beats **{b}** " + ", ".join(parts) + f" of the cells ({_span_text(cells)})."
        )
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
) -> list[str]:
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
    if quality is None or quality.empty:
        out.append(
            "Errors are reconstruction errors of the captured tensors (K and V separately, plus "
            "q·k error on sampled queries), not end-to-end quality: no attention-output or "
            "continuation metrics in this run."
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
    if timings is None or timings.empty:
        return None
    rows = []
    for model in model_order(cfg, timings["model"]):
        ctx = error_ctx(summary, cfg, model)
        t = timings[(timings["model"] == model) & (timings["ctx"] == ctx)]
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
    return Table(
        ["model", "ctx", "codec", "encode s", "decode s", "backend"],
        rows,
        ["l", "r", "l", "r", "r", "l"],
    )


QUALITY_KEYS = {
    "model",
    "ctx",
    "codec",
    "layer",
    "stream",
    "family",
    "stream_codec",
    "layer_type",
    "n_kv",
    "tokens",
    "head_dim",
    "compressed",
}
#: Columns of the quality tables shown when present (kvbench.quality.QUALITY_COLUMNS), with labels.
QUALITY_SHOWN = {
    "delta_ppl_rel": ("Δ PPL", fmt_pct),
    "kl_mean": ("KL mean", fmt_err),
    "kl_p99": ("KL p99", fmt_err),
    "top1_agree": ("top-1 agree", fmt_pct),
    "mean_attn_kl": ("attn KL", fmt_err),
    "mean_attn_top1": ("attn top-1", fmt_pct),
    "mean_attn_out_rel_err": ("attn out rel. err", fmt_err),
    "verdict": ("verdict", str),
}


def quality_tables(quality: pd.DataFrame | None, cfg: dict) -> list[dict]:
    """QUALITY BLOCK: per (model, ctx, codec) the known quality columns (means over rows), else
    every numeric column."""
    if quality is None or quality.empty:
        return []
    shown = [c for c in QUALITY_SHOWN if c in quality.columns]
    if shown:
        cols = [(c, *QUALITY_SHOWN[c]) for c in shown]
    else:
        cols = [
            (c, c, fmt_err)
            for c in quality.columns
            if c not in QUALITY_KEYS
            and pd.api.types.is_numeric_dtype(quality[c])
            and not pd.api.types.is_bool_dtype(quality[c])
        ]
    out = []
    for model in model_order(cfg, quality["model"]):
        q = quality[quality["model"] == model]
        rows = []
        for ctx in sorted(q["ctx"].unique()):
            for codec in codec_order(cfg, q.loc[q["ctx"] == ctx, "codec"]):
                g = q[(q["ctx"] == ctx) & (q["codec"] == codec)]
                cells = []
                for c, _, f in cols:
                    if pd.api.types.is_numeric_dtype(g[c]) and not pd.api.types.is_bool_dtype(g[c]):
                        cells.append(f(g[c].mean()))
                    else:
                        cells.append("/".join(sorted({str(v) for v in g[c]})))
                rows.append([fmt_ctx(ctx), codec, *cells])
        out.append(
            {
                "model": model,
                "table": Table(
                    ["ctx", "codec", *[label for _, label, _ in cols]],
                    rows,
                    ["r", "l"] + ["l" if f is str else "r" for _, _, f in cols],
                ),
            }
        )
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
    rec_table, _ = recommendations(summary, cfg)
    models = model_order(cfg, summary["model"])
    figs = figure_names(models)
    return {
        "env": environment(manifests, machine),
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
        "pairs": pair_statements(summary, cfg),
        "pareto": pareto_statements(summary, cfg),
        "recommend": rec_table,
        "budget": r["budget"],
        "legacy": legacy_table(summary, cfg),
        "claims": check_claims(cfg.get("claims"), tables),
        "limitations": limitations(summary, extrap, manifests, quality),
        "timings": timing_table(timings, summary, cfg),
        "quality": quality_tables(quality, cfg),
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
) -> dict[str, Any]:
    from kvbench import ablation as ab

    s = ab.settings(cfg.get("ablation"))
    rec_table, _ = recommendations(summary, cfg)
    ctx: dict[str, Any] = {
        "settings": s,
        "recommend": rec_table,
        "budget": report_settings(cfg)["budget"],
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


def render_decision(ablation: pd.DataFrame | None, summary: pd.DataFrame, cfg: dict) -> str:
    return _env().get_template("DECISION.md.j2").render(**decision_context(ablation, summary, cfg))


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
    made = make_figures(s, m, e, cfg, fig_dir)
    missing = {Path(f).name for f in figures} - {p.name for p in made}
    if missing:
        raise KvbenchError(f"report: figures {sorted(missing)} were expected but not drawn")
    atomic_write_text(summary_md, text)
    atomic_write_text(decision_md, render_decision(ab, s, cfg))


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
    return out
