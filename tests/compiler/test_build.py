"""Real TensorRT-RTX builds: every dtype, export dir -> build, option checks, --dump-after."""

from __future__ import annotations

import json

import pytest

from trtc.compiler.pipeline import build_model, export_model
from trtc.errors import TrtcError


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_builds(dtype, tiny_engine):
    d = tiny_engine("qwen3", dtype)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["export_config"]["dtype"] == dtype
    assert (d / "rank0.engine").stat().st_size > 0
    # Half-precision exports leave rotary decomposed; fuse_rotary + rotary_cache still lower all
    # 2 layers x (q, k) to RotaryEmbedding with a precomputed cache.
    assert cfg["passes"]["rotary_cache"] == 4, cfg["passes"]


def test_engine_checksums_are_the_files_own(tiny_engine):
    """config.json and the provenance statement take the engine's sha256 from the build worker,
    which hashed it while writing (no second read): it must be the file's sha256 on disk."""
    import hashlib

    from trtc import artifact as art

    d = tiny_engine("qwen3", "float16")
    engine = d / "rank0.engine"
    real = hashlib.sha256(engine.read_bytes()).hexdigest()
    assert art.file_identity(engine) in art._WRITTEN          # the worker's digest was recorded and used
    assert json.loads((d / "config.json").read_text())["files"]["rank0.engine"]["sha256"] == real
    subjects = {s["name"]: s["digest"]["sha256"] for s in json.loads((d / art.PROVENANCE).read_text())["subject"]}
    assert subjects["rank0.engine"] == real
    art.verify_files(d, art.read_engine_config(d).files)


def test_float16_runs_on_reference_backend(tiny_engine, tiny_model):
    from factories import PROMPTS, hf_greedy
    from trtc.runtime import LLM

    llm = LLM(tiny_engine("qwen3", "float16"), backend="onnxruntime")
    ours = [c.token_ids for c in llm.generate(PROMPTS, max_new_tokens=8)]
    assert ours == hf_greedy(tiny_model("qwen3"), PROMPTS, 8, dtype="float16")


def test_bfloat16_reference_backend_says_why_not(tiny_engine):
    from trtc.runtime import LLM

    with pytest.raises(TrtcError, match="no bfloat16 kernels"):
        LLM(tiny_engine("qwen3", "bfloat16"), backend="onnxruntime")


def test_export_dir_then_build(tmp_path, tiny_model, rtx_flavour):
    exp, _ = export_model(str(tiny_model("mistral")), tmp_path / "exp", max_seq_len=64,
                          dump_after=("kv_cache_scatter",))
    meta = json.loads((exp / "trtc_export.json").read_text())
    assert meta["passes"]["kv_cache_scatter"] == 4 and meta["passes"]["rotary_cache"] == 4
    assert (tmp_path / "exp.dump" / "after_kv_cache_scatter.onnx").is_file()
    with pytest.raises(TrtcError, match="differs from the export dir"):
        build_model(str(exp), tmp_path / "e0", rtx_flavour, ("sm_89",), max_seq_len=128)
    out, times = build_model(str(exp), tmp_path / "eng", rtx_flavour, ("sm_86", "sm_120"),
                             max_batch_size=2, max_input_len=16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tensorrt"]["targets"] == ["sm_86", "sm_120"] and cfg["onnx"] == []
    assert [r[0] for r in times.rows] == ["load", "build", "package"]


def test_max_input_len_above_max_seq_len(tmp_path, tiny_model, rtx_flavour):
    with pytest.raises(TrtcError, match="exceeds --max-seq-len"):
        build_model(str(tiny_model("llama")), tmp_path / "e", rtx_flavour, ("sm_89",),
                    max_input_len=100, max_seq_len=64)
    assert not (tmp_path / "e").exists()
