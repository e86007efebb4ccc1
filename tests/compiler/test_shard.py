"""compiler/shard.py: which tp sizes a model takes, and the rank graphs of a hand-made decoder layer
(the exporter's form after trtc's passes) computing exactly the unsharded graph when their
DistCollective nodes are executed (runtime/tp_session.py's all-reduce, ranks in threads)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from factories import pass_test_spec
from trtc import artifact as art
from trtc.compiler import shard
from trtc.compiler import tp as tp_policy
from trtc.errors import TrtcError

V, H, D, INTER, T = 32, 16, 4, 24, 16     # vocab, hidden, head dim, MLP width, cache length


def spec_of(hq: int, hkv: int, inter: int = INTER):
    return dataclasses.replace(pass_test_spec(num_heads=hq, num_kv_heads=hkv, head_dim=D), hidden_size=H,
                               intermediate_size=inter, vocab_size=V)


# --- tp sizes -------------------------------------------------------------------------------------

def test_valid_tp_sizes_and_the_error_names_them():
    smollm2 = spec_of(9, 3, inter=1536)                       # SmolLM2-135M's heads and MLP
    assert tp_policy.valid_tp_sizes(smollm2) == [1, 3]
    tp_policy.check_tp(smollm2, 3)
    with pytest.raises(TrtcError) as e:
        tp_policy.check_tp(smollm2, 2)
    assert "--tp-size 2" in str(e.value) and "valid tp sizes for this model: 1, 3" in str(e.value)
    assert tp_policy.valid_tp_sizes(spec_of(8, 2)) == [1, 2, 4, 8]     # 4 and 8 replicate the 2 KV heads
    assert tp_policy.valid_tp_sizes(spec_of(8, 1)) == [1, 2, 4, 8]     # one KV head: every rank keeps it
    with pytest.raises(TrtcError, match="intermediate size 24 is not divisible by 16"):
        tp_policy.check_tp(spec_of(16, 16), 16)
    with pytest.raises(TrtcError, match="neither be split 4 ways nor replicated"):
        tp_policy.check_tp(spec_of(12, 6, inter=48), 4)


def test_blocks_of_scales_must_not_straddle_a_row_shard():
    spec = spec_of(8, 2, inter=128)                      # o_proj input 32 rows, down_proj 128
    tp_policy.check_tp(spec, 2, "int4_awq", 16)              # 16 and 64 rows per rank: whole groups
    with pytest.raises(TrtcError) as e:
        tp_policy.check_tp(spec, 2, "int4_awq", 32)
    assert "o_proj holds 16 input rows" in str(e.value) and "use --group-size 16" in str(e.value)
    with pytest.raises(TrtcError, match="nvfp4's 16-row blocks"):
        tp_policy.check_tp(spec, 4, "nvfp4")
    tp_policy.check_tp(spec, 4, "int8_wo")                   # per-column scales: any split


def test_plugin_attention_is_refused_with_the_reason():
    with pytest.raises(TrtcError, match="--attention plugin with --tp-size 2 is not supported"):
        tp_policy.check_tp(spec_of(4, 2), 2, attention="plugin")


@pytest.mark.parametrize("hq, hkv, tp, kv_cols", [
    (8, 4, 2, [(0, 8), (8, 16)]),                        # KV heads split: 2 per rank
    (8, 2, 4, [(0, 4), (0, 4), (4, 8), (4, 8)]),         # replicated: ranks 0,1 read KV head 0
    (9, 3, 3, [(0, 4), (4, 8), (8, 12)]),
    (4, 1, 4, [(0, 4)] * 4),                             # one KV head on every rank
])
def test_each_rank_keeps_the_kv_heads_its_queries_read(hq, hkv, tp, kv_cols):
    lay = shard.Layout.of(spec_of(hq, hkv), tp)
    assert [lay.kv_cols(r) for r in range(tp)] == kv_cols
    assert [lay.q_cols(r) for r in range(tp)] == [(r * hq // tp * D, (r + 1) * hq // tp * D) for r in range(tp)]
    group = hq // hkv                                    # query heads per KV head
    for r in range(tp):
        q_heads = range(*(c // D for c in lay.q_cols(r)))
        assert {h // group for h in q_heads} == set(range(*(c // D for c in lay.kv_cols(r))))


# --- a hand-made layer ----------------------------------------------------------------------------

def layer_graph(out: Path, hq: int, hkv: int, bias: bool = False, norm_across_heads: bool = False) -> art.RankGraph:
    """One decoder layer as trtc's passes leave it (Attention, RotaryEmbedding with a cache and
    position ids, TensorScatter cache writes, SwiGLU MLP), float32, saved with external data."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, *shape, scale=0.5):
        inits.append(nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, value, dtype=np.int64):
        inits.append(nh.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def n(op, inputs, output, **attrs):
        nodes.append(oh.make_node(op, inputs, [output], name=f"n_{output}", **attrs))
        return output

    emb = n("Gather", [w("embed", V, H), "input_ids"], "emb", axis=0)
    h = n("RMSNormalization", [emb, c("norm1", np.ones(H), np.float32)], "h", axis=-1)
    bs = n("Shape", ["input_ids"], "bs")
    split = n("Concat", [bs, c("heads_d", [-1, D])], "split_shape", axis=0)
    merge = n("Concat", [bs, c("minus1", [-1])], "merge_shape", axis=0)
    pos_cache = np.arange(T)[:, None] / (10000 ** (np.arange(D // 2) / (D // 2)))
    cos, sin = c("cos", np.cos(pos_cache), np.float32), c("sin", np.sin(pos_cache), np.float32)
    widx = n("Gather", ["position_ids", c("zero", 0)], "widx", axis=1)
    heads = {}
    for name, nh_ in (("q", hq), ("k", hkv), ("v", hkv)):
        y = n("MatMul", [h, w(f"W{name}", H, nh_ * D)], f"{name}_mm")
        if bias:
            y = n("Add", [y, w(f"b{name}", nh_ * D)], f"{name}_b")
        if norm_across_heads and name == "q":
            y = n("RMSNormalization", [y, c("qnorm", np.ones(nh_ * D), np.float32)], "q_normed", axis=-1)
        t = n("Transpose", [n("Reshape", [y, split], f"{name}_4d")], f"{name}_t", perm=[0, 2, 1, 3])
        if name != "v":
            t = n("RotaryEmbedding", [t, cos, sin, "position_ids"], f"{name}_rot", num_heads=nh_)
        heads[name] = t
    pk = n("TensorScatter", ["past_key_values.0.key", heads["k"], widx], "present.0.key", axis=-2)
    pv = n("TensorScatter", ["past_key_values.0.value", heads["v"], widx], "present.0.value", axis=-2)
    slots = n("Unsqueeze", [n("Range", [c("range0", 0), c("rangeT", T), c("range1", 1)], "slots"), c("ax012", [0, 1, 2])],
              "slots4")
    mask = n("LessOrEqual", [slots, n("Unsqueeze", ["position_ids", c("ax13", [1, 3])], "pos4")], "mask")
    a = n("Attention", [heads["q"], pk, pv, mask], "attn", scale=float(D ** -0.5), is_causal=0)
    ao = n("Reshape", [n("Transpose", [a], "attn_t", perm=[0, 2, 1, 3]), merge], "attn_merged")
    r1 = n("Add", [emb, n("MatMul", [ao, w("Wo", hq * D, H)], "o_mm")], "r1")
    h2 = n("RMSNormalization", [r1, c("norm2", np.ones(H), np.float32)], "h2", axis=-1)
    g = n("MatMul", [h2, w("Wg", H, INTER)], "g")
    act = n("Mul", [n("Mul", [g, n("Sigmoid", [g], "sig")], "silu"), n("MatMul", [h2, w("Wu", H, INTER)], "u")], "act")
    r2 = n("Add", [r1, n("MatMul", [act, w("Wd", INTER, H)], "d_mm")], "r2")
    n("MatMul", [n("RMSNormalization", [r2, c("norm3", np.ones(H), np.float32)], "h3", axis=-1), w("Wlm", H, V)],
      "logits")
    cache = ["batch", hkv, T, D]
    graph = oh.make_graph(
        nodes, "layer",
        [oh.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
         oh.make_tensor_value_info("position_ids", TP.INT64, ["batch", "seq"]),
         oh.make_tensor_value_info("past_key_values.0.key", TP.FLOAT, cache),
         oh.make_tensor_value_info("past_key_values.0.value", TP.FLOAT, cache)],
        [oh.make_tensor_value_info("logits", TP.FLOAT, ["batch", "seq", V]),
         oh.make_tensor_value_info("present.0.key", TP.FLOAT, cache),
         oh.make_tensor_value_info("present.0.value", TP.FLOAT, cache)],
        initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 24)])
    out.mkdir(parents=True, exist_ok=True)
    rg = art.RankGraph(0, "rank0.onnx", "rank0.onnx.data")
    onnx.save_model(model, str(out / rg.file), save_as_external_data=True, location=rg.data, size_threshold=128)
    return rg


def feeds(hkv: int) -> dict:
    ids = np.array([[3, 7, 1, 30, 12], [9, 2, 2, 5, 17]])
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    zeros = np.zeros((2, hkv, T, D), np.float32)
    return {"input_ids": ids, "position_ids": pos, "past_key_values.0.key": zeros, "past_key_values.0.value": zeros}


def run_unsharded(d: Path, rg: art.RankGraph, hkv: int) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(d / rg.file), providers=["CPUExecutionProvider"])
    return sess.run(["logits", "present.0.key"], feeds(hkv))


def run_ranks(d: Path, graphs: list[art.RankGraph], kv_heads: int) -> list[list[np.ndarray]]:
    """Every rank graph in its own thread, their DistCollectives executed by tp_session's all-reduce."""
    import onnx
    import onnxruntime as ort

    from trtc.runtime.tp_session import RankGroup, register_all_reduce, rewrite_collectives

    group = RankGroup(len(graphs), timeout=60)
    sessions = []
    for g in graphs:
        model = onnx.load(str(d / g.file), load_external_data=False)
        assert rewrite_collectives(model, g.rank, group.id, float16=False) == 2      # o_proj and down_proj
        path = d / f"rw{g.rank}.onnx"
        onnx.save_model(model, str(path))
        so = ort.SessionOptions()
        so.register_custom_ops_library(register_all_reduce())
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    results: list = [None] * len(graphs)

    def run(r):
        results[r] = sessions[r].run(["logits", "present.0.key"], feeds(kv_heads))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(graphs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group.close()
    return results


@pytest.mark.parametrize("hq, hkv, tp, bias, external", [(4, 2, 2, True, False), (4, 2, 4, False, True),
                                                         (4, 1, 2, False, False), (4, 2, 2, False, True)])
def test_rank_graphs_compute_the_unsharded_layer(tmp_path, monkeypatch, hq, hkv, tp, bias, external):
    """external: the weights stay references into the source data file (named rank0.onnx.data, as
    rank 0's own), as a real model's large tensors do; else they are loaded (under 1 MiB)."""
    import onnx

    if external:
        monkeypatch.setattr("trtc.compiler.onnx_io.SMALL_BYTES", 0)
    src = layer_graph(tmp_path / "src", hq, hkv, bias=bias)
    spec = spec_of(hq, hkv)
    graphs, rank0 = shard.shard_rank_graphs(tmp_path / "src", src, tmp_path / "tp", spec, tp, "0123456789abcdef")
    assert [g.file for g in graphs] == [art.rank_onnx(r) for r in range(tp)]
    lay = shard.Layout.of(spec, tp)
    for g in graphs:
        m = onnx.load(str(tmp_path / "tp" / g.file), load_external_data=False)
        meta = {p.key: p.value for p in m.metadata_props}
        assert meta == {art.GRAPH_FINGERPRINT: "0123456789abcdef", art.GRAPH_RANK: str(g.rank),
                        art.GRAPH_WORLD_SIZE: str(tp)}
        colls = [n for n in m.graph.node if n.op_type == "DistCollective"]
        assert len(colls) == 2 and all(n.domain == "" for n in colls)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in colls[0].attribute}
        assert attrs == {"collective_operation": b"all_reduce", "reduce_op": b"sum", "root": -1, "group_size": 0,
                         "nb_rank": tp}
        cache_in = next(i for i in m.graph.input if i.name == "past_key_values.0.key")
        assert [d.dim_value or d.dim_param for d in cache_in.type.tensor_type.shape.dim] == ["batch", lay.kv_heads, T, D]
        rot = {n.output[0]: onnx.helper.get_attribute_value(n.attribute[0]) for n in m.graph.node
               if n.op_type == "RotaryEmbedding"}
        assert rot == {"q_rot": lay.q_heads, "k_rot": lay.kv_heads}
    ref_logits, ref_cache = run_unsharded(tmp_path / "src", src, hkv)
    outs = run_ranks(tmp_path / "tp", graphs, lay.kv_heads)
    for logits, _ in outs:
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for r, (_, cache) in enumerate(outs):                # each rank's cache: the KV heads its queries read
        a, b = (c // D for c in lay.kv_cols(r))
        np.testing.assert_allclose(cache, ref_cache[:, a:b], rtol=1e-5, atol=1e-5)
    # each rank holds its share of the split weights (its KV heads whole) and every replicated one
    per_rank = H * (hq // tp * D + 2 * lay.kv_heads * D) + hq // tp * D * H + 3 * H * INTER // tp
    split = H * (hq + 2 * hkv) * D + hq * D * H + 3 * H * INTER
    if bias:
        per_rank, split = per_rank + hq // tp * D + 2 * lay.kv_heads * D, split + (hq + 2 * hkv) * D
    for g in graphs:
        assert weight_bytes(tmp_path / "tp" / g.file) == weight_bytes(tmp_path / "src" / src.file) + 4 * (per_rank - split)


def weight_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in m.graph.initializer)


def test_a_norm_across_heads_is_a_near_miss(tmp_path):
    """A norm over all query heads (not per head) cannot be split by head: refused, naming the layer."""
    src = layer_graph(tmp_path / "src", 4, 2, norm_across_heads=True)
    with pytest.raises(TrtcError) as e:
        shard.shard_rank_graphs(tmp_path / "src", src, tmp_path / "tp", spec_of(4, 2), 2, "f" * 16)
    assert "cannot shard layer 0" in str(e.value) and "norm across heads" in str(e.value)


def test_attention_nodes_must_be_one_per_layer(tmp_path):
    """A plugin-form graph (no Attention nodes) or another layout: one error, no rank graphs."""
    src = layer_graph(tmp_path / "src", 4, 2)
    with pytest.raises(TrtcError, match="1 Attention nodes for 2 layers"):
        shard.shard_rank_graphs(tmp_path / "src", src, tmp_path / "tp",
                                dataclasses.replace(spec_of(4, 2), num_layers=2), 2, "f" * 16)
