"""Capture: layer plans of every grid architecture, exact K/V, post-RoPE queries, the workflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from transformers import DynamicCache

from kvbench.capture import (
    capture_kv,
    iter_layers,
    kept_span,
    layer_plan,
    sample_positions,
    verify_capture,
)
from kvbench.corpus import build_token_ids
from kvbench.errors import KvbenchError
from kvbench.shards import MANIFEST_FORMAT
from kvbench.tiny import ARCHITECTURES, tiny_config, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CTX = 64
WINDOW = 16  # tiny sliding window: the cache keeps 15 tokens

F, S, X = "full", "sliding", "kv_shared"
PLANS = {
    "llama": [F, F],
    "qwen2": [F, F],
    "qwen3": [F, F, F],
    "glm": [F, F],
    "gemma3_text": [S, S, F, S],
    "gemma4_text": [S, F, X, X],
    "gemma4": [S, F, X, X],
}


def _cfg(chunk: int = 0, n_q: int = 8, corpus: str = "pydoc_topics", seed: int = 0) -> dict:
    return {
        "seed": seed,
        "models": {"tiny": {"source": "path", "path": "unused", "prefill_chunk": chunk}},
        "capture": {"query_positions": n_q, "dtype": "bfloat16"},
        "corpus": {"name": corpus},
    }


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _reference_cache(arch: str, ids: list[int], chunk: int = 0) -> DynamicCache:
    """The plain transformers path: a stock sdpa model, DynamicCache, (chunked) forwards."""
    model = tiny_model(arch)
    cache = DynamicCache(config=model.config)
    step = chunk or len(ids)
    with torch.inference_mode():
        for s in range(0, len(ids), step):
            model(input_ids=torch.tensor([ids[s : s + step]]), cache=cache, use_cache=True)
    return cache


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy()


# ---- layer plans ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_plan_of_each_architecture(arch):
    plan = layer_plan(tiny_config(arch, sliding_window=WINDOW))
    assert [e["type"] for e in plan] == PLANS[arch]
    assert [e["index"] for e in plan] == list(range(len(plan)))
    for e in plan:
        assert e["sliding_window"] == (WINDOW if e["type"] == S else None)


def test_layer_plan_gemma4_e2b_shape():
    """Gemma-4-E2B: 35 layers, the last 20 KV-shared -> 15 cached, full at 4, 9, 14 (spec §4.1)."""
    types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(35)]
    cfg = tf.Gemma4TextConfig(num_hidden_layers=35, num_kv_shared_layers=20, layer_types=types)
    plan = layer_plan(cfg)
    cached = [e for e in plan if e["type"] != X]
    assert len(cached) == 15 and [e["index"] for e in plan if e["type"] == X] == list(range(15, 35))
    assert [e["index"] for e in cached if e["type"] == F] == [4, 9, 14]
    assert kept_span(cached[0], 2048) == (2048 - 511, 511)
    assert kept_span(cached[4], 2048) == (0, 2048)


def test_layer_plan_fallback_without_layer_types():
    cfg = tf.PretrainedConfig(num_hidden_layers=3, sliding_window=8)
    assert [e["type"] for e in layer_plan(cfg)] == [S, S, S]
    cfg = tf.PretrainedConfig(num_hidden_layers=2)
    assert [e["type"] for e in layer_plan(cfg)] == [F, F]


def test_kept_span_short_context():
    assert kept_span({"type": S, "sliding_window": 512}, 300) == (0, 300)
    assert kept_span({"type": F, "sliding_window": None}, 300) == (0, 300)


def test_sample_positions_deterministic():
    a = sample_positions(0, 100, 2048, 128)
    assert a == sample_positions(0, 100, 2048, 128) and a != sample_positions(1, 100, 2048, 128)
    assert len(set(a)) == 128 and a == sorted(a) and a[0] >= 100 and a[-1] < 2048
    assert sample_positions(0, 10, 15, 128) == [10, 11, 12, 13, 14]


# ---- end-to-end capture with tiny random-weight models -------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capture_matches_plain_transformers(arch, tok, tmp_path):
    man = capture_kv("tiny", _cfg(), CTX, None, tmp_path, model=tiny_model(arch), tokenizer=tok)
    assert man["format"] == MANIFEST_FORMAT and man["storage"] == "uint16-bf16-bits"
    assert (tmp_path / "manifest.json").is_file()
    assert json.loads((tmp_path / "manifest.json").read_text()) == man
    ids, info = build_token_ids("pydoc_topics", tok, CTX)
    assert man["corpus"] == info and man["ctx"] == CTX and man["seed"] == 0
    assert man["layer_types"] == PLANS[arch] and man["num_hidden_layers"] == len(PLANS[arch])
    assert man["kv_shared_layers"] == [i for i, t in enumerate(PLANS[arch]) if t == X]
    assert man["versions"]["transformers"] == tf.__version__

    ref = _reference_cache(arch, ids)
    seen = []
    for entry, k, v, q in iter_layers(tmp_path):
        i = entry["index"]
        seen.append(i)
        rk, rv = ref.layers[i].keys[0], ref.layers[i].values[0]
        # Exactly the bits the stock sdpa forward caches.
        assert np.array_equal(_bits(torch.from_numpy(k).to(torch.bfloat16)), _bits(rk))
        assert np.array_equal(_bits(torch.from_numpy(v).to(torch.bfloat16)), _bits(rv))
        n_tokens = WINDOW - 1 if entry["type"] == S else CTX
        assert entry["tokens"] == n_tokens and entry["token_start"] == CTX - n_tokens
        assert k.shape == (entry["n_kv"], n_tokens, entry["head_dim"])
        assert q.shape == (4, 8, entry["head_dim"]) and entry["n_heads"] == 4
        pos = entry["q_positions"]
        assert pos == sorted(set(pos)) and len(pos) == 8
        assert all(entry["token_start"] <= p < CTX for p in pos)
        assert entry["scaling"] is not None
    assert seen == [i for i, t in enumerate(PLANS[arch]) if t != X]
    if arch.startswith("gemma4"):  # global_head_dim on the full layer
        dims = {e["type"]: e["head_dim"] for e in man["layers"]}
        assert dims == {S: 16, F: 32}
    verify_capture(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_chunked_prefill_equals_chunked_reference(arch, tok, tmp_path):
    man = capture_kv(
        "tiny", _cfg(chunk=24), CTX, None, tmp_path, model=tiny_model(arch), tokenizer=tok
    )
    assert man["prefill_chunk"] == 24
    ids, _ = build_token_ids("pydoc_topics", tok, CTX)
    ref = _reference_cache(arch, ids, chunk=24)
    one = _reference_cache(arch, ids)
    for entry, k, _v, _q in iter_layers(tmp_path):
        rk = ref.layers[entry["index"]].keys[0]
        assert np.array_equal(_bits(torch.from_numpy(k).to(torch.bfloat16)), _bits(rk))
        # ... and close to the one-shot prefill (bf16 rounding differs with the chunk shapes).
        ok = one.layers[entry["index"]].keys[0].float().numpy()
        assert np.abs(k - ok).max() <= 0.05 * np.abs(ok).max()
    # Queries recorded across chunks match the one-shot capture's up to the same rounding.
    d1 = tmp_path / "one"
    capture_kv("tiny", _cfg(), CTX, None, d1, model=tiny_model(arch), tokenizer=tok)
    for (e_c, _, _, q_c), (e_1, _, _, q_1) in zip(
        iter_layers(tmp_path), iter_layers(d1), strict=True
    ):
        assert e_c["q_positions"] == e_1["q_positions"]
        assert np.abs(q_c - q_1).max() <= 0.05 * np.abs(q_1).max()


def test_queries_are_post_rope(tok, tmp_path):
    """Recompute the llama queries by hand (norm -> q_proj -> RoPE) at the sampled positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama")
    capture_kv("tiny", _cfg(n_q=16), CTX, None, tmp_path, model=model, tokenizer=tok)
    ids, _ = build_token_ids("pydoc_topics", tok, CTX)
    x = torch.tensor([ids])
    with torch.inference_mode():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states
        pos_ids = torch.arange(CTX)[None]
        for entry, _, _, q in iter_layers(tmp_path, streams=("q",)):
            layer = model.model.layers[entry["index"]]
            h = layer.input_layernorm(hs[entry["index"]])
            d = entry["head_dim"]
            qs = layer.self_attn.q_proj(h).view(1, CTX, -1, d).transpose(1, 2)
            cos, sin = model.model.rotary_emb(h, pos_ids)
            qs, _ = apply_rotary_pos_emb(qs, qs, cos, sin)
            want = qs[0][:, entry["q_positions"], :]
            assert np.array_equal(_bits(torch.from_numpy(q).to(torch.bfloat16)), _bits(want))
            # Without RoPE the queries would differ: the capture is post-RoPE.
            raw = layer.self_attn.q_proj(h).view(1, CTX, -1, d).transpose(1, 2)[0]
            assert not torch.equal(raw[:, entry["q_positions"], :], want)


def test_capture_restores_attention_and_needs_bf16(tok, tmp_path):
    model = tiny_model("qwen2")
    capture_kv("tiny", _cfg(), CTX, None, tmp_path, model=model, tokenizer=tok)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(KvbenchError, match="bf16"):
        capture_kv("tiny", _cfg(), CTX, None, tmp_path / "f32", model=model.float(), tokenizer=tok)
    assert not (tmp_path / "f32" / "manifest.json").exists()


def test_failed_capture_leaves_no_manifest(tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    capture_kv("tiny", _cfg(), CTX, None, tmp_path, model=model, tokenizer=tok)
    assert (tmp_path / "manifest.json").exists()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(KvbenchError, match="has only"):
        capture_kv(
            "tiny", _cfg(corpus=f"file:{short}"), CTX, None, tmp_path, model=model, tokenizer=tok
        )
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("L*.npy"))

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        capture_kv("tiny", _cfg(), CTX, None, tmp_path, model=model, tokenizer=tok)
    assert not (tmp_path / "manifest.json").exists()


def test_iter_layers_verifies_checksums(tok, tmp_path):
    capture_kv("tiny", _cfg(), CTX, None, tmp_path, model=tiny_model("llama"), tokenizer=tok)
    entry, k, v, q = next(iter_layers(tmp_path, streams=("k",)))
    assert k is not None and v is None and q is None
    p = tmp_path / "L01.v.npy"
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(KvbenchError, match=r"L01\.v\.npy: sha256 mismatch"):
        list(iter_layers(tmp_path))
    with pytest.raises(KvbenchError, match=r"L01\.v\.npy"):
        verify_capture(tmp_path)


# ---- the real embedded model through Snakemake ----------------------------------------------


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "2", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ})


@pytest.mark.model
@pytest.mark.workflow
def test_snakemake_capture_smollm2_matches_transformers(smollm2_dir, smollm2_workdir):
    """snakemake results/kv/smollm2-135m/ctx2048/manifest.json == a direct transformers forward."""
    tmp_path = smollm2_workdir
    target = "results/kv/smollm2-135m/ctx2048/manifest.json"
    proc = _snakemake(tmp_path, target)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cap = tmp_path / "results" / "kv" / "smollm2-135m" / "ctx2048"
    man = json.loads((cap / "manifest.json").read_text())
    assert (
        man["weights_sha256"]
        == json.loads((smollm2_dir / ".fetched.json").read_text())["weights_sha256"]
    )
    assert (tmp_path / "benchmarks" / "capture" / "smollm2-135m" / "ctx2048.tsv").is_file()
    assert (
        "layer 29"
        in (tmp_path / "logs" / "capture_kv" / "smollm2-135m" / "ctx2048.log").read_text()
    )

    # Direct transformers forward on the same weights and tokens.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)  # the capture job ran with 2 threads
    hf = smollm2_dir / "hf"
    model = AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids, info = build_token_ids("pydoc_topics", tokenizer, 2048)
    assert man["corpus"] == info
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    n = 0
    for entry, k, v, q in iter_layers(cap):
        assert k.shape == v.shape == (3, 2048, 64) and q.shape == (9, 128, 64)
        i = entry["index"]
        assert np.array_equal(
            _bits(torch.from_numpy(k).to(torch.bfloat16)), _bits(cache.layers[i].keys[0])
        )
        assert np.array_equal(
            _bits(torch.from_numpy(v).to(torch.bfloat16)), _bits(cache.layers[i].values[0])
        )
        n += 1
    assert n == 30

    again = _snakemake(tmp_path, "-n", target)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
