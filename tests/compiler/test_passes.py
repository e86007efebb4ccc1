"""Each pass on a tiny hand-made graph: once where its pattern matches, once on a near-miss."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from trtc.compiler.graph_check import check_graph
from trtc.compiler.passes import PIPELINE, PassContext, get_pass, run_passes
from factories import pass_test_spec
from trtc.spec import ModelSpec
from trtc.errors import TrtcError, TrtcInternalError

F32 = np.float32
HKV, D, HQ = 2, 8, 4


def spec(window=None) -> ModelSpec:
    return pass_test_spec(HQ, HKV, D, window)


def ctx(window=None, max_seq=16) -> PassContext:
    return PassContext(spec=spec(window), max_seq_len=max_seq)


def var(name, dtype=None, shape=None):
    return gs.Variable(name, dtype=dtype, shape=shape)


def kv_graph(past_name="past_key_values.0.key", axis=-2):
    pos = var("position_ids", np.int64, ["batch", "seq"])
    past = var(past_name, F32, ["batch", HKV, "past", D])
    new = var("new_k", F32, ["batch", HKV, "seq", D])
    out = var("present.0.key", F32)
    node = gs.Node("Concat", "cat", attrs={"axis": axis}, inputs=[past, new], outputs=[out])
    g = gs.Graph(nodes=[node], inputs=[pos, past, new], outputs=[out], opset=23)
    return g


def test_kv_cache_scatter_match():
    g = get_pass("kv_cache_scatter")(kv_graph(), c := ctx())
    ops = [n.op for n in g.toposort().nodes]
    assert "TensorScatter" in ops and "Concat" not in ops
    ts = next(n for n in g.nodes if n.op == "TensorScatter")
    assert ts.attrs == {"axis": -2, "mode": "linear"}
    assert ts.inputs[0].shape == ["batch", HKV, 16, D]       # static cache length for TensorRT
    assert g.opset == 24 and c.stats["kv_cache_scatter"] == 1
    check_graph(g)
    # Numerics: the scatter writes each sequence's new entries at its first position.
    m = gs.export_onnx(g)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    cache = np.zeros((2, HKV, 16, D), F32)
    new = np.random.default_rng(0).standard_normal((2, HKV, 3, D)).astype(F32)
    out = sess.run(None, {"position_ids": np.array([[4, 5, 6], [0, 1, 2]]), "past_key_values.0.key": cache,
                          "new_k": new})[0]
    assert np.array_equal(out[0, :, 4:7], new[0]) and np.array_equal(out[1, :, 0:3], new[1])
    assert not out[0, :, :4].any() and not out[0, :, 7:].any()


@pytest.mark.parametrize("near_miss", [{"past_name": "some_other_input"}, {"axis": 1}])
def test_kv_cache_scatter_near_miss(near_miss):
    g = get_pass("kv_cache_scatter")(kv_graph(**near_miss), c := ctx())
    assert [n.op for n in g.nodes] == ["Concat"] and c.stats["kv_cache_scatter"] == 0


def attention_graph(unsqueeze_axis=2, with_mask=True):
    pos = var("position_ids", np.int64, ["batch", "seq"])
    past = var("past_key_values.0.key", F32, ["batch", HKV, 16, D])
    q = var("q", F32, ["batch", HQ, "seq", D])
    nodes, inputs = [], [pos, past, q]

    def rep(src, tag):
        u, e, r = var(f"u_{tag}"), var(f"e_{tag}"), var(f"r_{tag}")
        nodes.append(gs.Node("Unsqueeze", f"unsq_{tag}", inputs=[src, gs.Constant(f"ax_{tag}", np.array([unsqueeze_axis]))], outputs=[u]))
        nodes.append(gs.Node("Expand", f"exp_{tag}", inputs=[u, gs.Constant(f"sh_{tag}", np.array([1, HKV, 2, 16, D]))], outputs=[e]))
        nodes.append(gs.Node("Reshape", f"rs_{tag}", inputs=[e, gs.Constant(f"sh2_{tag}", np.array([1, HQ, 16, D]))], outputs=[r]))
        return r

    k, v = rep(past, "k"), rep(past, "v")
    attn_in = [q, k, v]
    if with_mask:
        m = var("hf_mask", np.bool_, ["batch", 1, "seq", 16])
        inputs.append(m)
        attn_in.append(m)
    out = var("attn_out", F32)
    nodes.append(gs.Node("Attention", "attn", attrs={"is_causal": 0}, inputs=attn_in, outputs=[out]))
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=[out], opset=24)


def test_fold_repeat_kv_match():
    g = get_pass("fold_repeat_kv")(attention_graph(), c := ctx())
    attn = next(n for n in g.nodes if n.op == "Attention")
    assert attn.inputs[1].name == "past_key_values.0.key" and attn.inputs[2].name == "past_key_values.0.key"
    assert c.stats["fold_repeat_kv"] == 2
    g.cleanup()
    assert {n.op for n in g.nodes} == {"Attention"}


def test_fold_repeat_kv_near_miss():
    g = get_pass("fold_repeat_kv")(attention_graph(unsqueeze_axis=1), c := ctx())
    attn = next(n for n in g.nodes if n.op == "Attention")
    assert attn.inputs[1].name == "r_k" and c.stats["fold_repeat_kv"] == 0


@pytest.mark.parametrize("window", [None, 3])
def test_attention_mask_from_positions_match(window):
    g = get_pass("attention_mask_from_positions")(attention_graph(), c := ctx(window))
    attn = next(n for n in g.nodes if n.op == "Attention")
    assert attn.inputs[3].name != "hf_mask" and attn.attrs["is_causal"] == 0
    assert c.stats["attention_mask_from_positions"] == 1
    # Evaluate the mask subgraph alone: slot j visible to position p iff j <= p (and j > p - window).
    g.outputs = [attn.inputs[3]]
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    sess = ort.InferenceSession(gs.export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    pos = np.array([[0, 1, 2], [5, 6, 7]])
    feeds = {t.name: (pos if t.name == "position_ids" else np.zeros((2, HKV, 16, D), F32)) for t in g.inputs}
    mask = sess.run(None, feeds)[0]
    j = np.arange(16)
    for b in range(2):
        for s in range(3):
            p = pos[b, s]
            want = (j <= p) & ((j > p - window) if window else True)
            assert np.array_equal(mask[b, 0, s], want)


def test_attention_mask_near_miss_without_cache():
    g = attention_graph()
    g.inputs = [t for t in g.inputs if t.name != "past_key_values.0.key"]
    g = get_pass("attention_mask_from_positions")(g, c := ctx())
    assert next(n for n in g.nodes if n.op == "Attention").inputs[3].name == "hf_mask"
    assert c.stats["attention_mask_from_positions"] == 0


def rotary_graph(depend_on="position_ids"):
    pos = var("position_ids", np.int64, ["batch", "seq"])
    ids = var("input_ids", np.int64, ["batch", "seq"])
    x = var("x", F32, ["batch", HQ, "seq", D])
    inv = gs.Constant("inv_freq", (1.0 / (10000 ** (np.arange(0, D, 2) / D))).astype(F32))
    src = pos if depend_on == "position_ids" else ids
    u, f, m, cos, sin, out = var("u"), var("f"), var("m"), var("cos"), var("sin"), var("rot", F32)
    nodes = [
        gs.Node("Unsqueeze", "u", inputs=[src, gs.Constant("ax", np.array([2]))], outputs=[u]),
        gs.Node("Cast", "c", attrs={"to": 1}, inputs=[u], outputs=[f]),
        gs.Node("Mul", "m", inputs=[f, inv], outputs=[m]),
        gs.Node("Cos", "cos", inputs=[m], outputs=[cos]),
        gs.Node("Sin", "sin", inputs=[m], outputs=[sin]),
        gs.Node("RotaryEmbedding", "rope", attrs={"interleaved": 0}, inputs=[x, cos, sin], outputs=[out]),
    ]
    return gs.Graph(nodes=nodes, inputs=[pos, ids, x], outputs=[out], opset=23)


def run_graph(g, feeds):
    m = gs.export_onnx(g.cleanup(remove_unused_graph_inputs=False).toposort())
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def test_rotary_cache_match_keeps_numerics():
    rng = np.random.default_rng(0)
    feeds = {"position_ids": np.array([[3, 4, 5], [9, 10, 11]]), "input_ids": np.zeros((2, 3), np.int64),
             "x": rng.standard_normal((2, HQ, 3, D)).astype(F32)}
    before = run_graph(rotary_graph(), feeds)
    g = get_pass("rotary_cache")(rotary_graph(), c := ctx(max_seq=16))
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert len(rope.inputs) == 4 and rope.inputs[3].name == "position_ids"
    assert rope.inputs[1].values.shape == (16, D // 2) and c.stats["rotary_cache"] == 1
    after = run_graph(g, feeds)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    assert {n.op for n in g.cleanup().nodes} == {"RotaryEmbedding"}     # Cos/Sin per step are gone


def test_rotary_cache_near_miss_other_input():
    g = get_pass("rotary_cache")(rotary_graph(depend_on="input_ids"), c := ctx())
    assert len(next(n for n in g.nodes if n.op == "RotaryEmbedding").inputs) == 3
    assert c.stats["rotary_cache"] == 0


def test_graph_check_catches_dangling_and_bad_llm_ops():
    g = kv_graph()
    g.nodes[0].inputs[1] = var("nobody_makes_this")
    with pytest.raises(TrtcInternalError, match="nobody_makes_this"):
        check_graph(g)
    g = attention_graph()
    next(n for n in g.nodes if n.op == "Attention").attrs["is_causal"] = 1
    with pytest.raises(TrtcInternalError, match="is_causal"):
        check_graph(g)


def test_pipeline_names_and_dump_after_validation():
    assert PIPELINE[0] == "kv_cache_scatter" and PIPELINE[-1] == "cleanup"
    with pytest.raises(TrtcError, match="unknown pass"):
        run_passes(kv_graph(), PassContext(spec=spec(), max_seq_len=16, dump_after=("no_such_pass",)))
