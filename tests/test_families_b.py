"""Phi-3/Phi-4 (fused qkv/gate_up, LongRoPE, partial rotary) and Mixtral / Qwen3-MoE (top-k experts):
specs and both rope config forms, the dense experts formulation against transformers' own, and the
whole path (real TensorRT-RTX build, reference backend) against transformers greedy generate."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from factories import PROMPTS, hf_greedy, run_json
from factories_b import (FAMILIES_B, LONG_PROMPTS, PHI3_ORIGINAL_MAX, PHI4_MINI_ORIGINAL_MAX, family_config_b,
                         longrope, make_tiny_model_b)
from trtc.compiler.families import adapter_for_config, rope_parameters
from trtc.errors import TrtcError

NEW_TOKENS = 32
# Engine length and prompts per family: phi3 is built in its short-factor regime (every sequence
# <= its original length 48), phi4_mini in its long one (96 > 8, prompts longer than 8 tokens).
CASES = {"phi3": (PHI3_ORIGINAL_MAX, PROMPTS), "phi4_mini": (96, LONG_PROMPTS),
         "mixtral": (96, PROMPTS), "qwen3_moe": (96, PROMPTS)}
# float16: transformers float16 itself moves these tiny models' logits (|logit| <= 11) from its
# float32 ones by 0.02-0.03 (median over positions of the largest per position) and up to 0.3, and
# the greedy paths have steps whose two best tokens are 0.002 apart: two float16 computations can
# take different tokens there. A step where they part must be such a tie (the two tokens within
# FP16_TIE in transformers float32), and the engine's float16 logits must be as close to float32
# as transformers' own (within FP16_ERR_RATIO of its error; measured 0.74-1.17).
FP16_TIE = 0.3
FP16_ERR_RATIO = 1.5


def _spec(family: str):
    cfg = family_config_b(family, vocab_size=100)
    return adapter_for_config(cfg).spec_from_config(cfg)


# --- specs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,checks", [
    ("phi3", {"family": "phi3", "rope_type": "longrope", "original_max_position_embeddings": 48,
              "rotary_dim": None, "sliding_window": 40, "num_experts": 0, "fused_projections": True}),
    ("phi4_mini", {"family": "phi3", "rotary_dim": 12, "tie_word_embeddings": True,
                   "original_max_position_embeddings": 8}),
    ("phi4", {"family": "phi3", "rope_type": "default", "rope_theta": 250000.0, "rotary_dim": None,
              "original_max_position_embeddings": None, "fused_projections": True}),
    ("mixtral", {"num_experts": 4, "experts_per_token": 2, "norm_topk_prob": True, "moe_intermediate_size": 128,
                 "experts_compute": "dense", "rope_theta": 1e6}),
    ("qwen3_moe", {"num_experts": 4, "experts_per_token": 2, "norm_topk_prob": False, "moe_intermediate_size": 32,
                   "qk_norm": True, "head_dim": 32}),
])
def test_spec_per_family(family, checks):
    spec = _spec(family)
    for k, v in checks.items():
        assert getattr(spec, k) == v, k
    assert spec.rope_factors is None        # chosen at export, from the engine's length


def test_longrope_factor_set_follows_the_engine_length():
    from trtc.compiler.longrope import choose_factors

    spec = _spec("phi3")
    short, long = choose_factors(spec, 48), choose_factors(spec, 49)
    assert (short.rope_factors, long.rope_factors) == ("short", "long")
    assert "max_seq_len 48 <= original_max_position_embeddings 48" in short.rope_factors_reason
    assert "max_seq_len 49 > original_max_position_embeddings 48" in long.rope_factors_reason
    assert choose_factors(_spec("phi4"), 49).rope_factors is None


# Hand-written config.json in the older form (top-level rope_theta + rope_scaling with `type`) and
# in transformers 5's (rope_parameters), per family: both must give one spec and one rotary module.
_FACTORS = longrope(16, 48)
ROPE_FORMS = {
    "phi3": ({"rope_theta": 10000.0, "original_max_position_embeddings": 48,
              "rope_scaling": {"type": "longrope", "short_factor": _FACTORS["short_factor"],
                               "long_factor": _FACTORS["long_factor"]}},
             {"original_max_position_embeddings": 48, "rope_parameters": _FACTORS}),
    "mixtral": ({"rope_theta": 1e6}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3_moe": ({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 64}},
                  {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                       "original_max_position_embeddings": 64}}),
    "llama": ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
              {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}
_ARCH = {"phi3": ("Phi3ForCausalLM", "phi3"), "mixtral": ("MixtralForCausalLM", "mixtral"),
         "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"), "llama": ("LlamaForCausalLM", "llama")}
_EXPECTED_ROPE = {"phi3": ("longrope", 10000.0), "mixtral": ("default", 1e6), "qwen3_moe": ("yarn", 1e6),
                  "llama": ("llama3", 500000.0)}


def _hand_written(d: Path, family: str, rope: dict) -> Path:
    arch, model_type = _ARCH[family]
    d.mkdir()
    cfg = {"architectures": [arch], "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0, **rope}
    if family == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("family", list(ROPE_FORMS))
def test_old_and_new_rope_config_forms_read_alike(family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from trtc.compiler.load import read_hf_config

    cfgs = [read_hf_config(_hand_written(tmp_path / name, family, form))
            for name, form in zip(("old", "new"), ROPE_FORMS[family])]
    old, new = (adapter_for_config(c).spec_from_config(c) for c in cfgs)
    assert old == new
    assert (new.rope_type, new.rope_theta) == _EXPECTED_ROPE[family]
    # transformers' own rotary module reads the two files alike too (what the engine is traced from)
    rot = [AutoModelForCausalLM.from_config(c).model.rotary_emb for c in cfgs]
    torch.testing.assert_close(rot[0].inv_freq, rot[1].inv_freq, rtol=0, atol=0)
    assert rot[0].attention_scaling == rot[1].attention_scaling


def test_rope_parameters_reads_an_unnormalized_old_form():
    """Without transformers' normalization (a plain namespace): `type` and a top-level theta."""
    cfg = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_parameters(cfg) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    assert rope_parameters(SimpleNamespace()) == {"rope_type": "default"}


def test_longrope_needs_a_factor_per_rotated_frequency():
    cfg = family_config_b("phi3", vocab_size=100)
    cfg.rope_parameters = {**cfg.rope_parameters, "long_factor": [1.0] * 3}
    with pytest.raises(TrtcError, match=r"rope_parameters.long_factor must list 8 factors"):
        adapter_for_config(cfg).spec_from_config(cfg)


def test_experts_per_token_above_the_expert_count_is_refused():
    cfg = family_config_b("mixtral", vocab_size=100)
    cfg.num_experts_per_tok = 5
    with pytest.raises(TrtcError, match=r"num_experts_per_tok 5 must be in 1..num_local_experts \(4\)"):
        adapter_for_config(cfg).spec_from_config(cfg)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_weight_quantization_of_experts_is_refused(family):
    from trtc.compiler.quantize import make_quant_config, resolve_for_model

    spec = _spec(family)
    with pytest.raises(TrtcError, match=r"--quant int8_wo: the 4 experts per layer .* grouped weights"):
        resolve_for_model(make_quant_config("int8_wo"), spec)
    assert resolve_for_model(make_quant_config("none", "int8"), spec).kv_cache_dtype == "int8"


@pytest.mark.parametrize("family,why", [("phi3", "fused qkv_proj / gate_up_proj"),
                                        ("mixtral", "mixture-of-experts MLPs")])
def test_tensor_parallelism_is_refused_naming_the_feature(family, why):
    from trtc.compiler.tp import check_tp

    check_tp(_spec(family), 1)
    with pytest.raises(TrtcError, match=f"--tp-size 2: .*{why}.*use --tp-size 1"):
        check_tp(_spec(family), 2)


# --- the dense experts formulation == transformers ------------------------------------------------

def _tiny_hf(family: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config_b(family, vocab_size=218), dtype=dtype).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_dense_experts_equal_transformers_experts(family):
    """The experts module alone, fed the same routing: every token's chosen experts, weighted;
    an unchosen expert whose output is inf changes nothing (`where`, not a multiply by 0)."""
    import torch

    from trtc.compiler.moe import dense_experts_forward

    experts = _tiny_hf(family).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 64, generator=g)
    idx = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(37)])    # experts 0..2 only
    w = torch.softmax(torch.randn(37, 2, generator=g), -1)
    with torch.no_grad():
        experts.down_proj[3] = float("inf")
        ref = experts(x, idx, w)                     # transformers' eager loop over the chosen experts
        ours = dense_experts_forward(experts, x, idx, w)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_dense_experts_generate_the_tokens_of_transformers(family):
    """The whole model with the dense experts (what trtc traces) and transformers' own: same
    logits to float32 rounding, same greedy tokens, prompts one at a time."""
    import torch

    from trtc.compiler.moe import use_dense_experts

    ref_model, dense_model = _tiny_hf(family), _tiny_hf(family)
    use_dense_experts(dense_model, _spec(family))
    g = torch.Generator().manual_seed(2)
    for n in (1, 5, 14):
        ids = torch.randint(3, 218, (1, n), generator=g)
        with torch.no_grad():
            a = ref_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            b = dense_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert a.sequences.tolist() == b.sequences.tolist()
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), rtol=1e-5, atol=1e-5)


# --- the whole path: real TensorRT-RTX build, reference backend == transformers -------------------

@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model_b(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def engine_b(model_b, rtx_flavour, tmp_path_factory):
    """Engine dir (--keep-onnx) of a tiny model at its CASES length, real TensorRT-RTX builder."""
    from factories import TINY_MAX_BATCH, TINY_MAX_INPUT
    from trtc.compiler.pipeline import build_model

    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, dtype: str = "float32") -> Path:
        if (family, dtype) not in cache:
            seq = CASES[family][0]
            out = tmp_path_factory.mktemp(f"engine-{family}-{dtype}") / "engine"
            build_model(str(model_b(family)), out, rtx_flavour, ("sm_89",), dtype=dtype, max_batch_size=TINY_MAX_BATCH,
                        max_input_len=min(TINY_MAX_INPUT, seq), max_seq_len=seq, keep_onnx=True)
            cache[family, dtype] = out
        return cache[family, dtype]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_B)
def test_greedy_tokens_match_transformers_float32(family, model_b, engine_b):
    prompts = CASES[family][1]
    ref = hf_greedy(model_b(family), prompts, NEW_TOKENS)
    assert all(len(r) == NEW_TOKENS for r in ref)
    assert run_json(engine_b(family), prompts, NEW_TOKENS) == ref


def _gap(model_dir: Path, prompt: str, prefix: list[int], a: int, b: int) -> float:
    """|logit a - logit b| of transformers float32 for the token after prompt + prefix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"] + prefix
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return float((logits[a] - logits[b]).abs())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_B)
def test_float16_builds_and_matches_transformers_float16(family, model_b, engine_b):
    """float16 engine vs transformers float16, token for token up to the end or to a step that is a
    tie at float16 resolution (the two tokens within FP16_TIE in transformers float32), where the
    two float16 computations may round either way and the texts part."""
    engine = engine_b(family, "float16")
    assert json.loads((engine / "config.json").read_text())["export_config"]["dtype"] == "float16"
    prompts = CASES[family][1]
    ours, ref = run_json(engine, prompts, NEW_TOKENS), hf_greedy(model_b(family), prompts, NEW_TOKENS, dtype="float16")
    for prompt, a, b in zip(prompts, ours, ref):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            assert a == b
        else:
            assert _gap(model_b(family), prompt, b[:k], a[k], b[k]) < FP16_TIE, (prompt, k, a[k], b[k])
        ours_err, hf_err = _float16_errors(model_b(family), engine, prompt)
        assert ours_err <= FP16_ERR_RATIO * hf_err, (prompt, ours_err, hf_err)


def _float16_errors(model_dir: Path, engine: Path, prompt: str) -> tuple[float, float]:
    """On prompt + transformers float32's greedy tokens (teacher forcing): the median over positions
    of max |logit - float32 logit|, for the float16 engine and for transformers float16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"] + hf_greedy(model_dir, [prompt], NEW_TOKENS)[0]
    hf = {}
    for dt in (torch.float32, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
        with torch.no_grad():
            hf[dt] = model(torch.tensor([ids])).logits[0].float().numpy()
    ours = _logits(engine, ids).astype(np.float32)

    def err(x: np.ndarray) -> float:
        return float(np.median(np.abs(x - hf[torch.float32]).max(-1)))

    return err(ours), err(hf[torch.float16])


@pytest.mark.slow
def test_engine_config_says_how_rope_and_experts_are_compiled(engine_b):
    from trtc.artifact import read_engine_config

    short, long = (read_engine_config(engine_b(f)).pretrained_config for f in ("phi3", "phi4_mini"))
    assert (short.rope_factors, long.rope_factors) == ("short", "long")
    assert f"original_max_position_embeddings {PHI4_MINI_ORIGINAL_MAX}" in long.rope_factors_reason
    moe = read_engine_config(engine_b("mixtral")).pretrained_config
    assert (moe.num_experts, moe.experts_per_token, moe.experts_compute) == (4, 2, "dense")


@pytest.mark.slow
def test_long_factor_engine_parts_from_transformers_below_the_original_length(model_b, engine_b):
    """What config.json's reason says: transformers uses the short factors for a sequence within
    the original length, the long-factor engine does not (PROMPTS are 1..14 tokens, 8 at most
    within it at the first step)."""
    ours, ref = run_json(engine_b("phi4_mini"), PROMPTS, NEW_TOKENS), hf_greedy(model_b("phi4_mini"), PROMPTS, NEW_TOKENS)
    assert ours != ref


@pytest.mark.slow
def test_int8_wo_quantizes_the_fused_projections(model_b, rtx_flavour, engine_b, tmp_path):
    """qkv_proj, o_proj, gate_up_proj, down_proj x 2 layers are int8; logits stay within int8_wo's
    tolerance of the float engine (tests/compiler/test_quantize.py: 0.050 on a tiny Llama)."""
    import onnx

    from trtc.compiler.pipeline import build_model
    from trtc.compiler.quantize import make_quant_config

    out = tmp_path / "int8"
    build_model(str(model_b("phi3")), out, rtx_flavour, ("sm_89",), max_batch_size=2, max_input_len=48,
                max_seq_len=CASES["phi3"][0], keep_onnx=True, quant=make_quant_config("int8_wo"))
    rep = json.loads((out / "config.json").read_text())["quantization"]
    assert rep["quant_algo"] == "int8_wo" and rep["quantized_linears"] == 8
    int8 = [t for t in onnx.load(str(out / "rank0.onnx"), load_external_data=False).graph.initializer
            if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 8
    f, q = _logits(engine_b("phi3")), _logits(out)
    assert 0 < float(np.linalg.norm(q - f) / np.linalg.norm(f)) < 0.05


def _logits(engine: Path, ids: list[int] | None = None) -> np.ndarray:
    """Logits [S, vocab] of one sequence (default PROMPTS[3]) in one step from an empty cache."""
    from transformers import AutoTokenizer

    from trtc.runtime.api import open_session
    from trtc.runtime.engine_dir import load_engine_dir

    s = open_session(load_engine_dir(engine), "onnxruntime")
    s.allocate(1)
    ids = ids or AutoTokenizer.from_pretrained(engine)(PROMPTS[3])["input_ids"]
    return s.step(np.array([ids]), np.arange(len(ids))[None])[0]


def test_moe_build_with_weight_quantization_is_refused_before_export(model_b, rtx_flavour, tmp_path):
    from trtc.compiler.pipeline import build_model
    from trtc.compiler.quantize import make_quant_config

    with pytest.raises(TrtcError, match="experts per layer of this qwen3_moe model"):
        build_model(str(model_b("qwen3_moe")), tmp_path / "e", rtx_flavour, ("sm_89",), max_seq_len=96,
                    quant=make_quant_config("int8_wo"))
    assert not (tmp_path / "e").exists()


# --- --attention plugin (export dir, plugins as ONNX Runtime custom ops) --------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family,max_seq_len,new_tokens", [
    ("phi3", 40, 24),        # 40 <= its window: the plugin needs no window; short factors (40 <= 48)
    ("mixtral", 96, NEW_TOKENS),
])
def test_plugin_form_matches_transformers(family, max_seq_len, new_tokens, model_b, tmp_path):
    from trtc.compiler.pipeline import export_model

    out, _ = export_model(str(model_b(family)), tmp_path / "plugin", max_seq_len=max_seq_len, attention="plugin")
    assert json.loads((out / "trtc_export.json").read_text())["passes"]["plugin_attention"] == 2
    assert run_json(out, PROMPTS, new_tokens) == hf_greedy(model_b(family), PROMPTS, new_tokens)


@pytest.mark.slow
def test_plugin_form_refuses_a_window_shorter_than_the_cache(model_b, tmp_path):
    from trtc.compiler.pipeline import export_model

    with pytest.raises(TrtcError, match=r"phi3 uses sliding-window attention \(window 40 < max-seq-len 48\)"):
        export_model(str(model_b("phi3")), tmp_path / "plugin", max_seq_len=48, attention="plugin")
