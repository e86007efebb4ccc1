"""Gemma 2, Gemma 3, OLMo 2, Granite, GPT-NeoX and SmolLM3, each a tiny random model
(tests/families_a.py): its ModelSpec and refusals; the whole path HF dir -> trtc export -> real
TensorRT-RTX builds (float32, float16, int8_wo) -> the reference backend (ONNX Runtime on the kept
rank graph) == transformers greedy generate, 4 prompts of different lengths as one batch, 32 new
tokens; `--attention plugin` where the plugins can express the family, its refusal where not."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from factories import PROMPTS, TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ, hf_greedy, run_json
from families_a import FAMILIES_A, family_config_a, make_tiny_model_a
from trtc.cli import main
from trtc.compiler.families import adapter_for_config
from trtc.errors import TrtcError

NEW_TOKENS = 32
S, F = "sliding_attention", "full_attention"


def spec_of(cfg):
    return adapter_for_config(cfg).spec_from_config(cfg)


@pytest.mark.parametrize("family,checks", [
    ("gemma2", {"layer_types": (S, F, S, F), "sliding_window": 6, "attn_logit_softcapping": 20.0,
                "final_logit_softcapping": 15.0, "head_dim": 16, "tie_word_embeddings": True}),
    ("gemma3", {"layer_types": (S, S, S, F), "sliding_window": 6, "rope_type": "linear", "rope_theta": 10000.0,
                "rope_local_theta": 10.0, "qk_norm": True, "attn_logit_softcapping": None}),
    ("olmo2", {"qk_norm": True, "layer_types": (), "sliding_window": None, "rotary_dim": None}),
    ("granite", {"qk_norm": False, "layer_types": (), "nope_layers": ()}),
    ("gpt_neox", {"rotary_dim": 4, "head_dim": 16, "num_kv_heads": 4, "qkv_bias": True, "rms_norm_eps": 1e-5}),
    ("smollm3", {"nope_layers": (3,), "sliding_window": None, "layer_types": (), "rotary_dim": None}),
])
def test_spec_per_family(family, checks):
    spec = spec_of(family_config_a(family, vocab_size=100))
    assert spec.family == family
    for k, v in checks.items():
        assert getattr(spec, k) == v, k


def test_per_layer_windows():
    g2, g3 = (spec_of(family_config_a(f, vocab_size=100)) for f in ("gemma2", "gemma3"))
    assert [g2.window(i) for i in range(4)] == [6, None, 6, None]
    assert [g3.window(i) for i in range(4)] == [6, 6, 6, None]
    mistral = dataclasses.replace(g2, layer_types=())          # no kinds: every layer slides
    assert [mistral.window(i) for i in range(4)] == [6] * 4


def test_qwen2_windows_only_from_max_window_layers():
    """Qwen2/Qwen3 with use_sliding_window slide only on layers >= max_window_layers."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1, architectures=["Qwen2ForCausalLM"])
    spec = spec_of(cfg)
    assert spec.layer_types == (F, S, S) and [spec.window(i) for i in range(3)] == [None, 8, 8]


def test_gemma3_older_rope_form_gives_the_same_spec():
    """config.json written before rope_parameters: rope_theta + rope_scaling (global layers) and
    rope_local_base_freq (sliding layers)."""
    from types import SimpleNamespace

    cfg = family_config_a("gemma3", vocab_size=100)
    old = {k: v for k, v in cfg.to_dict().items() if k != "rope_parameters"}
    old.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 8.0}, rope_local_base_freq=10.0)
    assert spec_of(SimpleNamespace(**old)) == spec_of(cfg)


def test_soft_capped_scores_are_traced_with_eager_attention():
    from trtc.compiler.load import attn_implementation

    cfg = family_config_a("gemma3", vocab_size=100)
    assert attn_implementation(spec_of(cfg)) == "sdpa"
    cfg.attn_logit_softcapping = 30.0
    assert attn_implementation(spec_of(cfg)) == "eager"
    assert attn_implementation(spec_of(family_config_a("gemma2", vocab_size=100))) == "eager"


def test_every_layer_alike_needs_no_kinds():
    cfg = family_config_a("gemma2", vocab_size=100)
    cfg.layer_types = [F] * 4
    spec = spec_of(cfg)
    assert spec.layer_types == () and spec.sliding_window is None and spec.window(0) is None


@pytest.mark.parametrize("family,edit,match", [
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"rope_parameters": {S: {"rope_type": "dynamic", "rope_theta": 10.0, "factor": 2.0},
                                    F: {"rope_type": "default", "rope_theta": 1e4}}},
     r"rope_parameters\.sliding_attention\.rope_type 'dynamic'"),
    ("gpt_neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3125}},
     "= 5 is odd"),
])
def test_refusals_name_the_field(family, edit, match):
    cfg = family_config_a(family, vocab_size=100)
    for k, v in edit.items():
        object.__setattr__(cfg, k, v)
    with pytest.raises(TrtcError, match=match):
        spec_of(cfg)


def test_spec_checks_its_per_layer_fields():
    spec = spec_of(family_config_a("gemma2", vocab_size=100))
    with pytest.raises(TrtcError, match="for each of the 4 layers"):
        dataclasses.replace(spec, layer_types=(S, F))
    with pytest.raises(TrtcError, match="for each of the 4 layers"):
        dataclasses.replace(spec, layer_types=(S, F, S, "chunked_attention"))
    with pytest.raises(TrtcError, match="below 4"):
        dataclasses.replace(spec, nope_layers=(4,))


def test_older_config_without_the_new_fields_reads():
    from trtc import typed_json
    from trtc.spec import ModelSpec

    d = typed_json.to_json(spec_of(family_config_a("olmo2", vocab_size=100)))
    for k in ("layer_types", "attn_logit_softcapping", "final_logit_softcapping", "rope_local_theta",
              "nope_layers", "rotary_dim"):
        del d[k]
    spec = typed_json.from_json(ModelSpec, d, "config.json")
    assert spec.layer_types == () and spec.rotary_dim is None and spec.window(0) is None


# ---- the whole path, per family (slow: an export and real TensorRT-RTX builds each) ----

@pytest.fixture(scope="module")
def model_a(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_model_a(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def export_a(model_a, tmp_path_factory):
    """Native export dir per (family, dtype): traced once, built several ways."""
    from trtc.compiler.pipeline import export_model

    cache = {}

    def get(family: str, dtype: str = "float32", attention: str = "native"):
        key = (family, dtype, attention)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"export-{family}-{dtype}-{attention}") / "export"
            export_model(str(model_a(family)), out, dtype=dtype, max_seq_len=TINY_MAX_SEQ, attention=attention)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def engine_a(export_a, rtx_flavour, tmp_path_factory):
    """Engine dir (with --keep-onnx) built by the real TensorRT-RTX builder from an export dir."""
    from trtc.compiler.pipeline import build_model
    from trtc.compiler.quant_config import make_quant_config

    cache = {}

    def get(family: str, dtype: str = "float32", quant: str = "none"):
        key = (family, dtype, quant)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"engine-{family}-{dtype}-{quant}") / "engine"
            build_model(str(export_a(family, dtype)), out, rtx_flavour, ("sm_89",), max_batch_size=TINY_MAX_BATCH,
                        max_input_len=TINY_MAX_INPUT, keep_onnx=True,
                        quant=make_quant_config(quant) if quant != "none" else None)
            cache[key] = out
        return cache[key]

    return get


# What each family's graph must show after the passes (config.json's pass counts), 4 layers:
# eager attention (gemma2: soft-capping) has no Attention node to fold the GQA copy out of, but its
# copies get cache-following shapes (8 = K and V of 4 layers); NoPE layer 3 of smollm3 has no rotary.
PASSES = {
    "gemma2": {"kv_cache_scatter": 8, "fold_repeat_kv": 8, "attention_mask_from_positions": 4, "rotary_cache": 8},
    "gemma3": {"attention_mask_from_positions": 4, "rotary_cache": 8},
    "olmo2": {"attention_mask_from_positions": 4, "rotary_cache": 8},
    "granite": {"attention_mask_from_positions": 4, "rotary_cache": 8},
    "gpt_neox": {"fold_repeat_kv": 0, "attention_mask_from_positions": 4, "rotary_cache": 8},
    "smollm3": {"attention_mask_from_positions": 4, "rotary_cache": 6},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_A)
def test_float32_greedy_tokens_match_transformers(family, model_a, engine_a):
    engine = engine_a(family)
    cfg = json.loads((engine / "config.json").read_text())
    assert cfg["pretrained_config"]["family"] == family
    for name, n in PASSES[family].items():
        assert cfg["passes"][name] == n, (name, cfg["passes"])
    ref = hf_greedy(model_a(family), PROMPTS, NEW_TOKENS)
    assert all(len(r) == NEW_TOKENS for r in ref), "reference stopped early: pick decisive weights"
    assert run_json(engine, PROMPTS, NEW_TOKENS) == ref


def _graph(engine):
    import onnx

    return onnx.load(str(engine / "rank0.onnx"), load_external_data=False).graph


@pytest.mark.slow
def test_gemma2_graph_keeps_soft_capped_attention_decomposed(engine_a):
    """TensorRT's Attention has no softcap: each layer stays MatMul -> c*Tanh(s/c) -> + mask -> Softmax,
    and the masks are two (sliding window 6 on layers 0 and 2, full causal on 1 and 3)."""
    g = _graph(engine_a("gemma2"))
    ops = [n.op_type for n in g.node]
    assert "Attention" not in ops and ops.count("Softmax") == 4
    assert ops.count("Tanh") == 4 + 1                       # the scores of 4 layers, the final logits
    adds = [n for n in g.node if n.op_type == "Add" and any(i.startswith("mask_add_") for i in n.input)]
    assert sorted(next(i for i in n.input if i.startswith("mask_")) for n in adds) == \
        ["mask_add_6_1", "mask_add_6_1", "mask_add_None_1", "mask_add_None_1"]


@pytest.mark.slow
def test_gemma3_graph_has_two_rope_caches_and_two_masks(engine_a):
    g = _graph(engine_a("gemma3"))
    ropes = [n for n in g.node if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 8 and len({n.input[1] for n in ropes}) == 2      # local and global base
    masks = sorted(n.input[3] for n in g.node if n.op_type == "Attention")
    assert masks == ["mask_causal"] + ["mask_causal_window_6"] * 3


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


# Float16 tokens may leave transformers' float16 tokens only at a near tie: there the two tokens'
# float32 logits differ by less than this (measured: 0.0040 granite, 0.0059 gpt_neox; transformers
# float16 differs from its own float32 at exactly those steps).
FP16_TIE = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_A)
def test_float16_greedy_tokens_match_transformers(family, model_a, engine_a):
    """Gemma is known to overflow float16 with real weights (activations beyond 65504): for real
    Gemma checkpoints compare in float32 (above). These tiny random ones stay in range."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtc.runtime import LLM

    engine = engine_a(family, "float16")
    ours = [c.token_ids for c in LLM(engine, backend="onnxruntime").generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    ref = hf_greedy(model_a(family), PROMPTS, NEW_TOKENS, dtype="float16")
    tok = AutoTokenizer.from_pretrained(model_a(family))
    f32 = AutoModelForCausalLM.from_pretrained(model_a(family), dtype=torch.float32).eval()
    checked = 0
    for prompt, a, b in zip(PROMPTS, ours, ref):
        k = _first_difference(a, b)
        checked += NEW_TOKENS if k is None else k
        if k is None:
            continue
        with torch.no_grad():
            logits = f32(torch.tensor([tok(prompt)["input_ids"] + a[:k]])).logits[0, -1]
        gap = abs(float(logits[a[k]] - logits[b[k]]))
        assert gap < FP16_TIE, f"{prompt!r}: token {k} differs ({a[k]} vs {b[k]}), float32 logits {gap:.4f} apart"
    assert checked >= 3 * NEW_TOKENS


# int8_wo: relative logit error of the quantized engine's graph vs the float engine's on one prompt
# (prefill), tolerance 1.5x the measured error (in parentheses).
INT8_TOL = {"gemma2": 0.030, "gemma3": 0.016, "olmo2": 0.030, "granite": 0.11, "gpt_neox": 0.031, "smollm3": 0.066}
#           (0.0203,          0.0102,          0.0200,         0.0714,          0.0206,           0.0440)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_A)
def test_int8_wo_builds_and_stays_close(family, engine_a):
    from transformers import AutoTokenizer

    from trtc.runtime.api import open_session
    from trtc.runtime.engine_dir import load_engine_dir

    q, f = engine_a(family, quant="int8_wo"), engine_a(family)
    rep = json.loads((q / "config.json").read_text())["quantization"]
    assert rep["quant_algo"] == "int8_wo"
    assert rep["quantized_linears"] == (16 if family == "gpt_neox" else 28)   # 4 (fused qkv) or 7 linears x 4 layers
    ids = np.array([AutoTokenizer.from_pretrained(q)(PROMPTS[3])["input_ids"]], np.int64)

    def logits(d):
        s = open_session(load_engine_dir(d), "onnxruntime")
        s.allocate(1)
        return s.step(ids, np.arange(ids.shape[1])[None])

    a, b = logits(q), logits(f)
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert 0 < err < INT8_TOL[family], err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["olmo2", "granite"])
def test_plugin_form_greedy_matches_transformers(family, model_a, export_a):
    """The plugins express these two (full causal, rotary on every layer over the whole head)."""
    ref = hf_greedy(model_a(family), PROMPTS, NEW_TOKENS)
    assert run_json(export_a(family, attention="plugin"), PROMPTS, NEW_TOKENS) == ref


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,match", [
    ("gemma2", "float32", r"soft-capped attention scores \(attn_logit_softcapping 20\.0\)"),
    ("gemma3", "float32", r"sliding-window attention \(window 6 < max-seq-len 96\)"),
    ("gpt_neox", "float32", r"partial rotary \(rotary_dim 4 of head_dim 16\)"),
    ("smollm3", "float32", r"layers without rotary embedding \(nope_layers \[3\]\)"),
    # OLMo 2 rotates in float32 (float32 cos/sin): in float16 the rotary sits between Casts, which
    # the plugin lowering does not match.
    ("olmo2", "float16", "query is not produced by RotaryEmbedding"),
])
def test_plugin_form_refused_with_the_reason(family, dtype, match, engine_a):
    """The plugin pass on the family's real native graph (what export --attention plugin runs after
    the native lowering): refused before anything is rewritten."""
    from trtc.compiler.onnx_io import load_graph
    from trtc.compiler.passes import PassContext, get_pass
    from trtc.runtime.engine_dir import load_engine_dir

    engine = engine_a(family, dtype)
    ed = load_engine_dir(engine)
    graph = load_graph(engine / "rank0.onnx")
    ctx = PassContext(spec=ed.spec, max_seq_len=TINY_MAX_SEQ, attention="plugin", kv_block_size=16)
    with pytest.raises(TrtcError, match=match):
        get_pass("plugin_attention")(graph, ctx)


@pytest.mark.slow
def test_plugin_export_refusal_is_one_line(model_a, tmp_path):
    res = CliRunner().invoke(main, ["export", "--model", str(model_a("gemma2")), "--output", str(tmp_path / "x"),
                                    "--attention", "plugin", "--max-seq-len", "64"])
    assert res.exit_code == 2 and "attn_logit_softcapping" in res.output
    assert not (tmp_path / "x").exists()
