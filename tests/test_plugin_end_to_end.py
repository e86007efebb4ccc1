"""The plugin form end to end: HF dir -> `trtc export --attention plugin` (trtc::RopeKvAppend /
PagedAttention nodes, paged KV I/O) -> `trtc run` of the export dir on the reference backend (ONNX
Runtime, the plugin nodes as Python custom ops calling plugins/reference.py, a paged KV manager)
== transformers greedy generate (float32), 4 prompts of different lengths as one batch, 32 new
tokens.

What is not run here: a TensorRT engine with the plugins. TensorRT-RTX has no plugin layer (the
build is refused, tested below); full TensorRT cannot be installed on trtc's machines (its test
skips with that reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from factories import PROMPTS, hf_greedy
from trtc.cli import main

NEW_TOKENS = 32
MAX_SEQ = 96


@pytest.fixture(scope="module")
def plugin_export(tiny_model, tmp_path_factory):
    """Export dir of a tiny model in plugin form (no TensorRT involved)."""
    from trtc.compiler.pipeline import export_model

    cache = {}

    def get(family: str, dtype: str = "float32"):
        if (family, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"plugin-{family}-{dtype}") / "export"
            export_model(str(tiny_model(family)), out, dtype=dtype, max_seq_len=MAX_SEQ, attention="plugin")
            cache[family, dtype] = out
        return cache[family, dtype]

    return get


def run_json(path, prompts, n):
    args = ["run", str(path), "--backend", "onnxruntime", "--json", "--max-new-tokens", str(n)]
    for p in prompts:
        args += ["--prompt", p]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines()]


# llama fp32: the exporter's own RotaryEmbedding nodes; qwen3 fp16 (GQA, head_dim 32, q/k norm):
# decomposed rotary fused by fuse_rotary, the plugin nodes wrapped in Casts by the reference backend.
@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen3", "float16")])
def test_plugin_form_greedy_matches_transformers(family, dtype, tiny_model, plugin_export):
    d = plugin_export(family, dtype)
    rows = run_json(d, PROMPTS, NEW_TOKENS)
    assert [r["prompt"] for r in rows] == PROMPTS
    # The reference runs in float32 (higher precision) for both: transformers' own float16 CPU path
    # flips a near tie at token 29 of prompt 2 for qwen3, where this graph, the native float16 graph
    # (checked once by hand, 2026-11-27) and transformers float32 all agree.
    ref = hf_greedy(tiny_model(family), PROMPTS, NEW_TOKENS, dtype="float32")
    assert all(len(r) == NEW_TOKENS for r in ref), "reference stopped early: pick decisive weights"
    assert [r["token_ids"] for r in rows] == ref


def test_plugin_export_says_what_it_is(plugin_export):
    meta = json.loads((plugin_export("llama") / "trtc_export.json").read_text())
    assert meta["export_config"]["attention"] == "plugin" and meta["export_config"]["kv_block_size"] == 16
    assert meta["passes"]["plugin_attention"] == 2 and meta["passes"]["fuse_rotary"] == 0
    fp16 = json.loads((plugin_export("qwen3", "float16") / "trtc_export.json").read_text())
    assert fp16["passes"]["fuse_rotary"] == 4 and fp16["passes"]["plugin_attention"] == 2   # q and k, 2 layers
    inputs = {i["name"]: i for i in meta["io"]["inputs"]}
    assert set(inputs) == {"input_ids", "position_ids", "block_tables", "cu_seqlens_q", "past_kv_pool.0",
                           "past_kv_pool.1"}
    assert inputs["cu_seqlens_q"]["dtype"] == "int32"           # tokens packed: sequence boundaries are an input
    assert inputs["past_kv_pool.0"]["shape"] == ["num_blocks", 2, 2, 16, 16]      # Hkv 2, block 16, head 16
    assert inputs["block_tables"]["dtype"] == "int32" and inputs["block_tables"]["shape"] == ["batch", 6]
    assert {o["name"] for o in meta["io"]["outputs"]} == {"logits", "present_kv_pool.0", "present_kv_pool.1"}


def _trtc(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "trtc.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300)


def test_plugin_build_refused_for_tensorrt_rtx(tiny_model, plugin_export, tmp_path):
    """TensorRT-RTX has no plugin layer: one line, exit 2, nothing written (from a model and from a
    plugin-form export dir)."""
    for model in (tiny_model("llama"), plugin_export("llama")):
        extra = ["--attention", "plugin"] if model == tiny_model("llama") else []
        res = _trtc("build", "--model", model, "--flavour", "tensorrt_rtx", "--output", tmp_path / "e", *extra)
        assert res.returncode == 2, res.stderr[-2000:]
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("trtc: error:")]
        assert len(lines) == 1 and "tensorrt_rtx does not have" in lines[0] and "Traceback" not in res.stderr
        assert not list(tmp_path.iterdir())


def test_export_dir_refuses_tensorrt_backend(plugin_export):
    res = CliRunner().invoke(main, ["run", str(plugin_export("llama")), "--backend", "tensorrt", "-p", "One"])
    assert res.exit_code == 2 and "export dir holds no engine" in res.output


def test_kernel_limits_checked_before_a_full_tensorrt_build(tiny_model):
    """The CPU reference takes fp32 and any even head size; the kernels (and so an engine) do not."""
    import dataclasses

    from trtc.compiler.build import check_plugin_kernels
    from trtc.compiler.config import ExportConfig
    from trtc.compiler.load import load_model
    from trtc.errors import TrtcError

    spec = load_model(str(tiny_model("qwen3"))).spec                       # head_dim 32
    with pytest.raises(TrtcError, match="head_size=32"):
        check_plugin_kernels(spec, ExportConfig("float16", MAX_SEQ, attention="plugin", kv_block_size=16))
    spec64 = dataclasses.replace(spec, head_dim=64)
    with pytest.raises(TrtcError, match="float32"):
        check_plugin_kernels(spec64, ExportConfig("float32", MAX_SEQ, attention="plugin", kv_block_size=16))
    check_plugin_kernels(spec64, ExportConfig("float16", MAX_SEQ, attention="plugin", kv_block_size=16))
    check_plugin_kernels(spec, ExportConfig("float32", MAX_SEQ))              # native: no limits


def test_full_tensorrt_plugin_engine(tmp_path):
    """A plugin-form engine of a kernel-compatible tiny model (fp16, head_dim 64) with full TensorRT:
    written against the documented API (plugins registered before parsing, pool/block-table
    profiles); needs full TensorRT, which trtc's machines cannot install."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except Exception:
        pytest.skip("full TensorRT (`tensorrt`) is not installable on trtc's machines (docs/platform.md); "
                    "the plugin-form engine build is unverified")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from factories import make_tokenizer
    from trtc.flavour import resolve_flavour
    from trtc.compiler.pipeline import build_model

    model_dir = tmp_path / "llama-h64"
    tok = make_tokenizer(model_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tok), max_position_embeddings=256, initializer_range=0.3)).save_pretrained(model_dir)
    out = tmp_path / "engine"
    build_model(str(model_dir), out, resolve_flavour("tensorrt"), ("sm_90",), dtype="float16", max_batch_size=4,
                max_input_len=32, max_seq_len=MAX_SEQ, keep_onnx=True, attention="plugin")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["export_config"]["attention"] == "plugin" and (out / "rank0.engine").stat().st_size > 0
