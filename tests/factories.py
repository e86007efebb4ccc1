"""Small factories for tests: tiny random-weight HF models of each family, with a tokenizer.

Random models need decisive logits for greedy agreement to be meaningful and stable: the weights
are drawn with a large init range (0.3 instead of 0.02), so the top-1 token wins by a margin far
above float32 rounding differences between ONNX Runtime and PyTorch.
"""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model reads a short text and "
    "writes another one. Paris is the capital of France; Berlin is the capital of Germany. "
    "Engines are built ahead of time, on machines without a GPU, and run later on GPUs. "
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
)

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of France; Berlin is",
    "One",
    "Engines are built ahead of time, on machines without a GPU, and run later",
]

# Limits of the tiny engine builds (tests/conftest.py's tiny_engine): small keeps them fast; every
# prompt in PROMPTS fits in TINY_MAX_INPUT tokens.
TINY_MAX_SEQ = 96
TINY_MAX_INPUT = 48
TINY_MAX_BATCH = 4


def make_tokenizer(out: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def family_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":   # Llama 3 rope scaling + tied embeddings
        return LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "mistral":  # sliding window shorter than prompt + generated tokens
        return MistralConfig(**common, sliding_window=12)
    if family == "qwen2":    # qkv bias
        return Qwen2Config(**common)
    if family == "qwen3":    # q/k norm, head_dim (32) != hidden / heads (16)
        return Qwen3Config(**common, head_dim=32)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def make_tiny_model(out: Path, family: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(out)
    cfg = family_config(family, vocab_size=len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    return out


def hf_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int, dtype: str = "float32") -> list[list[int]]:
    """transformers generate(do_sample=False), one prompt at a time (no padding effects)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def pass_test_spec(num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8, window=None):
    """The one-layer Llama ModelSpec the graph-pass tests build their hand-made graphs against."""
    from trtc.spec import ModelSpec

    return ModelSpec(family="llama", architecture="LlamaForCausalLM", vocab_size=16, hidden_size=32,
                     intermediate_size=64, num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, max_position_embeddings=64, rope_type="default", rope_theta=10000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
                     sliding_window=window, source_dtype="float32", bos_token_id=1, eos_token_ids=(2,))


def run_json(engine, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """`trtc run --backend onnxruntime --json`, all prompts as one batch: the generated ids per prompt."""
    import json

    from click.testing import CliRunner

    from trtc.cli import main

    args = ["run", str(engine), "--backend", "onnxruntime", "--json", "--max-new-tokens", str(new_tokens)]
    for p in prompts:
        args += ["--prompt", p]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    return [r["token_ids"] for r in rows]
