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
from golden.fixtures import (
    CODECS,
    MODELS,
    ablation_table,
    codec_table,
    manifest,
    quality_table,
    write_tables,
)

from kvbench.aggregate import aggregate, build_metrics, build_summary, legacy_names
from kvbench.errors import KvbenchError
from kvbench.extrapolate import extrapolate
from kvbench.quality import quality_verdict
from kvbench.report import (
    attention_section,
    check_claims,
    mse_verdict,
    pair_statements,
    pareto_front,
    quality_cells,
    quality_statements,
    recommendations,
    render_decision,
    render_summary,
    report_settings,
    timing_table,
    verdict_flag,
    verdict_statements,
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
    # as config/config.yaml
    "quality": {
        "thresholds": {
            "accept": {"kl": 0.01, "delta_ppl": 0.02},
            "marginal": {"kl": 0.05, "delta_ppl": 0.10},
        }
    },
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
    metrics, summary, _, _ = tables
    for st in pair_statements(summary, CFG):
        a = summary[summary.codec == st.data["a"]].set_index(["model", "ctx"])
        b = summary[summary.codec == st.data["b"]].set_index(["model", "ctx"])
        k = int((a.total_ratio > b.total_ratio).sum())
        assert st.data["total_ratio"] == (k, len(a))
        assert f"on total ratio in {k}/{len(a)}" in st.text
        kv = int((a.v_rel_mse_mean < b.v_rel_mse_mean).sum())
        assert f"on V rel. MSE in {kv}/{len(a)}" in st.text
    # with the metrics: errors over the layers both codecs compress (tiny-gemma: full layers)
    for st in pair_statements(summary, CFG, metrics):
        ca, cb = st.data["a"], st.data["b"]
        for stream in ("k", "v"):
            m = metrics[(metrics.stream == stream) & metrics.compressed]
            wins = n = 0
            for _, g in m[m.codec.isin([ca, cb])].groupby(["model", "ctx"]):
                ea = g[g.codec == ca].set_index("layer").rel_mse
                eb = g[g.codec == cb].set_index("layer").rel_mse
                common = ea.index.intersection(eb.index)
                n += 1
                wins += ea[common].mean() < eb[common].mean()
            assert st.data[f"{stream}_rel_mse_mean"] == (wins, n)
        assert "errors over the layers both compress" in st.text


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
    assert "\n\n\n" not in text and not text.endswith("\n\n")
    assert "## Quality: attention and continuation" in text
    assert "![Rate vs relative ΔPPL](figures/rate_vs_dppl.png)" in text
    # every section renders content or says why not: no heading directly followed by another
    assert not re.search(r"^#+ .*\n\n#+ ", text, flags=re.M)
    assert "|\n</details>" not in text
    # tables without the attention columns, no quality tables, no timings: explicit sentences
    old = [m for m in metrics.columns if m.startswith("attn_")]
    bare = summary.drop(columns=[c for c in summary.columns if c.startswith("attn_")])
    no_quality = render_summary(
        summary=bare,
        metrics=metrics.drop(columns=old),
        extrap=extrap,
        cfg=CFG,
        manifests=manifests,
        machine=MACHINE,
    )
    assert "No continuation tables were given" in no_quality
    assert "carry attention metrics" in no_quality
    assert "No timing rows in this run" in no_quality
    assert "rate_vs_dppl" not in no_quality
    assert not re.search(r"^#+ .*\n\n#+ ", no_quality, flags=re.M)


def test_decision_golden(tables):
    summary = tables[1]
    text = render_decision(ablation_table(), summary, CFG, quality_table())
    _check_golden("DECISION.md", text)
    assert "\n\n\n" not in text and not text.endswith("\n\n")
    assert "no KL/ΔPPL is measured for\nablation cells" in text
    no_ab = render_decision(None, summary, CFG)
    assert "No ablation tables" in no_ab and "Codec choice" in no_ab
    assert "No continuation tables of a lossy codec" in no_ab and "⚑ **" not in no_ab
    q = quality_table()
    only_ref = render_decision(None, summary, CFG, q[q.codec == "identity"])
    assert "No continuation tables of a lossy codec" in only_ref and "| tiny-" in only_ref
    metrics, _, extrap, manifests = tables
    only_ref = render_summary(
        summary=summary,
        metrics=metrics,
        extrap=extrap,
        cfg=CFG,
        manifests=manifests,
        quality=q[q.codec == "identity"],
        machine=MACHINE,
    )
    assert "Only the reference (identity) has a continuation table" in only_ref
    assert "rate_vs_dppl" not in only_ref and "\n\n\n" not in only_ref


# ---------------------------------------------------------------------------------------------
# verdicts: MSE vs KL/ΔPPL (issue #5)


def test_mse_verdict_and_flag():
    th = report_settings(CFG)["mse_thresholds"]
    # default: accept = the error budget, marginal = twice it
    assert th["accept"] == {"k_rel_mse": 0.05, "v_rel_mse": 0.05}
    assert th["marginal"] == {"k_rel_mse": 0.1, "v_rel_mse": 0.1}
    assert mse_verdict(0.05, 0.0, th) == "ACCEPT"
    assert mse_verdict(0.01, 0.06, th) == "MARGINAL"  # the worse stream decides
    assert mse_verdict(0.2, 0.0, th) == "REJECT"
    assert mse_verdict(math.nan, 0.0, th) == "n/a"
    custom = report_settings(
        {
            "report": {
                "mse_thresholds": {"accept": {"k_rel_mse": 0.01}, "marginal": {"v_rel_mse": 1}}
            }
        }
    )["mse_thresholds"]
    assert custom["accept"] == {"k_rel_mse": 0.01, "v_rel_mse": 0.05}
    assert custom["marginal"] == {"k_rel_mse": 0.02, "v_rel_mse": 1.0}
    assert verdict_flag("ACCEPT", "REJECT") == "MSE optimistic"
    assert verdict_flag("REJECT", "MARGINAL") == "MSE pessimistic"
    assert verdict_flag("ACCEPT", "ACCEPT") == verdict_flag("n/a", "REJECT") == ""


def test_verdict_flags_follow_the_numbers(tables):
    """Each cell's two verdicts recomputed from the tables; flagged exactly when they differ."""
    _, summary, _, _ = tables
    q = quality_table()
    cells = quality_cells(q, summary, CFG)
    assert len(cells) == len(q)
    s = summary.set_index(["model", "ctx", "codec"])
    th_q = CFG["quality"]["thresholds"]
    for x in cells.itertuples():
        row = s.loc[(x.model, x.ctx, x.codec)]
        k, v = row.k_rel_mse_mean, row.v_rel_mse_mean
        want_mse = (
            "ACCEPT"
            if k <= 0.05 and v <= 0.05
            else "MARGINAL"
            if k <= 0.1 and v <= 0.1
            else "REJECT"
        )
        src = q[(q.model == x.model) & (q.codec == x.codec)].iloc[0]
        want_q = quality_verdict(src.kl_mean, src.delta_ppl_rel, th_q)
        assert (x.mse_verdict, x.quality_verdict) == (want_mse, want_q)
        assert (x.flag != "") == (want_mse != want_q)
        assert x.bits_per_value == pytest.approx(row.bits_per_value)
    c = cells.set_index(["model", "codec"])
    # the case the issue names: MSE ACCEPT, KL/ΔPPL REJECT -> flagged
    assert c.loc[("tiny-llama", "turbo3"), ["mse_verdict", "quality_verdict", "flag"]].tolist() == [
        "ACCEPT",
        "REJECT",
        "MSE optimistic",
    ]
    assert c.loc[("tiny-gemma", "kakeya"), "flag"] == "MSE pessimistic"
    assert c.loc[("tiny-llama", "turbo4"), "flag"] == ""
    # statements and the rendered DECISION carry exactly the flagged cells
    flags = verdict_statements(cells, CFG)
    flagged = cells[(cells.flag != "") & (cells.codec != "identity")]
    assert {(f.data["model"], f.data["codec"]) for f in flags} == set(
        zip(flagged.model, flagged.codec, strict=True)
    )
    text = render_decision(None, summary, CFG, q)
    for f in flags:
        assert f.text in text
        assert f"{f.data['mse_verdict']} (K" in f.text
        assert f"KL/ΔPPL verdict {f.data['quality_verdict']}" in f.text
    n = int((cells.codec != "identity").sum())
    assert f"{len(flagged)} of {n} measured codec cells" in text
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| tiny-")]
    flagged_rows = [ln for ln in table_rows if "⚑" in ln]
    assert len(flagged_rows) == len(flagged)
    assert any(
        "| turbo3 |" in ln and "**ACCEPT**" in ln and "**REJECT**" in ln for ln in flagged_rows
    )
    # the codec chosen under the budget (turbo3) is covered by a KL/ΔPPL verdict
    assert "**turbo3** KL/ΔPPL verdict where measured: tiny-llama 4k: REJECT" in text


def test_quality_statements_match_cells(tables):
    _, summary, _, _ = tables
    cells = quality_cells(quality_table(), summary, CFG)
    stmts = quality_statements(cells, CFG)
    for st in stmts[:-1]:
        g = cells[(cells.model == st.data["model"]) & (cells.codec != "identity")]
        assert st.data["verdicts"] == dict(zip(g.codec, g.quality_verdict, strict=True))
        ok = g[g.quality_verdict == "ACCEPT"].sort_values("bits_per_value")
        assert st.data["best_accept"] == (ok.codec.iloc[0] if len(ok) else None)
    last = stmts[-1].data
    assert last["flagged"] == int(((cells.flag != "") & (cells.codec != "identity")).sum())


def test_budget_choice_without_quality_is_named(tables):
    _, summary, _, _ = tables
    q = quality_table()
    text = render_decision(None, summary, CFG, q[q.codec != "turbo3"])
    assert "**turbo3** (chosen in 6 cells) has no continuation measurement" in text


# ---------------------------------------------------------------------------------------------
# attention columns


def test_attention_summary_over_compressed_layers(tables):
    metrics, summary, _, _ = tables
    s = summary.set_index(["model", "ctx", "codec"])
    for key in (("tiny-gemma", 4096, "kakeya"), ("tiny-llama", 8192, "turbo3")):
        m = metrics[(metrics.model == key[0]) & (metrics.ctx == key[1]) & (metrics.codec == key[2])]
        layers = m.groupby("layer").agg(c=("compressed", "any"), kl=("attn_kl", "first"))
        layers = layers[layers.c]
        assert s.loc[key, "attn_n_layers"] == len(layers)
        assert s.loc[key, "attn_kl_mean"] == pytest.approx(layers.kl.mean())
        assert s.loc[key, "attn_kl_max"] == pytest.approx(layers.kl.max())
    assert s.loc[("tiny-gemma", 4096, "kakeya"), "attn_n_layers"] == 2  # full layers only
    assert (s.xs("identity", level="codec")["attn_kl_mean"] == 0).all()


def test_attention_section_partial_tables(tables):
    """Cells whose codec tables predate the attention columns are counted and the continuation
    runs' attention means are shown next to them; complete tables show only the codec tables'."""
    metrics, _, _, _ = tables
    m = metrics.copy()
    m.loc[m.ctx != 4096, ["attn_kl", "attn_top1", "attn_top8", "attn_out_rel_err"]] = np.nan
    part = build_summary(m)
    sec = attention_section(part, quality_table(), CFG)
    assert sec["models"] and all(a["ctx"] == "4k" and a["all"] is None for a in sec["models"])
    assert sec["notes"] and sec["notes"][0].startswith(f"{2 * len(MODELS) * len(CODECS)} of ")
    assert sec["quality_tables"]
    full = attention_section(build_summary(metrics), quality_table(), CFG)
    assert not full["notes"] and not full["quality_tables"]
    assert all(a["ctx"] == "8k" and a["all"] is not None for a in full["models"])


def test_timing_falls_back_to_timed_context(tables):
    _, summary, _, _ = tables
    t = pd.DataFrame(
        {
            "model": "tiny-llama",
            "ctx": 2048,
            "codec": "turbo3",
            "layer": [0, 1],
            "stream": "k",
            "encode_s": [0.5, 0.25],
            "decode_s": [0.125, 0.125],
            "backend": "cpu",
        }
    )
    table = timing_table(t, summary, CFG)
    assert table.rows == [["tiny-llama", "2k", "turbo3", "0.750", "0.250", "cpu"]]
    assert timing_table(t.iloc[:0], summary, CFG) is None


# ---------------------------------------------------------------------------------------------
# the report rule end to end + figures


def test_write_reports_and_figures(tmp_path, tables):
    """The report rule's function end to end on one model: files, PNGs, deterministic bytes."""
    import json

    from kvbench.plots import plot_rate_distortion, plot_rate_vs_dppl
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
    qpaths = []
    for row in quality_table(models=["tiny-gemma"]).to_dict("records"):
        qp = res / "quality" / row["model"] / f"ctx{row['ctx']}" / f"{row['codec']}.parquet"
        write_parquet(pd.DataFrame([row]), qp)
        qpaths.append(qp)
    write_reports(
        metrics=files["metrics"],
        summary=files["summary"],
        extrapolation=files["extrapolation"],
        timings=files["timings"],
        manifests=caps,
        ablation=[ab],
        quality=qpaths,
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
    cells = quality_cells(quality_table(models=["tiny-gemma"]), summary, cfg)
    plot_rate_vs_dppl(cells, cfg, again, dpi=110)
    assert again.read_bytes() == (res / "figures" / "rate_vs_dppl.png").read_bytes()
    decision = (res / "DECISION.md").read_text()
    assert "**Verdict.**" in decision and "⚑ **turbo3** on tiny-gemma" in decision
    assert "## Timing" in text and "### Continuation on a compressed prefix cache" in text
    # no continuation tables: the figure is still drawn (a note), so the rule's outputs hold
    plot_rate_vs_dppl(None, cfg, again, dpi=40)
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_survives_nan_errors(tmp_path, tables):
    from kvbench.plots import plot_layer_error

    metrics, summary, _, _ = tables
    m = metrics.copy()
    m.loc[m.codec == "turbo4", "rel_mse"] = np.nan
    plot_layer_error(m, summary, "tiny-llama", CFG, tmp_path / "h.png", dpi=40)
    assert (tmp_path / "h.png").stat().st_size > 0
