"""Calibration (compiler/calibrate.py) on a real tiny export through ONNX Runtime: the window-length
KV caches give the statistics the full-length ones give, the blockwise x^T x equals the plain
product, and a tokenizer whose ids pass the model's vocab is a user error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trtc import artifact as art
from trtc.errors import TrtcError

MAX_SEQ = 64


@pytest.fixture(scope="module")
def calib_setup(tiny_model, tmp_path_factory):
    from trtc.compiler.calibrate import calibration_plan
    from trtc.compiler.onnx_io import load_graph
    from trtc.compiler.pipeline import export_model
    from trtc.compiler.quant_config import make_quant_config
    from trtc.compiler.quant_rewrite import find_targets
    from trtc.compiler.rank_graphs import load_export_dir

    out = tmp_path_factory.mktemp("calib") / "export"
    export_model(str(tiny_model("llama")), out, max_seq_len=MAX_SEQ)
    graphs = load_export_dir(out)
    src = out / art.rank_onnx(0)
    t = find_targets(load_graph(src))
    plan = calibration_plan(make_quant_config("int4_awq"), list(t.groups), [n.inputs[1].name for n in t.scatters])
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, graphs.spec.vocab_size, 16) for _ in range(6)]
    return src, plan, windows, graphs.spec


def _stats(calib_setup, cache_len=None):
    from trtc.compiler.calibrate import calibrate_by_unit

    src, plan, windows, spec = calib_setup
    return {n: st for _, stats, _ in calibrate_by_unit(src, plan, windows, spec, MAX_SEQ, cache_len)
            for n, st in stats.items()}


def test_window_length_caches_give_the_full_length_statistics(calib_setup):
    short, full = _stats(calib_setup), _stats(calib_setup, cache_len=MAX_SEQ)
    assert short.keys() == full.keys() and len(short) >= 4
    for n in short:
        a, b = short[n], full[n]
        assert a.count == b.count
        np.testing.assert_allclose(a.abs_sum, b.abs_sum, rtol=1e-5)
        np.testing.assert_allclose(a.camax, b.camax, rtol=1e-5)
        np.testing.assert_allclose(np.concatenate(a.rows), np.concatenate(b.rows), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-4, atol=1e-6 * np.abs(b.hessian).max())


@pytest.mark.parametrize("k", [64, 300, 513])
def test_blockwise_gram_equals_the_product(k):
    from trtc.compiler.calibrate import gram

    x = torch.from_numpy(np.random.default_rng(k).standard_normal((200, k)).astype(np.float32))
    g = gram(x, block=128)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(g, g.T)


def test_token_ids_past_the_vocab_are_a_user_error(calib_setup):
    from trtc.compiler.calibrate import calibrate_by_unit

    src, plan, windows, spec = calib_setup
    bad = [w.copy() for w in windows]
    bad[2][5] = spec.vocab_size + 7
    with pytest.raises(TrtcError, match=f"token id {spec.vocab_size + 7}.*vocab size {spec.vocab_size}"):
        next(calibrate_by_unit(src, plan, bad, spec, MAX_SEQ))


def _fixed_cache_session():
    """A real ONNX Runtime session whose cache input has a fixed length (4): shorter caches are
    refused, as a slice whose shapes fix the cache length refuses them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("ReduceSum", ["past"], ["y"], keepdims=0)], "g",
                          [helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_a_refused_short_cache_falls_back_to_the_full_length():
    from trtc.compiler.calibrate import _run

    sess = _fixed_cache_session()
    lens = [2, 4]
    out = _run(sess, ["y"], lens, lambda n: {"past": np.ones((1, n), np.float32)})
    assert float(out[0]) == 4.0 and lens == [4]          # later windows go straight to the full length


def test_only_onnx_runtime_refusals_are_retried():
    """A bug in the feeds (or anything not raised by ONNX Runtime) surfaces at once, and a refusal
    at the full length is raised, not swallowed."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from trtc.compiler.calibrate import _run

    sess = _fixed_cache_session()
    calls = []

    def bad(n):
        calls.append(n)
        raise KeyError("feeds bug")

    with pytest.raises(KeyError):
        _run(sess, ["y"], [2, 4], bad)
    assert calls == [2]
    with pytest.raises(InvalidArgument):
        _run(sess, ["y"], [3], lambda n: {"past": np.ones((1, n), np.float32)})
