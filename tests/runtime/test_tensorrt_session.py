"""TensorRT engine execution. Needs a GPU that TensorRT (or TensorRT-RTX) supports, and that
TensorRT installed; the project's machines have neither (no GPU here; the borrowed H100/H200 have
no TensorRT and reject TensorRT-RTX engines), so on them these tests skip with that reason.
On a machine that has both, they run the engine and compare with the reference backend."""

from __future__ import annotations

import pytest

from factories import PROMPTS


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return ("no CUDA GPU on this machine: TensorRT engine execution is verified only on users' "
                "GPUs (see README 'What is verified where')")
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_tensorrt_engine_generates_like_the_reference(tiny_engine):
    from trtc.runtime import LLM

    engine = tiny_engine("llama")
    trt = LLM(engine, backend="tensorrt")
    ref = LLM(engine, backend="onnxruntime")
    assert [c.token_ids for c in trt.generate(PROMPTS, max_new_tokens=16)] == \
           [c.token_ids for c in ref.generate(PROMPTS, max_new_tokens=16)]
