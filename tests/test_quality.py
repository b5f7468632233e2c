"""Continuation quality on a compressed prefix cache, boundary-layer skipping, verdicts.

Fast tests use tiny random-weight models built from a transformers config (no tokenizer needed:
the quality core works on token ids). The ``model`` tests run the real embedded SmolLM2-135M.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kvbench.codecs.skip import (
    SkipLayers,
    build_codec_for_capture,
    layer_compressed,
    resolve_layers,
)
from kvbench.corpus import token_ids_sha256
from kvbench.errors import KvbenchError
from kvbench.quality import (
    QUALITY_COLUMNS,
    build_cache,
    continuation_logits,
    continuation_stats,
    quality_verdict,
    quality_verdicts,
    quality_with_model,
)
from kvbench.shards import BF16_STORAGE, MANIFEST_FORMAT, float_to_bf16_bits, write_shard

VOCAB = 101


def _tiny(kind: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=512,
    )
    if kind == "llama":
        cfg = LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **common)
    else:  # gemma3: sliding window smaller than the prefix, non-default query_pre_attn_scalar
        cfg = Gemma3TextConfig(
            num_hidden_layers=3,
            num_key_value_heads=1,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=9,
            **common,
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype).eval()


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache, use_cache=True)
    return cache


def _write_capture(out: Path, model, ids: list[int], name: str = "tiny") -> Path:
    """A capture in the manifest contract from a real prefill of ``model`` (bf16 shards)."""
    ctx = len(ids)
    cache = _prefill(model, ids)
    cfg = model.config
    rng = np.random.default_rng(7)
    layers = []
    for i, layer in enumerate(cache.layers):
        shards = {}
        k = layer.keys[0].float().numpy()
        v = layer.values[0].float().numpy()
        n_q = 6
        q = rng.standard_normal((cfg.num_attention_heads, n_q, k.shape[-1])).astype(np.float32)
        positions = sorted(rng.choice(np.arange(ctx // 2, ctx), n_q, replace=False).tolist())
        for stream, x in (("k", k), ("v", v), ("q", q)):
            fname = f"L{i:02d}.{stream}.npy"
            digest = write_shard(out / fname, float_to_bf16_bits(x))
            shards[stream] = {"file": fname, "shape": list(x.shape), "sha256": digest}
        sliding = bool(getattr(layer, "is_sliding", False))
        layers.append(
            {
                "index": i,
                "type": "sliding" if sliding else "full",
                "n_kv": k.shape[0],
                "n_heads": cfg.num_attention_heads,
                "head_dim": k.shape[-1],
                "tokens": k.shape[1],
                "token_start": ctx - k.shape[1],
                "sliding_window": cfg.sliding_window if sliding else None,
                "q_positions": positions,
                "shards": shards,
            }
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "storage": BF16_STORAGE,
        "model": name,
        "ctx": ctx,
        "corpus": {"name": "random", "n_tokens": ctx, "token_ids_sha256": token_ids_sha256(ids)},
        "layers": layers,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


# ---------------------------------------------------------------------------------- cache plumbing


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_rebuilt_cache_continues_like_one_forward(kind):
    """Cache rebuilt from stored tensors + continuation == one forward over prefix+continuation."""
    model = _tiny(kind)
    ids = _ids(40)
    ctx, n = 29, 11
    cache = _prefill(model, ids[:ctx])
    kv = {i: (la.keys[0].numpy(), la.values[0].numpy()) for i, la in enumerate(cache.layers)}
    if kind == "gemma3":  # the sliding layers really hold only window - 1 tokens
        assert kv[0][0].shape[1] == 7 and kv[2][0].shape[1] == ctx
    got = continuation_logits(model, kv, ctx, ids[ctx : ctx + n])
    with torch.inference_mode():
        full = model(torch.tensor([ids[: ctx + n]])).logits[0, ctx:]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # a wrong prefix length (positions off by one) is not silently accepted by the comparison
    if kind == "llama":
        kv_short = {i: (k[:, 1:], v[:, 1:]) for i, (k, v) in kv.items()}
        shifted = continuation_logits(model, kv_short, ctx - 1, ids[ctx : ctx + n])
        assert not torch.allclose(shifted, full, atol=1e-3)


def test_build_cache_rejects_wrong_token_counts():
    model = _tiny("gemma3")
    cache = _prefill(model, _ids(20))
    kv = {i: (la.keys[0].numpy(), la.values[0].numpy()) for i, la in enumerate(cache.layers)}
    with pytest.raises(KvbenchError, match="sliding cache"):
        build_cache(model.config, {0: (kv[0][0][:, 1:], kv[0][1][:, 1:])}, 20, torch.float32)
    with pytest.raises(KvbenchError, match="full-attention"):
        build_cache(model.config, {2: kv[2]}, 21, torch.float32)


# ---------------------------------------------------------------------------------- statistics


def test_continuation_stats_identity_and_direction():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(16, 50, generator=g)
    targets = ref.argmax(-1).tolist()  # the reference is right everywhere
    same = continuation_stats(ref, ref.clone(), targets)
    assert same["kl_mean"] == 0 and same["delta_ppl"] == 0 and same["top1_agree"] == 1
    assert same["delta_nll_se"] == 0
    assert same["ref_top1_acc"] == 1 and same["ppl"] == pytest.approx(math.exp(same["nll"]))
    worse = continuation_stats(ref, ref + 0.7 * torch.randn(16, 50, generator=g), targets)
    assert worse["kl_mean"] > 0 and worse["delta_ppl"] > 0 and worse["top1_agree"] < 1
    assert 0 < worse["delta_nll_se"] < worse["delta_nll"]
    # KL matches a direct computation
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax((ref * 0.5).double(), -1)
    direct = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert continuation_stats(ref, ref * 0.5, targets)["kl_mean"] == pytest.approx(
        direct, rel=1e-12
    )


# ---------------------------------------------------------------------------------- skip layers


def test_resolve_layers_negative_and_range():
    assert resolve_layers([0, -1, 1, -2], 10) == {0, 1, 8, 9}
    with pytest.raises(KvbenchError, match="out of range"):
        resolve_layers([10], 10)


CODECS = {
    "identity": {"family": "identity"},
    "kakeya": {"family": "kakeya"},
    "kakeya_skip": {"family": "kakeya", "skip_layers": [0, -1]},
    "id_skip": {"family": "identity", "skip_layers": [1]},
}


def test_skip_layers_wrapper_decisions():
    codec = build_codec_for_capture("kakeya_skip", CODECS, n_layers=4)
    assert isinstance(codec, SkipLayers) and codec.family == "kakeya" and codec.skip == {0, 3}
    entry = {"index": 0, "type": "full"}
    assert not layer_compressed(codec, entry, "k")
    assert layer_compressed(codec, {"index": 1, "type": "full"}, "v")
    # Kakeya passes sliding layers through, with or without the wrapper
    assert not layer_compressed(codec, {"index": 2, "type": "sliding"}, "k")
    plain = build_codec_for_capture("kakeya", CODECS, n_layers=4)
    assert not isinstance(plain, SkipLayers) and layer_compressed(plain, entry, "k")
    with pytest.raises(KvbenchError, match="out of range"):
        build_codec_for_capture("id_skip", CODECS, n_layers=1)


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_llama_capture(tmp_path_factory):
    model = _tiny("llama", torch.bfloat16)
    ids = _ids(200, seed=5)
    cap = _write_capture(tmp_path_factory.mktemp("cap"), model, ids[:96])
    return model, cap, ids


#: Kakeya scaled down to a 96-token prefix (the default block is 512 tokens + a 256-token tail)
SMALL_KAKEYA = {
    "family": "kakeya",
    "block_size": 32,
    "residual_length": 16,
    "variance_ratio": 0.6,
    "k_segments": 4,
    "d_res": 2,
}


def test_identity_is_exactly_zero_and_lossy_is_not(tiny_llama_capture):
    model, cap, ids = tiny_llama_capture
    cfg = {
        **CODECS,
        "lossy": SMALL_KAKEYA,
        "lossy_all_skipped": {**SMALL_KAKEYA, "skip_layers": [0, 1, 2]},
    }
    ident, layers, ref = quality_with_model(model, cap, "identity", cfg, ids, n_tokens=24)
    assert list(ident.columns) == list(QUALITY_COLUMNS)
    r = ident.iloc[0]
    assert r["kl_mean"] == 0 and r["kl_max"] == 0 and r["delta_ppl"] == 0 and r["delta_nll"] == 0
    assert r["top1_agree"] == 1 and r["n_tokens"] == 24 and r["ctx"] == 96
    assert r["mean_attn_kl"] == 0 and r["mean_attn_out_rel_err"] == 0 and len(layers) == 3
    # every layer skipped: a lossy codec leaves the cache exact
    skipped, _, _ = quality_with_model(
        model, cap, "lossy_all_skipped", cfg, ids, 24, reference_logits=ref
    )
    assert skipped.iloc[0]["kl_mean"] == 0 and skipped.iloc[0]["layers_compressed"] == 0
    assert skipped.iloc[0]["skip_layers"] == "0,1,2"
    lossy, layers, _ = quality_with_model(model, cap, "lossy", cfg, ids, 24, reference_logits=ref)
    r = lossy.iloc[0]
    assert r["kl_mean"] > 0 and r["mean_attn_kl"] > 0 and r["layers_compressed"] == 3
    assert r["ref_ppl"] == ident.iloc[0]["ref_ppl"]
    assert (layers["attn_queries"] == 6).all()


def test_tokens_must_be_the_captures(tiny_llama_capture):
    model, cap, ids = tiny_llama_capture
    other = [(i + 1) % VOCAB for i in ids]
    with pytest.raises(KvbenchError, match="corpus tokens differ"):
        quality_with_model(model, cap, "identity", CODECS, other, n_tokens=8)
    with pytest.raises(KvbenchError, match="corpus tokens"):
        quality_with_model(model, cap, "identity", CODECS, ids[:100], n_tokens=8)


# ---------------------------------------------------------------------------------- verdicts


def test_verdicts_thresholds():
    th = {"accept": {"kl": 0.01, "delta_ppl": 0.01}, "marginal": {"kl": 0.05, "delta_ppl": 0.05}}
    assert quality_verdict(0.0, 0.0, th) == "ACCEPT"
    assert quality_verdict(0.005, -0.2, th) == "ACCEPT"  # a lower PPL earns no credit, no harm
    assert quality_verdict(0.02, 0.001, th) == "MARGINAL"  # the worse metric decides
    assert quality_verdict(0.001, 0.03, th) == "MARGINAL"
    assert quality_verdict(0.001, 0.2, th) == "REJECT"
    assert quality_verdict(float("nan"), 0.0, th) == "n/a"
    table = pd.DataFrame(
        {"model": "m", "ctx": 2048, "codec": ["a", "b"], "kl_mean": [0.0, 1.0],
         "delta_ppl_rel": [0.0, 0.5], "top1_agree": [1.0, 0.3]}
    )  # fmt: skip
    assert quality_verdicts(table, th)["quality_verdict"].tolist() == ["ACCEPT", "REJECT"]


# ---------------------------------------------------------------------------------- real model

REAL_CTX, REAL_N = 1024, 96


@pytest.fixture(scope="module")
def smollm2_quality(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M captured at 1024 tokens (kvbench.capture) and scored with four codecs."""
    from kvbench.capture import capture_kv
    from kvbench.config import load_config
    from kvbench.models import load_model

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "config" / "config.yaml")
    name = "smollm2-135m"
    cap = tmp_path_factory.mktemp("smollm2_cap")
    model, tok = load_model(name, cfg["models"][name], smollm2_dir)
    capture_kv(name, cfg, REAL_CTX, smollm2_dir, cap, model=model, tokenizer=tok)
    from kvbench.quality import run_quality

    table, layers = run_quality(
        cap, name, cfg["models"][name], ["identity", "q8_0", "turbo4", "turbo2"], cfg["codecs"],
        corpus_name=cfg["corpus"]["name"], n_tokens=REAL_N, model=model, tokenizer=tok,
    )  # fmt: skip
    return model, tok, cfg, cap, table.set_index("codec"), layers


@pytest.mark.model
def test_smollm2_identity_exact_q8_small_turbo2_worse(smollm2_quality):
    _, _, _, _, t, layers = smollm2_quality
    ident = t.loc["identity"]
    assert ident["kl_mean"] == 0 and ident["kl_max"] == 0 and ident["top1_agree"] == 1
    assert ident["delta_ppl"] == 0 and ident["delta_nll"] == 0 and ident["ppl"] == ident["ref_ppl"]
    assert ident["mean_attn_kl"] == 0 and ident["mean_attn_out_rel_err"] == 0
    q8 = t.loc["q8_0"]
    assert 0 < q8["kl_mean"] < 0.01 and abs(q8["delta_ppl_rel"]) < 0.03 and q8["top1_agree"] > 0.95
    assert 0 < q8["mean_attn_kl"] < 0.01
    t2, t4 = t.loc["turbo2"], t.loc["turbo4"]
    assert t2["kl_mean"] > t4["kl_mean"] > q8["kl_mean"]
    assert t2["delta_ppl_rel"] > t4["delta_ppl_rel"]
    assert t2["mean_attn_kl"] > t4["mean_attn_kl"] > q8["mean_attn_kl"]
    assert (t["ref_ppl"] == ident["ref_ppl"]).all() and (t["layers_compressed"] == 30).all()
    # per-layer attention metrics use every captured query (full layers: keys from position 0)
    assert len(layers) == 4 * 30 and (layers["attn_queries"] == 128).all()


@pytest.mark.model
def test_smollm2_reference_equals_native_cache(smollm2_quality):
    """The cache rebuilt from the capture's shards continues exactly like the model's own cache."""
    from transformers import DynamicCache

    from kvbench.corpus import build_token_ids

    model, tok, cfg, cap, _, _ = smollm2_quality
    n = 16
    ids, _ = build_token_ids(cfg["corpus"]["name"], tok, REAL_CTX, extra=n)
    kv = {}
    from kvbench.quality import decoded_capture

    kv, _ = decoded_capture(cap, None, attention=False)
    rebuilt = continuation_logits(model, kv, REAL_CTX, ids[REAL_CTX:])
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([ids[:REAL_CTX]]), cache=cache, use_cache=True)
        native = model(torch.tensor([ids[REAL_CTX:]]), cache=cache, use_cache=True).logits[0]
    assert torch.equal(rebuilt, native.float())


# ---------------------------------------------------------------------------------- workflow


def test_quality_targets_contexts_and_unknown_codec():
    from kvbench.quality import quality_targets

    cfg = {
        "models": {"a": {}, "b": {"contexts": [4096]}},
        "contexts": [2048, 8192],
        "codecs": {"identity": {}, "q8_0": {}},
        "quality": {"contexts": [2048, 4096], "codecs": ["identity", "q8_0"]},
    }
    assert quality_targets(cfg) == [
        "results/quality/a/ctx2048/identity.parquet",
        "results/quality/a/ctx2048/q8_0.parquet",
        "results/quality/b/ctx4096/identity.parquet",
        "results/quality/b/ctx4096/q8_0.parquet",
    ]
    cfg["quality"]["codecs"].append("nope")
    with pytest.raises(KvbenchError, match=r"quality.codecs.*'nope'"):
        quality_targets(cfg)


@pytest.mark.model
@pytest.mark.workflow
def test_snakemake_quality_rule(smollm2_workdir):
    """snakemake builds results/quality/... through capture_kv; identity is exactly 0."""
    import os
    import subprocess
    import sys

    import yaml

    tmp_path = smollm2_workdir
    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    cfg["models"] = {"smollm2-135m": cfg["models"]["smollm2-135m"]}
    cfg["contexts"] = [1024]
    cfg["quality"] = {"contexts": [1024], "codecs": ["identity", "q8_0"], "n_tokens": 32}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/quality/smollm2-135m/ctx1024/{c}.parquet" for c in ("identity", "q8_0")]
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
        "--configfile", str(tmp_path / "cfg.yaml"), "--cores", "2", *targets,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ident, q8 = (pd.read_parquet(tmp_path / t).iloc[0] for t in targets)
    assert ident["kl_mean"] == 0 and ident["delta_ppl"] == 0 and ident["n_tokens"] == 32
    assert q8["kl_mean"] > 0 and q8["ref_ppl"] == ident["ref_ppl"]
    assert (tmp_path / "benchmarks" / "quality" / "smollm2-135m" / "ctx1024" / "q8_0.tsv").is_file()
    log = (tmp_path / "logs" / "quality" / "smollm2-135m" / "ctx1024" / "q8_0.log").read_text()
    assert "q8_0: ppl" in log
