"""Tiny random models of the Phi-3/Phi-4 and mixture-of-experts families (issue 13, part B).

Same recipe as factories.py (2 layers, hidden 64, initializer_range 0.3 so the top-1 token wins
by a wide margin, the shared tiny tokenizer); MoE models have 4 experts, top 2. LongRoPE factor
sets differ strongly (short all 1, long 1..16), so an engine on the wrong set gives other tokens.
"""

from __future__ import annotations

from pathlib import Path

from factories import make_tokenizer

# LongRoPE regimes of the tiny Phi models: every PROMPTS entry + 32 new tokens fits in 48 tokens
# (longest prompt 14), so "phi3" (original length 48) built with --max-seq-len 48 is all short
# factors; "phi4_mini" (original length 8) at the tiny builds' 96 is all long, which transformers
# also uses from the prompt on for LONG_PROMPTS (10..17 tokens, all > 8).
PHI3_ORIGINAL_MAX = 48
PHI4_MINI_ORIGINAL_MAX = 8
LONG_PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "A small model reads a short text and writes another one",
    "Paris is the capital of France; Berlin is the capital of Germany",
    "Engines are built ahead of time, on machines without a GPU, and run later on GPUs",
]

FAMILIES_B = ("phi3", "phi4_mini", "mixtral", "qwen3_moe")
# Weight seeds: per family the first seed (0, 1, ...) whose transformers references (float32 and
# float16, PROMPTS and LONG_PROMPTS) all run 32 tokens without reaching EOS, so every comparison
# covers 32 tokens. Chosen from transformers' output alone, never from trtc's.
SEEDS = {"phi3": 1, "phi4_mini": 1, "mixtral": 5, "qwen3_moe": 2}


def _common(vocab_size: int) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def longrope(rotary_dim: int, original_max: int, theta: float = 10000.0) -> dict:
    n = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": theta, "original_max_position_embeddings": original_max,
            "short_factor": [1.0] * n, "long_factor": [1.0 + 15.0 * i / (n - 1) for i in range(n)]}


def family_config_b(family: str, vocab_size: int):
    from transformers import MixtralConfig, Phi3Config, Qwen3MoeConfig

    common = _common(vocab_size)
    if family == "phi3":        # Phi-3-mini-128k: LongRoPE, full rotary, sliding window
        return Phi3Config(**common, sliding_window=40, original_max_position_embeddings=PHI3_ORIGINAL_MAX,
                          rope_parameters=longrope(16, PHI3_ORIGINAL_MAX))
    if family == "phi4_mini":   # Phi-4-mini: LongRoPE on 3/4 of each head, tied embeddings
        rope = {**longrope(12, PHI4_MINI_ORIGINAL_MAX), "partial_rotary_factor": 0.75}
        return Phi3Config(**common, tie_word_embeddings=True, original_max_position_embeddings=PHI4_MINI_ORIGINAL_MAX,
                          rope_parameters=rope)
    if family == "phi4":        # Phi-4 (14B): plain rope, full rotary (spec checks only)
        return Phi3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 250000.0})
    if family == "mixtral":     # 4 experts, top 2, renormalized
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "qwen3_moe":   # 4 experts of size 32, top 2, NOT renormalized; q/k norm, head_dim 32
        return Qwen3MoeConfig(**common, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              norm_topk_prob=False)
    raise ValueError(family)


def make_tiny_model_b(out: Path, family: str, seed: int | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(out)
    cfg = family_config_b(family, vocab_size=len(tok))
    torch.manual_seed(SEEDS[family] if seed is None else seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    return out
