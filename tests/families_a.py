"""Tiny random models of the families that bring per-layer attention, soft-capping and rotary
variants (Gemma 2, Gemma 3, OLMo 2, Granite, GPT-NeoX, SmolLM3), built like factories.py's: a
trained toy BPE tokenizer, hidden 64, 2-4 layers, weights drawn with initializer_range 0.3 so
greedy decoding has decisive margins.

Each config exercises what its family brings: windows shorter than prompt + 32 generated tokens on
the sliding layers only, soft-capping that bends the scores and logits without saturating them,
two rope bases, partial rotary, NoPE layers, Granite's multipliers away from 1.
"""

from __future__ import annotations

from pathlib import Path

from factories import make_tokenizer

FAMILIES_A = ("gemma2", "gemma3", "olmo2", "granite", "gpt_neox", "smollm3")

# Weight seed per family (default 0). SmolLM3 with seed 0 emits EOS after 4 and 14 tokens on two
# prompts, so its greedy check would cover fewer than 32 tokens there; seed 1 generates all 32.
SEEDS = {"smollm3": 1}


def _common(vocab_size: int) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_config_a(family: str, vocab_size: int):
    from transformers import (Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, GraniteConfig, Olmo2Config,
                              SmolLM3Config)

    common = _common(vocab_size)
    if family == "gemma2":   # sliding every other layer (window 6), both soft-caps, query_pre_attn_scalar != head_dim
        return Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                            attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                            architectures=["Gemma2ForCausalLM"])
    if family == "gemma3":   # three sliding layers then a full one, local/global rope bases (global scaled)
        return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                rope_parameters={
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}},
                                architectures=["Gemma3ForCausalLM"])
    if family == "olmo2":    # norms after attention and MLP, q/k norm over the whole projection
        return Olmo2Config(**common, architectures=["Olmo2ForCausalLM"])
    if family == "granite":  # embedding, residual, attention and logits multipliers
        return GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.5,
                             attention_multiplier=0.2, logits_scaling=2.0, architectures=["GraniteForCausalLM"])
    if family == "gpt_neox":  # parallel residual, a quarter of each head rotates, LayerNorm with bias, fused qkv
        c = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        return GPTNeoXConfig(**c, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.25},
                             use_parallel_residual=True, architectures=["GPTNeoXForCausalLM"])
    if family == "smollm3":  # layer 3 without rotary (NoPE), the others rotary
        return SmolLM3Config(**common, no_rope_layer_interval=4, architectures=["SmolLM3ForCausalLM"])
    raise ValueError(family)


def make_tiny_model_a(out: Path, family: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(out)
    cfg = family_config_a(family, vocab_size=len(tok))
    torch.manual_seed(SEEDS.get(family, 0))
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    return out
