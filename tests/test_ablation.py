"""K-side variance_ratio x d_res ablation: reconstruction, bytes, thresholds, summaries, verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic import make_capture

from kvbench.ablation import (
    ablate_stream,
    add_inflation,
    best_accept,
    classify,
    cross_model_grid,
    k_bytes,
    run_ablation,
    settings,
    summarize_model,
    verdict,
)
from kvbench.errors import KvbenchError


def test_classify_thresholds():
    assert classify(1.0, 1.10, 1.30) == "ACCEPT"
    assert classify(1.10, 1.10, 1.30) == "ACCEPT"
    assert classify(1.1000001, 1.10, 1.30) == "MARGINAL"
    assert classify(1.30, 1.10, 1.30) == "MARGINAL"
    assert classify(1.31, 1.10, 1.30) == "REJECT"
    assert classify(float("nan"), 1.10, 1.30) == "REJECT"
    assert classify(float("inf"), 1.10, 1.30) == "REJECT"


def test_settings_are_checked():
    assert settings(None)["baseline"] == [0.95, 0]
    with pytest.raises(KvbenchError, match="baseline"):
        settings({"baseline": [0.99, 0]})
    with pytest.raises(KvbenchError, match="metric"):
        settings({"metric": "psnr"})
    with pytest.raises(KvbenchError, match="accept <= marginal"):
        settings({"accept": 1.5, "marginal": 1.2})


def test_k_bytes_matches_the_study_projection():
    from kvbench.codecs.kakeyaturbo import estimate_k_ratio

    for d_eff, d_res in ((10, 0), (2, 4), (4, 8)):
        nb = 8
        ratio = 2 * nb * 512 * 128 / k_bytes([d_eff] * nb, 512, 128, d_res)
        assert ratio == pytest.approx(estimate_k_ratio(128, d_eff, d_res))
    assert estimate_k_ratio(128, 10, 0) == pytest.approx(11.571, abs=1e-3)


def _low_rank(rng, n_kv=1, t=128, d=16, rank=4):
    basis = rng.standard_normal((rank, d)).astype(np.float32)
    x = rng.standard_normal((n_kv, t, rank)).astype(np.float32) @ basis
    x += 0.05 * rng.standard_normal((n_kv, t, d)).astype(np.float32)
    x[..., 3] += 2.0 * (rng.random((n_kv, t)) < 0.05)  # sparse outliers
    return x


def test_outliers_are_kept_exactly_in_original_space():
    from kvbench.codecs.kakeyaturbo import fit_pca, pca_project, pca_unproject

    rng = np.random.default_rng(1)
    x = _low_rank(rng)
    cells = ablate_stream(x, [0.9], [0, 2, 16, 40], block_size=32)
    mse = {c["d_res"]: c["mean_mse"] for c in cells}
    assert mse[0] > mse[2] > 0 and mse[16] == 0 and mse[40] == 0
    # brute force: reconstruct, keep the 2 largest |e| per row exactly, average block MSE
    blocks = x.reshape(-1, 32, 16)
    fit = fit_pca(np, blocks, 0.9)
    base = pca_unproject(np, pca_project(np, blocks, fit), fit)
    e = blocks - base
    top = np.argsort(-np.abs(e), axis=-1, kind="stable")[..., :2]
    kept = np.zeros_like(e)
    np.put_along_axis(kept, top, np.take_along_axis(e, top, axis=-1), axis=-1)
    ref = ((blocks - (base + kept)).astype(np.float64) ** 2).mean(axis=(1, 2)).mean()
    assert mse[2] == pytest.approx(ref, rel=1e-6)
    assert cells[0]["n_blocks"] == 4 and cells[0]["d_eff"] == int(fit.d_eff.sum() // 4)


def test_run_ablation_on_capture(tmp_path):
    cap = make_capture(
        tmp_path / "cap",
        [("full", 2, 128, 16), ("sliding", 2, 64, 16), ("full", 1, 32, 16), ("full", 1, 128, 16)],
        ctx=128,
    )
    cfg = {"block_size": 64, "variance_ratios": [0.95, 0.8], "d_res": [0, 4]}
    df = run_ablation(cap, cfg)
    # sliding layer and the one-block layer are skipped
    assert sorted(df.layer.unique()) == [0, 3]
    assert len(df) == 2 * 2 * 2
    base = df[(df.variance_ratio == 0.95) & (df.d_res == 0)]
    assert np.allclose(base.inflation, 1.0)
    assert (df.inflation[(df.variance_ratio == 0.8) & (df.d_res == 0)] > 1).all()
    assert (df.ratio > 0).all() and (df.stream == "k").all()
    ip = run_ablation(cap, {**cfg, "metric": "ip_rel_err"})
    assert ip.metric.eq("ip_rel_err").all() and np.allclose(
        ip[(ip.variance_ratio == 0.95) & (ip.d_res == 0)].inflation, 1.0
    )
    with pytest.raises(KvbenchError, match=">= 2 blocks"):
        run_ablation(cap, {**cfg, "block_size": 512})


def _table(per_layer: dict[str, list[dict[tuple[float, int], float]]]) -> pd.DataFrame:
    rows = []
    for model, layers in per_layer.items():
        for layer, cells in enumerate(layers):
            for (vr, d), mse in cells.items():
                rows.append(
                    {
                        "model": model,
                        "ctx": 4096,
                        "layer": layer,
                        "stream": "k",
                        "variance_ratio": vr,
                        "d_res": d,
                        "mean_mse": mse,
                        "d_eff_mean": 4.0,
                        "bytes": int(1000 * vr + 100 * d),
                        "baseline_bytes": 4000,
                    }
                )
    return add_inflation(pd.DataFrame(rows), CFG)


CFG = {"variance_ratios": [0.95, 0.9], "d_res": [0, 8]}


def test_per_model_and_cross_model_summaries():
    layers_a = [
        {(0.95, 0): 1.0, (0.95, 8): 0.5, (0.9, 0): 2.0, (0.9, 8): 1.05},
        {(0.95, 0): 2.0, (0.95, 8): 1.0, (0.9, 0): 5.0, (0.9, 8): 2.2},
        {(0.95, 0): 1.0, (0.95, 8): 0.6, (0.9, 0): 1.5, (0.9, 8): 1.0},
    ]
    layers_b = [{(0.95, 0): 1.0, (0.95, 8): 0.5, (0.9, 0): 3.0, (0.9, 8): 1.3}]
    df = _table({"a": layers_a, "b": layers_b})
    pm = summarize_model(df, CFG).set_index(["model", "variance_ratio", "d_res"])
    infl_a = np.array([1.05, 1.1, 1.0])
    r = pm.loc[("a", 0.9, 8)]
    assert r.mean_inflation == pytest.approx(infl_a.mean())
    assert r.median_inflation == pytest.approx(np.median(infl_a))
    assert r.p90_inflation == pytest.approx(np.percentile(infl_a, 90))
    assert r.max_inflation == pytest.approx(1.1) and r.n_layers == 3
    assert r.mark == "ACCEPT"
    grid = cross_model_grid(summarize_model(df, CFG), CFG).set_index(["variance_ratio", "d_res"])
    g = grid.loc[(0.9, 8)]
    assert g.mean_inflation == pytest.approx((infl_a.mean() + 1.3) / 2)  # unweighted over models
    assert g.mark == "MARGINAL" and g.worst_model == "b"
    assert grid.loc[(0.9, 0), "mark"] == "REJECT"
    assert grid.loc[(0.9, 0), "pca_tail_prediction"] == pytest.approx(2.0)


def test_best_accept_and_verdict():
    cheap_ok = [{(0.95, 0): 1.0, (0.95, 8): 0.5, (0.9, 0): 1.05, (0.9, 8): 0.9}]
    grid = cross_model_grid(summarize_model(_table({"a": cheap_ok}), CFG), CFG)
    best = best_accept(grid)
    assert (best["variance_ratio"], best["d_res"]) == (0.9, 0)  # fewest bytes among ACCEPT
    assert verdict(grid, CFG).startswith("Adopt (variance_ratio 0.90, d_res 0)")
    strict = [{(0.95, 0): 1.0, (0.95, 8): 0.5, (0.9, 0): 2.0, (0.9, 8): 1.5}]
    grid = cross_model_grid(summarize_model(_table({"a": strict}), CFG), CFG)
    assert best_accept(grid)["variance_ratio"] == 0.95 and best_accept(grid)["d_res"] == 0
    v = verdict(grid, CFG)
    assert v.startswith("Keep the baseline") and "(0.90, 0)" in v and "REJECT" in v
