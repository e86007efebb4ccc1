"""TensorRT engine execution. Needs a CUDA GPU, a TensorRT flavour installed that builds for that
GPU, and an engine built for it; the project's machines have none of these together (no GPU here;
the borrowed H100/H200, sm_90, have no TensorRT, and TensorRT-RTX has no sm_90 target), so on them
the test skips, saying which is missing. On a machine that has all three, it builds the tiny engine
for the GPU it runs on and compares generation with the reference backend."""

from __future__ import annotations

import pytest

from factories import PROMPTS
from trtc.flavour import FLAVOURS, Flavour, import_trt
from trtc.errors import TrtcError

VERIFIED_WHERE = "TensorRT engine execution is verified only on users' GPUs (README 'What is verified where')"


def gpu_sm() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major) * 10 + int(minor)


def importable_flavours() -> list[Flavour]:
    out = []
    for fl in FLAVOURS.values():
        try:
            import_trt(fl)
            out.append(fl)
        except TrtcError:
            continue
    return out


def flavour_for(sm: int | None, importable: list[Flavour]) -> Flavour | str:
    """The installed flavour that builds engines for GPU `sm`, or why there is none (the skip reason)."""
    if sm is None:
        return f"no CUDA GPU on this machine: {VERIFIED_WHERE}"
    if not importable:
        return f"no TensorRT (tensorrt or tensorrt_rtx) installed on this sm_{sm} machine: {VERIFIED_WHERE}"
    for fl in importable:
        if f"sm_{sm}" in fl.targets:
            return fl
    return (f"this GPU is sm_{sm}, which no installed TensorRT builds for ("
            + "; ".join(f"{fl.name}: {', '.join(fl.targets)}" for fl in importable) + f"): {VERIFIED_WHERE}")


def engine_target_reason(sm: int, engine_targets: list[str]) -> str | None:
    if f"sm_{sm}" in engine_targets:
        return None
    return f"the engine was built for {', '.join(engine_targets)}, not for this GPU (sm_{sm}): {VERIFIED_WHERE}"


def test_skip_reasons_name_what_is_missing():
    rtx, full = FLAVOURS["tensorrt_rtx"], FLAVOURS["tensorrt"]
    assert "no CUDA GPU" in str(flavour_for(None, [rtx]))
    assert "no TensorRT" in str(flavour_for(89, []))
    # an H200 with only TensorRT-RTX: no sm_90 target in TensorRT-RTX
    reason = flavour_for(90, [rtx])
    assert isinstance(reason, str) and "sm_90" in reason and "tensorrt_rtx: sm_75" in reason
    assert flavour_for(90, [rtx, full]) is full
    assert flavour_for(89, [rtx]) is rtx
    assert "built for sm_89, not for this GPU (sm_90)" in str(engine_target_reason(90, ["sm_89"]))
    assert engine_target_reason(89, ["sm_86", "sm_89"]) is None


def test_tensorrt_engine_generates_like_the_reference(tiny_model, tmp_path):
    sm = gpu_sm()
    flavour = flavour_for(sm, importable_flavours())
    if isinstance(flavour, str):
        pytest.skip(flavour)
    assert sm is not None

    from factories import TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ
    from trtc.compiler.pipeline import build_model
    from trtc.runtime import LLM
    from trtc.runtime.engine_dir import load_engine_dir

    out = tmp_path / "engine"
    build_model(str(tiny_model("llama")), out, flavour, (f"sm_{sm}",), dtype="float32",
                max_batch_size=TINY_MAX_BATCH, max_input_len=TINY_MAX_INPUT, max_seq_len=TINY_MAX_SEQ,
                keep_onnx=True)
    reason = engine_target_reason(sm, list(load_engine_dir(out).config.tensorrt.targets))
    if reason:
        pytest.skip(reason)
    trt = LLM(out, backend="tensorrt")
    ref = LLM(out, backend="onnxruntime")
    assert [c.token_ids for c in trt.generate(PROMPTS, max_new_tokens=16)] == \
           [c.token_ids for c in ref.generate(PROMPTS, max_new_tokens=16)]
