"""Aggregation, generated statements, claims, golden SUMMARY/DECISION files and figure smoke.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/test_report.py``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from golden.fixtures import CODECS, MODELS, ablation_table, codec_table, manifest, write_tables

from kvbench.aggregate import aggregate, build_metrics, build_summary, legacy_names
from kvbench.errors import KvbenchError
from kvbench.extrapolate import extrapolate
from kvbench.report import (
    check_claims,
    pair_statements,
    pareto_front,
    recommendations,
    render_decision,
    render_summary,
    win_statements,
    write_reports,
)

GOLDEN = Path(__file__).parent / "golden"
CONTEXTS = (2048, 4096, 8192)
MACHINE = {"platform": "golden-test"}

CLAIMS = {
    "C1": {
        "claim": "TurboQuant wins on raw ratio below 32k on every model.",
        "note": "even turbo4 beats kakeya",
        "type": "compare",
        "params": {"a": ["turbo4"], "b": ["kakeya"], "metric": "total_ratio", "ctx_max": 32767},
    },
    "C2": {
        "claim": "Kakeya overtakes turbo4 at long context.",
        "type": "compare",
        "params": {
            "a": ["kakeya"],
            "b": ["turbo4"],
            "metric": "total_ratio",
            "ctx": [131072],
            "source": "extrapolated",
            "legacy": ["bf16_projection", "norm_free"],
        },
    },
    "C3": {
        "claim": "On K, Kakeya's MSE is far lower than turbo3's.",
        "type": "error_compare",
        "params": {
            "a": "kakeya",
            "b": "turbo3",
            "stream": "k",
            "metric": "mse",
            "min_factor": 8,
            "max_factor": 400,
        },
    },
    "C4": {
        "claim": "On V, TurboQuant's MSE is 2-10x lower.",
        "type": "error_compare",
        "params": {
            "a": "turbo3",
            "b": "kakeya",
            "stream": "v",
            "metric": "mse",
            "min_factor": 2,
            "max_factor": 10,
        },
    },
    "C5": {
        "claim": "Kakeya-K + turbo-V reaches ~8-10x at long context.",
        "type": "threshold",
        "params": {
            "codecs": ["kakeyaK_turbo3V", "kakeyaK_turbo4V"],
            "metric": "total_ratio",
            "ctx": [131072],
            "source": "extrapolated",
            "min": 8,
            "max": 10,
        },
    },
    "C6": {
        "claim": "A codec this run does not have.",
        "type": "threshold",
        "params": {"codecs": ["nope"], "metric": "total_ratio", "min": 2},
    },
}

CFG = {
    "models": {m: {} for m in ("tiny-llama", "tiny-gemma")},
    "codecs": CODECS,
    "report": {"pairs": [["turbo3", "kakeya"], ["turbo4", "kakeya"]]},
    "claims": CLAIMS,
    "ablation": {},
}


@pytest.fixture(scope="module")
def tables():
    raw = pd.concat(
        [codec_table(m, c, k) for m in MODELS for c in CONTEXTS for k in CODECS],
        ignore_index=True,
    )
    metrics = build_metrics(raw)
    summary = build_summary(metrics)
    extrap = extrapolate(metrics, codecs_cfg=CODECS, summary=summary)
    manifests = [manifest(m, c) for m in MODELS for c in CONTEXTS]
    return metrics, summary, extrap, manifests


def quality_table() -> pd.DataFrame:
    rows = []
    for codec, kl in (("identity", 0.0), ("turbo3", 0.012), ("kakeya", 0.03)):
        rows.append(
            {
                "model": "tiny-llama",
                "ctx": 4096,
                "codec": codec,
                "family": "x",
                "delta_ppl_rel": kl / 2,
                "kl_mean": kl,
                "kl_p99": 5 * kl,
                "top1_agree": 1 - kl,
                "mean_attn_kl": kl / 10,
                "mean_attn_top1": 1 - kl / 3,
                "mean_attn_out_rel_err": kl * 3,
            }
        )
    return pd.DataFrame(rows)


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1)"


# ---------------------------------------------------------------------------------------------
# aggregation


def test_ratios_follow_spec_1_7(tables):
    metrics, summary, _, _ = tables
    s = summary.set_index(["model", "ctx", "codec"])
    g = metrics[
        (metrics.model == "tiny-gemma") & (metrics.ctx == 4096) & (metrics.codec == "kakeya")
    ]
    full = g[g.layer_type == "full"]
    row = s.loc[("tiny-gemma", 4096, "kakeya")]
    assert row.full_ratio == pytest.approx(full.baseline_bytes.sum() / full.bytes_total.sum())
    assert row.total_ratio == pytest.approx(g.baseline_bytes.sum() / g.bytes_total.sum())
    # sliding layers pass through at baseline size: total ratio < full ratio
    assert (
        g[g.layer_type == "sliding"].bytes_passthrough
        == g[g.layer_type == "sliding"].baseline_bytes
    ).all()
    assert row.total_ratio < row.full_ratio
    # an all-full model: total == full
    r = s.loc[("tiny-llama", 4096, "kakeya")]
    assert r.total_ratio == pytest.approx(r.full_ratio)
    assert (s.loc[(slice(None), slice(None), "identity"), "total_ratio"] == 1).all()
    # metrics carries the broadcast ratios
    m = metrics[
        (metrics.model == "tiny-gemma") & (metrics.ctx == 4096) & (metrics.codec == "kakeya")
    ]
    assert (m.total_ratio == row.total_ratio).all()
    # error summaries only over compressed layers
    k = g[(g.stream == "k") & g.compressed]
    assert row.k_rel_mse_mean == pytest.approx(k.rel_mse.mean())
    assert row.k_n_compressed == 2
    assert row.k_worst_layer == int(k.loc[k.rel_mse.idxmax(), "layer"])


def test_legacy_conventions_and_parts():
    df = pd.DataFrame(
        columns=[
            "legacy_kt_bytes",
            "legacy_kt_skeleton_bytes",
            "legacy_kt_codes_bytes",
            "legacy_f32_store",
            "legacy_bf16_projection",
            "legacy_norm_free",
        ]
    )
    assert legacy_names(df) == ["bf16_projection", "f32_store", "kt_bytes", "norm_free"]


def test_legacy_ratio_uses_honest_bytes_where_undefined(tables):
    metrics, summary, _, _ = tables
    g = metrics[
        (metrics.model == "tiny-gemma") & (metrics.ctx == 8192) & (metrics.codec == "kakeya")
    ]
    legacy = g.legacy_bf16_projection.where(g.legacy_bf16_projection.notna(), g.bytes_total)
    row = summary.set_index(["model", "ctx", "codec"]).loc[("tiny-gemma", 8192, "kakeya")]
    assert row.legacy_bf16_projection_total_ratio == pytest.approx(
        g.baseline_bytes.sum() / legacy.sum()
    )
    assert math.isnan(row.legacy_norm_free_total_ratio)


def test_aggregate_from_files_is_deterministic(tmp_path):
    paths, timings = write_tables(tmp_path, contexts=(2048,))
    a = aggregate(paths, timings)
    b = aggregate(list(reversed(paths)), timings)
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y)
    metrics, summary, t = a
    assert len(summary) == len(MODELS) * len(CODECS)
    assert len(t) == len(metrics)


def test_aggregate_rejects_broken_tables(tmp_path):
    t = codec_table("tiny-llama", 2048, "turbo3")
    t.loc[0, "bytes_total"] += 1
    p = tmp_path / "bad.parquet"
    t.to_parquet(p)
    with pytest.raises(KvbenchError, match="bad.parquet"):
        aggregate([p])
    t = codec_table("tiny-llama", 2048, "turbo3").drop(columns=["rel_mse"])
    t.to_parquet(p)
    with pytest.raises(KvbenchError, match="rel_mse"):
        aggregate([p])


# ---------------------------------------------------------------------------------------------
# generated statements are true


def test_win_statements_match_tables(tables):
    _, summary, _, _ = tables
    stmts = {s.data["metric"]: s for s in win_statements(summary, CFG)}
    s = summary[summary.codec != "identity"]
    for metric, better in (
        ("total_ratio", "max"),
        ("k_rel_mse_mean", "min"),
        ("v_rel_mse_mean", "min"),
    ):
        idx = (
            s.groupby(["model", "ctx"])[metric].idxmax()
            if better == "max"
            else s.groupby(["model", "ctx"])[metric].idxmin()
        )
        counts = s.loc[idx, "codec"].value_counts().to_dict()
        st = stmts[metric]
        assert st.data["wins"] == counts
        lead = max(counts, key=counts.get)
        assert re.search(
            rf"\*\*{lead}\*\* has the \w+ .* in {counts[lead]}/{len(idx)} cells", st.text
        )


def test_pair_statements_match_tables(tables):
    _, summary, _, _ = tables
    for st in pair_statements(summary, CFG):
        a = summary[summary.codec == st.data["a"]].set_index(["model", "ctx"])
        b = summary[summary.codec == st.data["b"]].set_index(["model", "ctx"])
        k = int((a.total_ratio > b.total_ratio).sum())
        assert st.data["total_ratio"] == (k, len(a))
        assert f"on total ratio in {k}/{len(a)}" in st.text
        kv = int((a.v_rel_mse_mean < b.v_rel_mse_mean).sum())
        assert f"on V rel. MSE in {kv}/{len(a)}" in st.text


def test_pareto_front():
    pts = [("a", 2, 0.1), ("b", 3, 0.05), ("c", 3, 0.2), ("d", 1, 0.5), ("e", 2, 0.1)]
    assert pareto_front(pts) == ["a", "b", "d", "e"]  # c dominated; ties both kept
    assert pareto_front([("x", float("nan"), 1.0)]) == []


def test_recommendation_respects_budget(tables):
    _, summary, _, _ = tables
    cfg = {**CFG, "report": {"budget": {"k_rel_mse": 0.02, "v_rel_mse": 0.02}}}
    _, recs = recommendations(summary, cfg)
    for r in recs:
        s = summary[(summary.model == r.data["model"]) & (summary.ctx == r.data["ctx"])]
        ok = s[(s.k_rel_mse_mean <= 0.02) & (s.v_rel_mse_mean <= 0.02) & (s.codec != "identity")]
        assert r.data["codec"] == ok.sort_values("total_ratio").iloc[-1].codec
    assert {r.data["codec"] for r in recs} == {"turbo4"}


# ---------------------------------------------------------------------------------------------
# claims


def test_claims_statuses_and_numbers(tables):
    metrics, summary, extrap, _ = tables
    res = {
        c.id: c
        for c in check_claims(
            CLAIMS, {"summary": summary, "metrics": metrics, "extrapolation": extrap}
        )
    }
    assert res["C1"].status == "confirmed" and (res["C1"].passed, res["C1"].cells) == (6, 6)
    assert res["C1"].note == "even turbo4 beats kakeya"
    assert res["C2"].status == "refuted" and res["C2"].cells == 2
    assert "Under the study's own byte conventions" in res["C2"].evidence
    # C3: recompute the factor on the common compressed layers
    k = metrics[(metrics.stream == "k") & metrics.compressed]
    fac = []
    for _, g in k[k.codec.isin(["kakeya", "turbo3"])].groupby(["model", "ctx"]):
        a = g[g.codec == "kakeya"].set_index("layer").mse
        b = g[g.codec == "turbo3"].set_index("layer").mse
        common = a.index.intersection(b.index)
        fac.append(b[common].mean() / a[common].mean())
    assert res["C3"].passed == sum(f >= 8 for f in fac) and res["C3"].cells == len(fac)
    assert res["C3"].status == ("confirmed" if all(f >= 8 for f in fac) else "refuted")
    assert f"{min(fac):.1f}–{max(fac):.1f}×" in res["C3"].evidence
    assert res["C4"].status == "confirmed"
    assert res["C5"].status == "refuted" and "kakeyaK_turbo3V" in res["C5"].table.rows[0][2]
    assert res["C6"].status == "not testable here" and "nope" in res["C6"].evidence


def test_unknown_claim_type_is_named():
    with pytest.raises(KvbenchError, match="claims.X: unknown type"):
        check_claims({"X": {"type": "vibes"}}, {})


def test_repository_claims_are_well_formed(tables):
    """The claims shipped in config/config.yaml evaluate (codecs missing here: not testable)."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    metrics, summary, extrap, _ = tables
    res = check_claims(
        cfg["claims"], {"summary": summary, "metrics": metrics, "extrapolation": extrap}
    )
    assert len(res) == 5
    assert all(r.status in ("confirmed", "refuted", "not testable here") for r in res)


# ---------------------------------------------------------------------------------------------
# golden files


def test_summary_golden(tables):
    metrics, summary, extrap, manifests = tables
    timings = pd.concat(
        [
            pd.DataFrame(
                {
                    "model": m,
                    "ctx": 8192,
                    "codec": c,
                    "layer": [0, 1],
                    "stream": "k",
                    "encode_s": [0.25, 0.5],
                    "decode_s": [0.125, 0.125],
                    "backend": "cpu",
                }
            )
            for m in MODELS
            for c in CODECS
        ],
        ignore_index=True,
    )
    text = render_summary(
        summary=summary,
        metrics=metrics,
        extrap=extrap,
        cfg=CFG,
        manifests=manifests,
        timings=timings,
        quality=quality_table(),
        machine=MACHINE,
    )
    _check_golden("SUMMARY.md", text)
    assert "## Quality: attention and continuation" in text
    no_quality = render_summary(
        summary=summary,
        metrics=metrics,
        extrap=extrap,
        cfg=CFG,
        manifests=manifests,
        machine=MACHINE,
    )
    assert "Quality: attention" not in no_quality and "## Timing" not in no_quality


def test_decision_golden(tables):
    _, summary, _, _ = tables
    _check_golden("DECISION.md", render_decision(ablation_table(), summary, CFG))
    no_ab = render_decision(None, summary, CFG)
    assert "No ablation tables" in no_ab and "Codec choice" in no_ab


# ---------------------------------------------------------------------------------------------
# the report rule end to end + figures


def test_write_reports_and_figures(tmp_path, tables):
    """The report rule's function end to end on one model: files, PNGs, deterministic bytes."""
    import json

    from kvbench.plots import plot_rate_distortion
    from kvbench.report import figure_names
    from kvbench.tables import write_parquet

    metrics, summary, extrap, manifests = (
        t[t["model"] == "tiny-gemma"] if isinstance(t, pd.DataFrame) else t for t in tables
    )
    cfg = {**CFG, "models": {"tiny-gemma": {}}}
    res = tmp_path / "results"
    files = {}
    timings = metrics[["model", "ctx", "codec", "layer", "stream"]].assign(
        encode_s=0.1, decode_s=0.1, backend="cpu"
    )
    for name, df in (
        ("metrics", metrics),
        ("summary", summary),
        ("extrapolation", extrap),
        ("timings", timings),
    ):
        files[name] = res / f"{name}.parquet"
        write_parquet(df, files[name])
    caps = []
    for man in manifests:
        if man["model"] != "tiny-gemma":
            continue
        d = res / "kv" / man["model"] / f"ctx{man['ctx']}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps(man))
        caps.append(d)
    ab = res / "ablation" / "tiny-gemma.parquet"
    write_parquet(ablation_table(models=("tiny-gemma",)), ab)
    figs = [res / "figures" / f for v in figure_names(["tiny-gemma"]).values() for f in v]
    write_reports(
        metrics=files["metrics"],
        summary=files["summary"],
        extrapolation=files["extrapolation"],
        timings=files["timings"],
        manifests=caps,
        ablation=[ab],
        quality=[],
        cfg=cfg,
        summary_md=res / "SUMMARY.md",
        decision_md=res / "DECISION.md",
        figures=figs,
        machine=MACHINE,
    )
    text = (res / "SUMMARY.md").read_text()
    for f in figs:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert b"Software" not in data and b"Creation" not in data
        assert f"figures/{f.name}" in text
    again = tmp_path / "again.png"
    plot_rate_distortion(summary, "k", cfg, again, dpi=110)
    assert again.read_bytes() == (res / "figures" / "rate_distortion_k.png").read_bytes()
    assert "**Verdict.**" in (res / "DECISION.md").read_text()
    assert "## Timing" in text


def test_heatmap_survives_nan_errors(tmp_path, tables):
    from kvbench.plots import plot_layer_error

    metrics, summary, _, _ = tables
    m = metrics.copy()
    m.loc[m.codec == "turbo4", "rel_mse"] = np.nan
    plot_layer_error(m, summary, "tiny-llama", CFG, tmp_path / "h.png", dpi=40)
    assert (tmp_path / "h.png").stat().st_size > 0
