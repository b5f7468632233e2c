"""attention_metrics against a direct torch computation (SDPA, explicit mask, GQA expanded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvbench.attention import ATTN_COLUMNS, attention_metrics, layer_attention_metrics

N_HEADS, N_KV, D = 6, 2, 16  # group 3: h // 3 and h % 2 pick different KV heads


def _layer(seed: int, t: int):
    rng = np.random.default_rng(seed)
    # distinct scale per KV head so a wrong GQA mapping changes the numbers
    k = rng.standard_normal((N_KV, t, D)).astype(np.float32) * np.array([1.0, 2.5])[:, None, None]
    v = rng.standard_normal((N_KV, t, D)).astype(np.float32)
    q = rng.standard_normal((N_HEADS, 12, D)).astype(np.float32)
    k_hat = (k + 0.3 * rng.standard_normal(k.shape)).astype(np.float32)
    v_hat = (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
    return q, k, v, k_hat, v_hat


def _torch_reference(q, k, v, k_hat, v_hat, positions, token_start, window, scaling, top_k=8):
    """Per-head metrics from torch: boolean mask, repeat_interleave for GQA, SDPA outputs."""
    group = N_HEADS // N_KV
    tq = torch.from_numpy(q).double()
    tk, tv, tkh, tvh = (
        torch.from_numpy(a).double().repeat_interleave(group, dim=0) for a in (k, v, k_hat, v_hat)
    )
    t = k.shape[1]
    kpos = torch.arange(token_start, token_start + t)
    qpos = torch.tensor(positions)[:, None]
    mask = kpos[None, :] <= qpos
    if window:
        mask &= kpos[None, :] > qpos - window
    rows = mask.any(dim=1)
    tq, mask = tq[:, rows], mask[rows]

    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=scaling)
    oh = torch.nn.functional.scaled_dot_product_attention(
        tq, tkh, tvh, attn_mask=mask, scale=scaling
    )
    s = (tq @ tk.transpose(-1, -2) * scaling).masked_fill(~mask, -math.inf)
    sh = (tq @ tkh.transpose(-1, -2) * scaling).masked_fill(~mask, -math.inf)
    lp, lph = torch.log_softmax(s, -1), torch.log_softmax(sh, -1)
    # the probabilities really are SDPA's: P @ V reproduces its output
    torch.testing.assert_close(lp.exp() @ tv, o)
    kl = (lp.exp() * torch.where(mask, lp - lph, 0.0)).sum(-1)
    top1 = (s.argmax(-1) == sh.argmax(-1)).double()
    n_vis = mask.sum(-1)
    overlap = torch.zeros_like(kl)
    for h in range(N_HEADS):
        for i in range(s.shape[1]):
            kk = int(min(top_k, n_vis[i]))
            a = set(torch.topk(s[h, i], kk).indices.tolist())
            b = set(torch.topk(sh[h, i], kk).indices.tolist())
            overlap[h, i] = len(a & b) / kk
    rel = (o - oh).norm(dim=-1) / o.norm(dim=-1)
    return {
        "attn_kl": kl.mean(-1),
        "attn_top1": top1.mean(-1),
        "attn_top8": overlap.mean(-1),
        "attn_out_rel_err": rel.mean(-1),
        "attn_queries": int(rows.sum()),
    }


CASES = {
    # full attention, keys from position 0
    "full": dict(
        t=40, token_start=0, window=None, positions=[0, 1, 5, 9, 17, 25, 30, 33, 36, 38, 39, 39]
    ),
    # sliding layer holding the last 40 of 100 tokens; early queries see no or few stored keys
    "sliding": dict(
        t=40, token_start=60, window=16, positions=[3, 59, 60, 61, 66, 70, 75, 80, 88, 95, 98, 99]
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_sdpa(case):
    c = CASES[case]
    q, k, v, k_hat, v_hat = _layer(1, c["t"])
    scaling = 0.37  # deliberately not 1/sqrt(D): the function must use what it is given
    got = attention_metrics(
        q, k, v, k_hat, v_hat, c["positions"], c["token_start"], c["window"], scaling, per_head=True
    )
    ref = _torch_reference(
        q, k, v, k_hat, v_hat, c["positions"], c["token_start"], c["window"], scaling
    )
    assert got["attn_queries"] == ref["attn_queries"]
    if case == "sliding":
        assert got["attn_queries"] == 10  # positions 3 and 59 see no stored key
    for name in ATTN_COLUMNS[:4]:
        np.testing.assert_allclose(got[f"{name}_per_head"], ref[name].numpy(), rtol=1e-5, atol=1e-9)
        assert got[name] == pytest.approx(float(ref[name].mean()), rel=1e-5, abs=1e-9)
    # the perturbation is large enough that the metrics are informative, not saturated
    assert got["attn_kl"] > 0 and got["attn_top1"] < 1 and got["attn_top8"] < 1
    assert got["attn_out_rel_err"] > 0


def test_identity_is_exact_and_none_means_exact():
    q, k, v, _, _ = _layer(2, 32)
    pos = list(range(20, 32))
    for k_hat, v_hat in ((k.copy(), v.copy()), (None, None)):
        m = attention_metrics(q, k, v, k_hat, v_hat, pos, 0, None, D**-0.5)
        assert (m["attn_kl"], m["attn_top1"], m["attn_top8"], m["attn_out_rel_err"]) == (0, 1, 1, 0)


def test_v_error_does_not_move_scores():
    q, k, v, _, v_hat = _layer(3, 32)
    m = attention_metrics(q, k, v, None, v_hat, list(range(20, 32)), 0, None, D**-0.5)
    assert m["attn_kl"] == 0 and m["attn_top1"] == 1 and m["attn_out_rel_err"] > 0


def test_more_noise_is_worse():
    q, k, v, _, _ = _layer(4, 64)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(k.shape).astype(np.float32)
    pos = list(range(40, 64, 2))
    small = attention_metrics(q, k, v, k + 0.05 * noise, v, pos, 0, None, D**-0.5)
    large = attention_metrics(q, k, v, k + 0.5 * noise, v, pos, 0, None, D**-0.5)
    assert small["attn_kl"] < large["attn_kl"]
    assert small["attn_out_rel_err"] < large["attn_out_rel_err"]


def test_no_visible_query_gives_nan():
    q, k, v, k_hat, v_hat = _layer(6, 8)
    m = attention_metrics(q, k, v, k_hat, v_hat, [0] * 12, 100, 4, 0.25)
    assert m["attn_queries"] == 0 and math.isnan(m["attn_kl"])


def test_layer_entry_uses_manifest_fields():
    c = CASES["sliding"]
    q, k, v, k_hat, v_hat = _layer(1, c["t"])
    layer = {
        "index": 3,
        "type": "sliding",
        "sliding_window": c["window"],
        "token_start": c["token_start"],
        "q_positions": c["positions"],
        "scaling": 0.37,
    }
    direct = attention_metrics(
        q, k, v, k_hat, v_hat, c["positions"], c["token_start"], c["window"], 0.37
    )
    assert layer_attention_metrics(layer, q, k, v, k_hat, v_hat) == direct
    # without a recorded scaling the default is head_dim ** -0.5, which differs here
    del layer["scaling"]
    assert layer_attention_metrics(layer, q, k, v, k_hat, v_hat)["attn_kl"] != direct["attn_kl"]
