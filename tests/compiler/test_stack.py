"""Export by stacking (compiler/stack.py): a template of a few layers repeated to the model's depth
must compute what transformers computes, for each kind of layer layout, and the export must fall
back to a whole-model trace where stacking cannot be proven."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtc.compiler.stack import plan_stack

from factories import family_config, make_tokenizer
from factories_b import family_config_b
from families_a import family_config_a


def test_plan_uniform_layers_copy_the_second():
    p = plan_stack([()] * 22)
    assert (p.template_layers, p.source) == (2, (1,) * 20)


def test_plan_repeating_pattern_holds_each_kind_twice():
    kinds = [("s",)] * 5 + [("g",)]
    p = plan_stack(kinds * 4)                     # Gemma 3: five sliding layers, one global
    assert p.template_layers == 12
    assert p.source == tuple(11 if i % 6 == 5 else 10 for i in range(12, 24))   # the last of its kind
    assert all(kinds[b % 6] == kinds[i % 6] for i, b in zip(range(12, 24), p.source))


def test_plan_too_shallow_traces_every_layer():
    assert plan_stack([()] * 2).template_layers == 2
    assert plan_stack([("a",), ("b",), ("a",)]).template_layers == 3


def _deep_model(out: Path, family: str, layers: int, safetensors: bool = True) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(out)
    for make in (family_config, family_config_a, family_config_b):
        try:
            cfg = make(family, len(tok))
            break
        except ValueError:
            continue
    d = cfg.to_dict()
    n = d["num_hidden_layers"]
    for k, v in list(d.items()):             # per-layer lists repeat their pattern
        if isinstance(v, list) and len(v) == n:
            d[k] = [v[i % n] for i in range(layers)]
    d["num_hidden_layers"] = layers
    cfg = type(cfg)(**d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():                    # norms away from 1, so that a wrong layer's norm shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    if not safetensors:                      # the older checkpoint format: a pickled state dict
        from safetensors.torch import load_file

        torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    return out


def _check_against_transformers(model_dir: Path, traced) -> None:
    """Prefill 9 tokens then decode one, on ONNX Runtime, against transformers' logits."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    spec = traced.spec
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(traced.onnx_path), so, providers=["CPUExecutionProvider"])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = {i.name for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    S = 9
    ids = torch.randint(3, spec.vocab_size, (2, S), generator=torch.Generator().manual_seed(1))

    def run(x, start, past):
        feeds = {"input_ids": x, "attention_mask": np.ones((2, start + x.shape[1]), np.int64),
                 "position_ids": np.tile(np.arange(start, start + x.shape[1]), (2, 1)), **past}
        return sess.run(None, {k: v for k, v in feeds.items() if k in names})

    empty = {f"past_key_values.{i}.{kv}": np.zeros((2, spec.num_kv_heads, 0, spec.head_dim), np.float32)
             for i in range(spec.num_layers) for kv in ("key", "value")}
    res = run(ids.numpy(), 0, empty)
    nxt = np.full((2, 1), 5, np.int64)
    past = {f"past_key_values.{i}.{kv}": res[outs.index(f"present.{i}.{kv}")]
            for i in range(spec.num_layers) for kv in ("key", "value")}
    step = run(nxt, S, past)
    with torch.no_grad():
        ref = hf(input_ids=torch.cat([ids, torch.from_numpy(nxt)], 1)).logits.numpy()
    np.testing.assert_allclose(res[0], ref[:, :S], atol=1e-3, rtol=0)   # float32 rounding; a wrong weight moves logits by O(1)
    np.testing.assert_allclose(step[0], ref[:, S:], atol=1e-3, rtol=0)   # float32 rounding; a wrong weight moves logits by O(1)


@pytest.mark.slow
@pytest.mark.parametrize("family,layers,template", [
    ("llama", 5, 2),        # tied embeddings (one checkpoint tensor for Gather and lm_head), llama3 rope
    ("qwen3", 5, 2),        # q/k norms
    ("gemma2", 5, 4),       # `1 + w` norms folded by the exporter, soft-capping, alternating sliding layers
    ("gemma3", 9, 8),       # three sliding layers then a global one: each kind twice in the template
    ("phi4_mini", 5, 2),    # fused qkv / gate_up (a Split the exporter's rewrite leaves without a namespace)
])
def test_stacked_export_matches_transformers(tmp_path, family, layers, template):
    from trtc.compiler.config import ExportConfig
    from trtc.compiler.export import trace
    from trtc.compiler.load import load_model

    d = _deep_model(tmp_path / "m", family, layers)
    traced = trace(load_model(str(d)), ExportConfig(dtype="float32", max_seq_len=96), tmp_path / "t")
    assert traced.template_layers == template
    assert not (tmp_path / "t" / "template").exists()
    _check_against_transformers(d, traced)


@pytest.mark.slow
def test_falls_back_to_a_whole_trace_without_safetensors(tmp_path):
    import onnx

    from trtc.compiler.config import ExportConfig
    from trtc.compiler.export import trace
    from trtc.compiler.load import load_model

    d = _deep_model(tmp_path / "m", "llama", 3, safetensors=False)
    traced = trace(load_model(str(d)), ExportConfig(dtype="float32", max_seq_len=96), tmp_path / "t")
    assert traced.template_layers == 0
    _check_against_transformers(d, traced)
    names = {t.name for t in onnx.load(str(traced.onnx_path), load_external_data=False).graph.initializer}
    assert "model.layers.2.mlp.down_proj.weight" in names      # named after the parameter here too


def test_weights_that_do_not_fit_are_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import onnx

    from trtc.compiler import stack
    from trtc.errors import TrtcError

    w = stack.WeightRef("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight", "T", (4096, 14336), 10)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 0, 100 << 20))   # 100 MiB free
    with pytest.raises(TrtcError, match=r"need 0\.11 GiB .* 0\.10 GiB is free"):
        stack.write_weights(onnx.ModelProto(), [w], {w.param: tmp_path / "x.safetensors"}, "float16",
                            tmp_path / "traced.onnx.data", lambda n: None, 1)
    assert not (tmp_path / "traced.onnx.data").exists()
