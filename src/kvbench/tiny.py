"""Tiny random-weight models and an offline byte-level tokenizer, for tests (never downloads).

One small config per architecture of the 7-model grid plus the two embedded models: ``llama``,
``qwen2``, ``qwen3``, ``glm``, ``gemma3_text`` (sliding + full layers), ``gemma4_text`` (sliding +
full layers with a larger ``global_head_dim``, and KV-shared layers) and ``gemma4`` (the multimodal
wrapper Gemma-4-E2B-it loads as: the same text model plus a one-layer vision tower). Other stages'
tests may use them too.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3", "glm", "gemma3_text", "gemma4_text", "gemma4")
BOS, EOS = "<s>", "</s>"


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + BOS/EOS) that prepends BOS, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_config(arch: str, vocab_size: int = 258, sliding_window: int = 16):
    """A 2-4 layer, hidden-64 config of ``arch`` (a transformers ``model_type``)."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=2, head_dim=16, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=3, head_dim=32, **common)
    if arch == "glm":
        return tf.GlmConfig(num_hidden_layers=2, head_dim=16, **common)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=sliding_window,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            **{**common, "num_key_value_heads": 1},
        )
    if arch == "gemma4_text":
        # 4 decoder layers, the last 2 KV-shared: cached = [sliding, full]; full layers use
        # global_head_dim 32 against head_dim 16 on sliding layers (like Gemma-4-E2B's 512 vs 256).
        return tf.Gemma4TextConfig(
            num_hidden_layers=4,
            num_kv_shared_layers=2,
            head_dim=16,
            global_head_dim=32,
            sliding_window=sliding_window,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
            vocab_size_per_layer_input=vocab_size,
            hidden_size_per_layer_input=8,
            **{**common, "num_key_value_heads": 1, "pad_token_id": 0},
        )
    if arch == "gemma4":
        vision = tf.Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
        )
        text = tiny_config("gemma4_text", vocab_size, sliding_window)
        return tf.Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    raise ValueError(f"no tiny config for {arch!r}; known: {ARCHITECTURES}")


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa", **kw):
    """A random-weight bf16 causal LM of ``arch`` in eval mode (deterministic per seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, **kw), dtype=torch.bfloat16, attn_implementation=attn_implementation
    )
    return model.eval()
