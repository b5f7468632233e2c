"""Byte extrapolation: exact where the byte formula is exact, labelled estimates elsewhere."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from golden.fixtures import CODECS, MODELS, codec_table

from kvbench.aggregate import build_metrics
from kvbench.extrapolate import (
    CodecInfo,
    extrapolate,
    fit_series,
    kakeya_layout,
    kakeyaturbo_layout,
    validate,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metrics():
    raw = pd.concat(
        [codec_table(m, c, k) for m in MODELS for c in (2048, 4096, 8192) for k in CODECS],
        ignore_index=True,
    )
    return build_metrics(raw)


def test_predict_8k_from_2k_and_4k(metrics):
    v = validate(metrics, [2048, 4096], 8192, CODECS).set_index(["model", "codec"])
    assert len(v) == len(MODELS) * len(CODECS)
    for (model, codec), r in v.iterrows():
        if codec in ("identity", "turbo3", "turbo4"):  # per-token: exact to the byte
            assert r.exact and r.rel_err_bytes == 0 and r.abs_err_ratio == 0, (model, codec)
        else:  # block codec: codes and tail exact, skeleton estimated from the per-block mean
            assert not r.exact
            assert r.bytes_codes_pred == r.bytes_codes_meas
            assert r.bytes_tail_pred == r.bytes_tail_meas
            assert r.bytes_passthrough_pred == r.bytes_passthrough_meas
            assert r.bytes_skeleton_pred != r.bytes_skeleton_meas
            assert abs(r.rel_err_bytes) < 0.02 and r.abs_err_ratio < 0.03, (model, codec)
            assert "skeleton: per_block_mean@4096" in r.method


def test_table_shape_and_labels(metrics):
    e = extrapolate(metrics, [16384, 131072], CODECS)
    assert set(e.source) == {"measured", "extrapolated"}
    assert sorted(e.ctx.unique()) == [2048, 4096, 8192, 16384, 131072]
    assert (e.loc[e.source == "measured", "exact"]).all()
    proj = e[e.source == "extrapolated"].set_index(["model", "codec", "ctx"])
    assert proj.loc[("tiny-llama", "turbo3", 131072), "exact"]
    k = proj.loc[("tiny-llama", "kakeya", 131072)]
    assert not k.exact and k.exact_codes and k.exact_tail and not k.exact_skeleton
    assert 0 < k.estimated_fraction < 1
    assert k.bytes_estimated == k.bytes_skeleton
    # byte categories sum to the total; ratios follow
    cats = [f"bytes_{f}" for f in ("skeleton", "codes", "norms", "tail", "passthrough")]
    assert (e[cats].sum(axis=1) == e.bytes_total).all()
    assert np.allclose(e.total_ratio, e.baseline_bytes_total / e.bytes_total)
    # a per-token codec's ratio does not change with context
    t3 = e[(e.model == "tiny-llama") & (e.codec == "turbo3")].total_ratio
    assert np.allclose(t3, t3.iloc[0])
    # baselines scale exactly: full layers linear, sliding windows constant
    g = e[(e.model == "tiny-gemma") & (e.codec == "identity")].set_index("ctx")
    slide = g.baseline_bytes_total - g.baseline_bytes_full
    assert (slide == slide.iloc[0]).all()
    assert g.loc[131072, "baseline_bytes_full"] == 16 * g.loc[8192, "baseline_bytes_full"]


def test_sliding_layers_are_constant(metrics):
    from kvbench.extrapolate import project_layers

    p = project_layers(metrics, [65536], CODECS)
    s = p[(p.model == "tiny-gemma") & (p.layer_type == "sliding")]
    m = metrics[
        (metrics.model == "tiny-gemma") & (metrics.ctx == 8192) & (metrics.layer_type == "sliding")
    ]
    merged = s.merge(m, on=["codec", "layer", "stream"], suffixes=("", "_m"))
    assert len(merged) == len(s) > 0
    for f in ("skeleton", "codes", "norms", "tail", "passthrough"):
        assert (merged[f"bytes_{f}"] == merged[f"bytes_{f}_m"]).all()
    assert set(merged.method_passthrough) | set(merged.method_codes) <= {"window_constant", "zero"}


def test_fit_series():
    f = fit_series([1000, 2000], [3400, 6800], 8000)
    assert (f.value, f.method, f.exact) == (27200, "linear_verified", True)
    f = fit_series([2000], [6800], 8000)
    assert (f.value, f.exact) == (27200, False) and f.method == "linear_single_ctx"
    f = fit_series([1000, 2000, 4000], [1100, 2100, 4100], 8000)  # constant + per token
    assert (f.value, f.method, f.exact) == (8100, "affine_verified", True)
    f = fit_series([1000, 2000], [1100, 2100], 8000)
    assert (f.value, f.exact) == (8100, False)
    assert fit_series([1, 2], [0, 0], 9).method == "zero"


def test_layout_mismatch_is_labelled(metrics):
    m = metrics[(metrics.model == "tiny-llama") & (metrics.codec == "kakeya")].copy()
    m["bytes_tail"] = m["bytes_tail"] * 2  # not what the configured layout predicts
    m["bytes_total"] = m[
        [c for c in m.columns if c.startswith("bytes_") and c != "bytes_total"]
    ].sum(axis=1)
    e = extrapolate(m, [32768], CODECS)
    row = e[e.source == "extrapolated"].iloc[0]
    assert not row.exact and "layout_mismatch" in row.method


def test_layouts_match_the_codecs():
    """The layout functions agree with the real codecs' tail bytes (the codec contract)."""
    from kvbench.codecs.base import build_from_spec

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 300, 16)).astype(np.float32)
    kv1 = build_from_spec("k", {"family": "kakeya", "block_size": 64, "residual_length": 32})
    nb = kv1.nbytes(kv1.encode(x))
    lay = kakeya_layout(kv1.params, 2, 300, 16)
    assert nb["tail"] == 2 * 16 * lay.tail_rows and lay.blocks == 4
    kt = build_from_spec("t", {"family": "kakeyaturbo", "block_size": 64})
    nb = kt.nbytes(kt.encode(x))
    lay = kakeyaturbo_layout(kt.params, 2, 300, 16)
    assert nb["tail"] == 2 * 16 * lay.tail_rows and lay.blocks == 9
    info = CodecInfo("kakeyaturbo", {"kakeyaturbo": {"family": "kakeyaturbo"}})
    assert info.params["block_size"] == 512 and info.layout(1, 4096, 64).blocks == 8


def _real_metrics() -> pd.DataFrame | None:
    paths = sorted(glob.glob(str(REPO / "results" / "codec" / "*" / "ctx*" / "*.parquet")))
    if not paths:
        return None
    from kvbench.aggregate import concat_tables

    return build_metrics(concat_tables(paths))


def test_real_tables_if_present():
    """On the pipeline's own tables: predict each model's longest context from the others."""
    import yaml

    m = _real_metrics()
    if m is None:
        pytest.skip("no results/codec tables (run the pipeline first)")
    codecs = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["codecs"]
    checked = 0
    for model in sorted(m.model.unique()):
        mm = m[m.model == model]
        ctxs = sorted(mm.ctx.unique())
        full = [c for c in mm.codec.unique() if set(mm[mm.codec == c].ctx) >= set(ctxs)]
        if len(ctxs) < 2:
            continue
        v = validate(mm[mm.codec.isin(full)], ctxs[:-1], ctxs[-1], codecs)
        assert (v.loc[v.exact, "rel_err_bytes"] == 0).all(), v[v.exact]
        assert (v.rel_err_bytes.abs() < 0.05).all(), v[["codec", "rel_err_bytes", "method"]]
        checked += len(v)
    if not checked:
        pytest.skip("no model has two or more measured contexts")
