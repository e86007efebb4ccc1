"""plugin_attention on a hand-made one-layer graph in the native form the spine's passes leave:
the match (structure, schema, and numerics: native graph vs plugin graph over a prefill and a decode
step, the plugin nodes run by the reference backend's custom ops), and near-misses that must be
refused with the graph unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from trtc.compiler.build import profiles_for
from trtc.compiler.config import BuildConfig
from trtc.compiler.graph_check import PLUGIN_DOMAIN, check_graph
from trtc.compiler.passes import PLUGIN_PIPELINE, PassContext, get_pass, pipeline_for, validate_dump_after
from trtc.artifact import BLOCK_TABLES, CU_SEQLENS, pool_names
from factories import pass_test_spec
from trtc.spec import ModelSpec
from trtc.errors import TrtcError, TrtcInternalError
from trtc.plugins.reference import rope_tables
from trtc.plugins.schema import NAMESPACE, PAGED_ATTENTION, ROPE_KV_APPEND
from trtc.runtime.paged_kv import PagedKVCache

F32 = np.float32
HQ, HKV, D, MAX, BS = 4, 2, 8, 24, 16


def spec(window=None) -> ModelSpec:
    return pass_test_spec(HQ, HKV, D, window)


def ctx(window=None) -> PassContext:
    return PassContext(spec=spec(window), max_seq_len=MAX, attention="plugin", kv_block_size=BS)


def native_graph(interleaved=0, extra_cache_reader=False, q_via_transpose=True):
    """One layer as kv_cache_scatter + fold_repeat_kv + rotary_cache leave it (mask added below)."""
    v_ = gs.Variable
    ids, pos = v_("input_ids", np.int64, ["batch", "seq"]), v_("position_ids", np.int64, ["batch", "seq"])
    q_bshd = v_("q_bshd", F32, ["batch", "seq", HQ, D] if q_via_transpose else ["batch", HQ, "seq", D])
    k, v = v_("k", F32, ["batch", HKV, "seq", D]), v_("v", F32, ["batch", HKV, "seq", D])
    past_k = v_("past_key_values.0.key", F32, ["batch", HKV, MAX, D])
    past_v = v_("past_key_values.0.value", F32, ["batch", HKV, MAX, D])
    cos, sin = (gs.Constant(f"rotary_{n}_cache", t.numpy()) for n, t in zip(("cos", "sin"), rope_tables(MAX, D)))
    q, q_rot, k_rot, idx = v_("q", F32), v_("q_rot", F32, ["batch", HQ, "seq", D]), v_("k_rot", F32), v_("idx", np.int64)
    pk, pv = v_("present.0.key", F32, past_k.shape), v_("present.0.value", F32, past_v.shape)
    out = v_("attn_out", F32)
    q_src = [gs.Node("Transpose", "q_t", attrs={"perm": [0, 2, 1, 3]}, inputs=[q_bshd], outputs=[q])] \
        if q_via_transpose else [gs.Node("Identity", "q_i", inputs=[q_bshd], outputs=[q])]
    q.shape = ["batch", HQ, "seq", D]
    k.shape = ["batch", HKV, "seq", D]
    rope = {"interleaved": interleaved}
    nodes = q_src + [
        gs.Node("RotaryEmbedding", "rope_q", attrs=rope, inputs=[q, cos, sin, pos], outputs=[q_rot]),
        gs.Node("RotaryEmbedding", "rope_k", attrs=rope, inputs=[k, cos, sin, pos], outputs=[k_rot]),
        gs.Node("Gather", "idx", attrs={"axis": 1}, inputs=[pos, gs.Constant("zero", np.array(0))], outputs=[idx]),
        gs.Node("TensorScatter", "scatter_k", attrs={"axis": -2, "mode": "linear"}, inputs=[past_k, k_rot, idx],
                outputs=[pk]),
        gs.Node("TensorScatter", "scatter_v", attrs={"axis": -2, "mode": "linear"}, inputs=[past_v, v, idx],
                outputs=[pv]),
        gs.Node("Attention", "attn", attrs={"is_causal": 0, "scale": 0.3}, inputs=[q_rot, pk, pv], outputs=[out]),
    ]
    outputs = [out, pk, pv]
    if extra_cache_reader:
        peek = v_("peek", F32)
        nodes.append(gs.Node("Identity", "peek", inputs=[pk], outputs=[peek]))
        outputs.append(peek)
    g = gs.Graph(nodes=nodes, inputs=[ids, pos, q_bshd, k, v, past_k, past_v], outputs=outputs, opset=24)
    return get_pass("attention_mask_from_positions")(g, PassContext(spec=spec(), max_seq_len=MAX)).toposort()


def ops(g):
    return sorted(n.op for n in g.nodes)


def test_plugin_pass_match_structure():
    g = get_pass("plugin_attention")(native_graph(), c := ctx())
    g.toposort()
    check_graph(g, after="plugin_attention")
    assert c.stats["plugin_attention"] == 1
    assert not {"RotaryEmbedding", "TensorScatter", "Attention"} & set(ops(g))
    plugin = {n.op: n for n in g.nodes if n.domain == NAMESPACE}
    assert set(plugin) == {"RopeKvAppend", "PagedAttention"}
    app, att = plugin["RopeKvAppend"], plugin["PagedAttention"]
    # input order, names and attributes come from plugins/schema.py
    assert [t.name for t in app.inputs][5:] == [BLOCK_TABLES, "cu_seqlens_q", "seq_lens", "plugin_kv_scales",
                                                 "past_kv_pool.0"]
    assert len(app.inputs) == len(ROPE_KV_APPEND.inputs) and len(att.inputs) == len(PAGED_ATTENTION.inputs)
    assert att.inputs[1] is app.outputs[1]                     # attention reads the updated pool
    assert att.attrs["softmax_scale"] == pytest.approx(0.3)    # the Attention node's own scale
    assert app.attrs["head_size"] == D and app.attrs["block_size"] == BS and app.attrs["plugin_namespace"] == "trtc"
    assert app.inputs[0].inputs[0].inputs[0].name == "q_bshd"  # projection's [B,S,H,D] view, no extra transpose
    names = [t.name for t in g.inputs]
    assert names == ["input_ids", "position_ids", "q_bshd", "k", "v", "past_kv_pool.0", BLOCK_TABLES, CU_SEQLENS]
    assert [t.name for t in g.outputs] == ["attn_out", "present_kv_pool.0"]
    assert g.inputs[5].shape == ["num_blocks", 2, HKV, BS, D] and g.inputs[6].shape == ["batch", 2]
    assert g.inputs[7].shape == ["batch+1"] and app.inputs[6] is g.inputs[7]   # packed tokens, boundaries given
    assert PLUGIN_DOMAIN == NAMESPACE


def run_native(g, feeds):
    from onnx_graphsurgeon import export_onnx

    sess = ort.InferenceSession(export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_plugin(g, feeds):
    from onnx_graphsurgeon import export_onnx

    from trtc.runtime.ort_plugin_session import register_custom_ops

    so = ort.SessionOptions()
    so.register_custom_ops_library(register_custom_ops())
    sess = ort.InferenceSession(export_onnx(g).SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _pack(x, lens, head_axis):
    """Rows of x ([B, S, ...], or [B, H, S, ...] when head_axis) -> the packed [1, tokens, ...] /
    [1, H, tokens, ...] the plugin form takes, each row cut to its length."""
    if head_axis:
        return np.concatenate([x[b][:, :n] for b, n in enumerate(lens)], axis=1)[None]
    return np.concatenate([x[b, :n] for b, n in enumerate(lens)])[None]


@pytest.mark.parametrize("q_via_transpose", [True, False])
def test_plugin_pass_match_numerics(q_via_transpose):
    """Prefill of 2 sequences of 5 and 3 tokens (the native graph gets them right-padded, the plugin
    form packed: 8 tokens), decode at different positions, then row 0 jumps to position 17 (a second
    block; slots 6..16 hold zeros in both forms): the same attention output as the native graph for
    every real token, with the KV cache in non-identity paged blocks instead of contiguous caches."""
    native = native_graph(q_via_transpose=q_via_transpose)
    plugin = get_pass("plugin_attention")(native_graph(q_via_transpose=q_via_transpose), ctx()).toposort()
    rng = np.random.default_rng(0)
    cache = {n: np.zeros((2, HKV, MAX, D), F32) for n in ("past_key_values.0.key", "past_key_values.0.value")}
    kv = PagedKVCache(num_layers=1, num_kv_heads=HKV, head_dim=D, block_size=BS, max_seq_len=MAX)
    kv.allocate(2, num_blocks=6)
    kv.free.reverse()                                   # blocks handed out 5, 4, ...: not the identity
    steps = [(np.tile(np.arange(5), (2, 1)), [5, 3]), (np.array([[5], [3]]), [1, 1]), (np.array([[17], [4]]), [1, 1])]
    for pos, lens in steps:
        b, s = pos.shape
        feeds = {"input_ids": np.zeros((b, s), np.int64), "position_ids": pos,
                 "q_bshd": rng.standard_normal((b, s, HQ, D) if q_via_transpose else (b, HQ, s, D)).astype(F32),
                 "k": rng.standard_normal((b, HKV, s, D)).astype(F32),
                 "v": rng.standard_normal((b, HKV, s, D)).astype(F32)}
        want, new_k, new_v = run_native(native, {**feeds, **cache})
        cache = {"past_key_values.0.key": new_k, "past_key_values.0.value": new_v}
        packed = {"input_ids": _pack(feeds["input_ids"], lens, False), "position_ids": _pack(pos, lens, False),
                  "q_bshd": _pack(feeds["q_bshd"], lens, not q_via_transpose),
                  "k": _pack(feeds["k"], lens, True), "v": _pack(feeds["v"], lens, True),
                  CU_SEQLENS: np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)}
        kv.reserve([pos[i, n - 1] + 1 for i, n in enumerate(lens)])
        got, pool = run_plugin(plugin, {**packed, "past_kv_pool.0": kv.pools[0], BLOCK_TABLES: kv.block_tables()})
        kv.pools[0] = pool
        assert got.shape == (1, HQ, sum(lens), D)                     # [1, Hq, tokens, D]: no padding computed
        np.testing.assert_allclose(got, _pack(want, lens, True), rtol=1e-5, atol=1e-5)
    assert kv.tables == [[5, 3], [4]]      # row 0 jumped to position 17: a second, non-adjacent block


@pytest.mark.parametrize("near_miss,needle", [
    ({"interleaved": 1}, "interleaved"),
    ({"extra_cache_reader": True}, "also read by peek"),
])
def test_plugin_pass_near_miss_leaves_graph_unchanged(near_miss, needle):
    g = native_graph(**near_miss)
    before = (ops(g), [t.name for t in g.inputs], [t.name for t in g.outputs])
    with pytest.raises(TrtcError, match=needle):
        get_pass("plugin_attention")(g, ctx())
    assert (ops(g), [t.name for t in g.inputs], [t.name for t in g.outputs]) == before


def test_plugin_pass_refuses_sliding_window():
    with pytest.raises(TrtcError, match="sliding-window"):
        get_pass("plugin_attention")(native_graph(), ctx(window=8))


def test_graph_check_reads_the_schema():
    g = get_pass("plugin_attention")(native_graph(), ctx()).toposort()
    att = next(n for n in g.nodes if n.op == "PagedAttention")
    att.attrs["head_size"] = 7
    with pytest.raises(TrtcInternalError, match="head_size"):
        check_graph(g)
    att.attrs["head_size"] = D
    att.attrs["bogus"] = 1
    with pytest.raises(TrtcInternalError, match="unknown attributes"):
        check_graph(g)
    del att.attrs["bogus"]
    att.inputs.pop()
    with pytest.raises(TrtcInternalError, match="inputs"):
        check_graph(g)


def test_plugin_pipeline_and_dump_after():
    assert pipeline_for("plugin") == PLUGIN_PIPELINE and PLUGIN_PIPELINE[-2:] == ("plugin_attention", "cleanup")
    validate_dump_after(("plugin_attention",), "plugin")
    with pytest.raises(TrtcError, match="--attention native"):
        validate_dump_after(("plugin_attention",), "native")
    assert pool_names(2) == [("past_kv_pool.0", "present_kv_pool.0"), ("past_kv_pool.1", "present_kv_pool.1")]


def test_profiles_for_plugin_inputs():
    cfg = BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=40, targets=("sm_90",))
    s = dataclasses.replace(spec(), num_layers=1)
    (prefill, decode) = profiles_for(s, cfg, ["input_ids", "position_ids", "past_kv_pool.0", BLOCK_TABLES,
                                              CU_SEQLENS], kv_block_size=16)
    assert prefill.shapes[BLOCK_TABLES] == [[1, 3], [1, 3], [4, 3]]             # ceil(40 / 16) blocks
    assert prefill.shapes["past_kv_pool.0"][2] == [12, 2, HKV, 16, D]          # 4 sequences x 3 blocks
    assert prefill.shapes["input_ids"] == [[1, 1], [1, 8], [1, 64]]            # packed: up to 4 x 16 tokens
    assert decode.shapes["input_ids"] == [[1, 1], [1, 1], [1, 4]]              # one token per sequence
    assert decode.shapes[CU_SEQLENS] == [[2], [2], [5]]


def decomposed_rotary_graph(second_half_scale=1.0):
    """HF's apply_rotary_pos_emb as float16 exports leave it: x*cos + rotate_half(x)*sin."""
    v_, c_ = gs.Variable, gs.Constant
    pos, x = v_("position_ids", np.int64, ["batch", "seq"]), v_("x", F32, ["batch", HQ, "seq", D])
    inv = c_("inv_freq", (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(F32))
    t = {n: v_(n) for n in ("u", "pf", "f", "f2", "emb", "cos", "sin", "cu", "su", "hi", "lo", "neg", "rot",
                            "a", "b")}
    out = v_("x_rot", F32)
    i64 = lambda name, v: c_(name, np.array(v, np.int64))  # noqa: E731
    nodes = [
        gs.Node("Unsqueeze", inputs=[pos, i64("ax2", [2])], outputs=[t["u"]]),
        gs.Node("Cast", attrs={"to": 1}, inputs=[t["u"]], outputs=[t["pf"]]),
        gs.Node("Mul", inputs=[t["pf"], inv], outputs=[t["f"]]),
        gs.Node("Mul", inputs=[t["f"], c_("scale2", np.array(second_half_scale, F32))], outputs=[t["f2"]]),
        gs.Node("Concat", attrs={"axis": -1}, inputs=[t["f"], t["f2"]], outputs=[t["emb"]]),
        gs.Node("Cos", inputs=[t["emb"]], outputs=[t["cos"]]),
        gs.Node("Sin", inputs=[t["emb"]], outputs=[t["sin"]]),
        gs.Node("Unsqueeze", inputs=[t["cos"], i64("ax1c", [1])], outputs=[t["cu"]]),
        gs.Node("Unsqueeze", inputs=[t["sin"], i64("ax1s", [1])], outputs=[t["su"]]),
        gs.Node("Slice", inputs=[x, i64("s_h", [D // 2]), i64("e_big", [2 ** 62]), i64("ax_a", [-1]), i64("st", [1])],
                outputs=[t["hi"]]),
        gs.Node("Slice", inputs=[x, i64("s_0", [0]), i64("e_h", [D // 2]), i64("ax_b", [-1]), i64("st2", [1])],
                outputs=[t["lo"]]),
        gs.Node("Neg", inputs=[t["hi"]], outputs=[t["neg"]]),
        gs.Node("Concat", attrs={"axis": -1}, inputs=[t["neg"], t["lo"]], outputs=[t["rot"]]),
        gs.Node("Mul", inputs=[x, t["cu"]], outputs=[t["a"]]),
        gs.Node("Mul", inputs=[t["rot"], t["su"]], outputs=[t["b"]]),
        gs.Node("Add", inputs=[t["a"], t["b"]], outputs=[out]),
    ]
    return gs.Graph(nodes=nodes, inputs=[pos, x], outputs=[out], opset=24)


def test_fuse_rotary_match_keeps_numerics():
    from onnx_graphsurgeon import export_onnx

    feeds = {"position_ids": np.array([[3, 4, 5], [9, 10, 11]]),
             "x": np.random.default_rng(1).standard_normal((2, HQ, 3, D)).astype(F32)}

    def run(g):
        sess = ort.InferenceSession(export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]

    before = run(decomposed_rotary_graph())
    g = get_pass("fuse_rotary")(decomposed_rotary_graph(), c := ctx()).toposort()
    assert c.stats["fuse_rotary"] == 1 and "Neg" not in ops(g)
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert rope.inputs[0].name == "x" and rope.attrs == {"interleaved": 0}
    check_graph(g)
    np.testing.assert_allclose(run(g), before, rtol=1e-6, atol=1e-6)
    g = get_pass("rotary_cache")(g, c)               # and the cache pass takes it from there
    assert len(next(n for n in g.nodes if n.op == "RotaryEmbedding").inputs) == 4


def test_fuse_rotary_near_miss_halves_differ():
    g = get_pass("fuse_rotary")(decomposed_rotary_graph(second_half_scale=2.0), c := ctx())
    assert c.stats["fuse_rotary"] == 0 and "RotaryEmbedding" not in ops(g)
