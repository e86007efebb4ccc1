"""The pass changes for per-layer attention, soft-capped (eager) attention and rotary variants, each on
a tiny hand-made graph: once where the pattern matches (numerics checked in ONNX Runtime), once on
a near-miss."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from factories import pass_test_spec
from trtc.compiler.graph_check import check_graph
from trtc.compiler.passes import PassContext, get_pass
from trtc.errors import TrtcInternalError

F32, F16 = np.float32, np.float16
HKV, D, HQ, T = 2, 8, 4, 16          # cache length T = max_seq_len
S, F = "sliding_attention", "full_attention"
i64 = lambda name, v: gs.Constant(name, np.array(v, np.int64))  # noqa: E731


def ctx(num_layers=1, layer_types=(), window=None) -> PassContext:
    spec = dataclasses.replace(pass_test_spec(HQ, HKV, D, window), num_layers=num_layers, layer_types=layer_types)
    return PassContext(spec=spec, max_seq_len=T)


def var(name, dtype=None, shape=None):
    return gs.Variable(name, dtype=dtype, shape=shape)


def run(g, feeds):
    sess = ort.InferenceSession(gs.export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def ops(g):
    return [n.op for n in g.nodes]


# ---- rms_norm_dtypes ----

def rms_graph(x_dtype=F16):
    x = var("x", x_dtype, [2, 3, D])
    w = gs.Constant("w", np.linspace(0.5, 1.5, D).astype(F32))
    y = var("y", F32, [2, 3, D])
    node = gs.Node("RMSNormalization", "norm", attrs={"axis": -1, "epsilon": 1e-5, "stash_type": 1},
                   inputs=[x, w], outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=23)


def test_rms_norm_dtypes_match():
    """OLMo 2's `(weight * x.float()).to(dtype)` in float16: X float16, scale float32. ONNX Runtime
    refuses the node as exported; with X cast up it computes x.float() normalized times the weight."""
    x = np.random.default_rng(0).standard_normal((2, 3, D)).astype(F16)
    with pytest.raises(Exception, match="bound to different types"):
        run(rms_graph(), {"x": x})
    g = get_pass("rms_norm_dtypes")(rms_graph(), c := ctx())
    assert c.stats["rms_norm_dtypes"] == 1 and sorted(ops(g)) == ["Cast", "RMSNormalization"]
    check_graph(g.toposort())
    xf = x.astype(F32)
    want = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, D).astype(F32)
    np.testing.assert_allclose(run(g, {"x": x})[0], want, rtol=1e-5, atol=1e-6)


def test_rms_norm_dtypes_near_miss_same_types():
    g = get_pass("rms_norm_dtypes")(rms_graph(F32), c := ctx())
    assert c.stats["rms_norm_dtypes"] == 0 and ops(g) == ["RMSNormalization"]


# ---- eager attention: the GQA copy and the mask ----

def eager_graph(layers=1, cache_prefix="past_key_values", softcap=5.0, bad_expand=True, dtype=F32):
    """HF's eager attention per layer as the exporter leaves it, over fixed-size caches:
    softmax(softcap(q @ repeat_kv(k)^T * scale) + hf_mask) @ repeat_kv(v), the repeat's Expand
    shape built for a concat cache (T + 3 slots: wrong once the cache has a fixed length)."""
    pos = var("position_ids", np.int64, ["batch", "seq"])
    hf_mask = var("hf_mask", dtype, ["batch", 1, "seq", T])
    inputs, nodes, outs = [pos, hf_mask], [], []
    for i in range(layers):
        q = var(f"q{i}", dtype, ["batch", HQ, "seq", D])
        k, v = (var(f"{cache_prefix}.{i}.{kv}", dtype, ["batch", HKV, T, D]) for kv in ("key", "value"))
        inputs += [q, k, v]

        def rep(src, tag):
            u, e, r = var(f"u_{tag}"), var(f"e_{tag}"), var(f"r_{tag}")
            shape = [2, HKV, 2, T + 3 if bad_expand else T, D]
            nodes.append(gs.Node("Unsqueeze", f"unsq_{tag}", inputs=[src, i64(f"ax_{tag}", [2])], outputs=[u]))
            nodes.append(gs.Node("Expand", f"exp_{tag}", inputs=[u, i64(f"sh_{tag}", shape)], outputs=[e]))
            nodes.append(gs.Node("Reshape", f"rs_{tag}", inputs=[e, i64(f"sh2_{tag}", [2, HQ, T, D])], outputs=[r]))
            return r

        kr, vr = rep(k, f"k{i}"), rep(v, f"v{i}")
        t = {n: var(f"{n}{i}") for n in ("kt", "s", "sc", "d", "th", "cap", "m", "p")}
        out = var(f"out{i}", dtype)
        c = lambda n, x: gs.Constant(f"{n}{i}", np.array(x, dtype))  # noqa: E731
        nodes += [
            gs.Node("Transpose", attrs={"perm": [0, 1, 3, 2]}, inputs=[kr], outputs=[t["kt"]]),
            gs.Node("MatMul", inputs=[q, t["kt"]], outputs=[t["s"]]),
            gs.Node("Mul", inputs=[t["s"], c("scale", D ** -0.5)], outputs=[t["sc"]]),
            gs.Node("Div", inputs=[t["sc"], c("cap_d", softcap)], outputs=[t["d"]]),
            gs.Node("Tanh", inputs=[t["d"]], outputs=[t["th"]]),
            gs.Node("Mul", inputs=[t["th"], c("cap_m", softcap)], outputs=[t["cap"]]),
            gs.Node("Add", f"add_mask{i}", inputs=[t["cap"], hf_mask], outputs=[t["m"]]),
            gs.Node("Softmax", attrs={"axis": -1}, inputs=[t["m"]], outputs=[t["p"]]),
            gs.Node("MatMul", inputs=[t["p"], vr], outputs=[out]),
        ]
        outs.append(out)
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=outs, opset=24)


def eager_reference(q, k, v, pos, window, softcap=5.0):
    """numpy: the same attention over the cache with the mask from positions."""
    k, v = np.repeat(k, HQ // HKV, axis=1), np.repeat(v, HQ // HKV, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * D ** -0.5
    s = softcap * np.tanh(s / softcap)
    j, p = np.arange(T), pos[:, None, :, None]
    ok = (j <= p) & ((j > p - window) if window else True)
    s = np.where(ok, s, np.finfo(F32).min)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


def eager_feeds(layers=1):
    rng = np.random.default_rng(0)
    feeds = {"position_ids": np.array([[4, 5, 6], [9, 10, 11]]), "hf_mask": np.zeros((2, 1, 3, T), F32)}
    for i in range(layers):
        feeds[f"q{i}"] = rng.standard_normal((2, HQ, 3, D)).astype(F32)
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((2, HKV, T, D)).astype(F32)
    return feeds


def test_fold_repeat_kv_gives_eager_copies_cache_following_shapes():
    feeds = eager_feeds()
    with pytest.raises(Exception):          # the exporter's concat-cache shape: T + 3 slots
        run(eager_graph(), feeds)
    g = get_pass("fold_repeat_kv")(eager_graph(), c := ctx())
    assert c.stats["fold_repeat_kv"] == 2                        # K and V copies kept, shapes fixed
    expand = next(n for n in g.nodes if n.op == "Expand")
    assert list(expand.inputs[1].values) == [1, 1, HQ // HKV, 1, 1]
    reshape = next(n for n in g.nodes if n.op == "Reshape")
    assert list(reshape.inputs[1].values) == [0, HQ, -1, D]
    g = get_pass("attention_mask_from_positions")(g, c)
    got = run(g.toposort(), feeds)[0]
    want = eager_reference(feeds["q0"], feeds["past_key_values.0.key"], feeds["past_key_values.0.value"],
                           feeds["position_ids"], None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fold_repeat_kv_near_miss_not_a_cache():
    g = get_pass("fold_repeat_kv")(eager_graph(cache_prefix="other"), c := ctx())
    assert c.stats["fold_repeat_kv"] == 0
    assert list(next(n for n in g.nodes if n.op == "Expand").inputs[1].values) == [2, HKV, 2, T + 3, D]


def test_eager_attention_gets_per_layer_additive_masks():
    """Two layers, sliding (window 3) then full: each layer's Add gets its own mask, 0 where visible
    and float32's lowest value elsewhere, as HF's eager mask."""
    feeds = eager_feeds(2)
    c = ctx(num_layers=2, layer_types=(S, F), window=3)
    g = get_pass("fold_repeat_kv")(eager_graph(2), c)
    g = get_pass("attention_mask_from_positions")(g, c).toposort()
    assert c.stats["attention_mask_from_positions"] == 2
    check_graph(g)
    masks = {n.name: n.inputs[1].name for n in g.nodes if n.name.startswith("add_mask")}
    assert masks == {"add_mask0": "mask_add_3_1", "add_mask1": "mask_add_None_1"}
    got = run(g, feeds)
    for i, window in enumerate((3, None)):
        want = eager_reference(feeds[f"q{i}"], feeds[f"past_key_values.{i}.key"],
                               feeds[f"past_key_values.{i}.value"], feeds["position_ids"], window)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_eager_mask_in_float16_uses_its_lowest_value():
    c = ctx()
    g = get_pass("attention_mask_from_positions")(eager_graph(dtype=F16), c)
    add = next(n for n in g.nodes if n.name == "add_mask0")
    g.outputs = [add.inputs[1]]
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    mask = run(g, {"position_ids": np.array([[0, 1]]), "past_key_values.0.key": np.zeros((1, HKV, T, D), F16)})[0]
    assert mask.dtype == F16 and mask.min() == np.finfo(F16).min and mask.max() == 0
    assert (mask[0, 0, 1] == 0).sum() == 2                      # position 1 sees slots 0 and 1


def test_eager_mask_near_miss_scores_not_from_a_cache():
    g = get_pass("attention_mask_from_positions")(eager_graph(cache_prefix="other"), c := ctx())
    assert c.stats["attention_mask_from_positions"] == 0
    assert next(n for n in g.nodes if n.name == "add_mask0").inputs[1].name == "hf_mask"


# ---- Attention nodes: one mask per window ----

def attention_layers_graph(k_names=("past_key_values.0.key", "past_key_values.1.key")):
    pos = var("position_ids", np.int64, ["batch", "seq"])
    hf = var("hf_mask", np.bool_, ["batch", 1, "seq", T])
    inputs, nodes, outs = [pos, hf], [], []
    for i, kname in enumerate(k_names):
        q = var(f"q{i}", F32, ["batch", HQ, "seq", D])
        k = var(kname, F32, ["batch", HKV, T, D])
        v = var(f"past_key_values.{i}.value", F32, ["batch", HKV, T, D])
        out = var(f"out{i}", F32)
        inputs += [q, k, v]
        nodes.append(gs.Node("Attention", f"attn{i}", attrs={"is_causal": 0}, inputs=[q, k, v, hf], outputs=[out]))
        outs.append(out)
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=outs, opset=24)


def test_attention_nodes_get_their_layers_window():
    g = get_pass("attention_mask_from_positions")(attention_layers_graph(), ctx(2, (F, S), window=3))
    attn = {n.name: n for n in g.nodes if n.op == "Attention"}
    assert attn["attn0"].inputs[3].name == "mask_causal" and attn["attn1"].inputs[3].name == "mask_causal_window_3"
    g.outputs = [attn["attn0"].inputs[3], attn["attn1"].inputs[3]]
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    full, sliding = run(g, {"position_ids": np.array([[5]]), "past_key_values.0.key": np.zeros((1, HKV, T, D), F32)})
    assert np.flatnonzero(full[0, 0, 0]).tolist() == [0, 1, 2, 3, 4, 5]
    assert np.flatnonzero(sliding[0, 0, 0]).tolist() == [3, 4, 5]


def test_attention_of_unknown_layer_with_differing_windows_is_a_bug():
    g = attention_layers_graph(k_names=("past_key_values.0.key", "q0"))
    with pytest.raises(TrtcInternalError, match="cannot tell which layer attn1"):
        get_pass("attention_mask_from_positions")(g, ctx(2, (F, S), window=3))


# ---- fuse_rotary: partial rotary, rotation in a wider type ----

def rotary_graph(rot=D, x_dtype=F32, cast=False, cos_width=None):
    """x [B, H, S, D]; its first `rot` dims rotate (rotate-half over them), the rest pass through:
    Concat(xr*cos + rotate_half(xr)*sin, x[..., rot:]). cast: x float16 rotated in float32 (both
    products read x through a Cast, as OLMo 2 exports)."""
    pos, x = var("position_ids", np.int64, ["batch", "seq"]), var("x", x_dtype, ["batch", HQ, "seq", D])
    w = cos_width or rot
    inv = gs.Constant("inv", (1.0 / 10000 ** (np.arange(0, w, 2) / w)).astype(F32))
    t = {n: var(n) for n in ("u", "pf", "f", "emb", "cos", "sin", "cu", "su", "xr", "rest", "hi", "lo", "neg", "rh",
                             "xc", "rhc", "a", "b", "r")}
    t["cos"].dtype = t["sin"].dtype = F32
    out = var("out", F32 if cast else x_dtype)
    h = rot // 2
    nodes = [
        gs.Node("Unsqueeze", inputs=[pos, i64("ax2", [2])], outputs=[t["u"]]),
        gs.Node("Cast", attrs={"to": 1}, inputs=[t["u"]], outputs=[t["pf"]]),
        gs.Node("Mul", inputs=[t["pf"], inv], outputs=[t["f"]]),
        gs.Node("Concat", attrs={"axis": -1}, inputs=[t["f"], t["f"]], outputs=[t["emb"]]),
        gs.Node("Cos", inputs=[t["emb"]], outputs=[t["cos"]]),
        gs.Node("Sin", inputs=[t["emb"]], outputs=[t["sin"]]),
        gs.Node("Unsqueeze", inputs=[t["cos"], i64("ax1c", [1])], outputs=[t["cu"]]),
        gs.Node("Unsqueeze", inputs=[t["sin"], i64("ax1s", [1])], outputs=[t["su"]]),
        gs.Node("Slice", inputs=[x, i64("r0", [0]), i64("r1", [rot]), i64("rax", [-1])], outputs=[t["xr"]]),
        gs.Node("Slice", inputs=[x, i64("p0", [rot]), i64("p1", [2 ** 62]), i64("pax", [-1])], outputs=[t["rest"]]),
        gs.Node("Slice", inputs=[t["xr"], i64("s_h", [h]), i64("e_big", [2 ** 62]), i64("ax_a", [-1])],
                outputs=[t["hi"]]),
        gs.Node("Slice", inputs=[t["xr"], i64("s_0", [0]), i64("e_h", [h]), i64("ax_b", [-1])], outputs=[t["lo"]]),
        gs.Node("Neg", inputs=[t["hi"]], outputs=[t["neg"]]),
        gs.Node("Concat", attrs={"axis": -1}, inputs=[t["neg"], t["lo"]], outputs=[t["rh"]]),
    ]
    xr, rh = t["xr"], t["rh"]
    if cast:
        nodes += [gs.Node("Cast", attrs={"to": 1}, inputs=[xr], outputs=[t["xc"]]),
                  gs.Node("Cast", attrs={"to": 1}, inputs=[rh], outputs=[t["rhc"]])]
        xr, rh = t["xc"], t["rhc"]
    nodes += [gs.Node("Mul", inputs=[xr, t["cu"]], outputs=[t["a"]]),
              gs.Node("Mul", inputs=[rh, t["su"]], outputs=[t["b"]]),
              gs.Node("Add", inputs=[t["a"], t["b"]], outputs=[t["r"]])]
    if rot < D:
        rest = t["rest"]
        if cast:
            rest = var("rest_f32")
            nodes.append(gs.Node("Cast", attrs={"to": 1}, inputs=[t["rest"]], outputs=[rest]))
        nodes.append(gs.Node("Concat", attrs={"axis": -1}, inputs=[t["r"], rest], outputs=[out]))
    else:
        nodes.append(gs.Node("Identity", inputs=[t["r"]], outputs=[out]))
    return gs.Graph(nodes=nodes, inputs=[pos, x], outputs=[out], opset=24)


@pytest.mark.parametrize("rot,cast", [(4, False), (D, True), (4, True)])
def test_fuse_rotary_partial_and_widened_match(rot, cast):
    x_dtype = F16 if cast else F32
    feeds = {"position_ids": np.array([[3, 4, 5], [9, 10, 11]]),
             "x": np.random.default_rng(1).standard_normal((2, HQ, 3, D)).astype(x_dtype)}
    before = run(rotary_graph(rot, x_dtype, cast), feeds)[0]
    g = get_pass("fuse_rotary")(rotary_graph(rot, x_dtype, cast), c := ctx()).toposort()
    assert c.stats["fuse_rotary"] == 1 and "Neg" not in ops(g)
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert rope.inputs[0].name == ("xc" if cast else "xr")          # the rotated part, in the type it rotates in
    check_graph(g)
    np.testing.assert_allclose(run(g, feeds)[0], before, rtol=1e-6, atol=1e-6)
    g = get_pass("rotary_cache")(g, c)
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert rope.inputs[1].values.shape == (T, rot // 2)
    np.testing.assert_allclose(run(g, feeds)[0], before, rtol=1e-6, atol=1e-6)


def test_fuse_rotary_near_miss_cos_wider_than_the_rotated_part():
    """Slices split x at 2 but cos/sin are 4 wide: not rotate-half over what the slices cut."""
    g = rotary_graph(rot=4, cos_width=8)
    g.nodes[8].inputs[2] = i64("r1_wide", [8])       # xr = x[..., :8] so the Mul broadcasts against cos
    g = get_pass("fuse_rotary")(g, c := ctx())
    assert c.stats["fuse_rotary"] == 0 and "RotaryEmbedding" not in ops(g)


def test_fuse_rotary_near_miss_one_product_widened():
    """The rotated half cast up, the plain product not: not x*cos + rotate_half(x)*sin of one x."""
    g = rotary_graph(D, F32, cast=True)
    plain = next(n for n in g.nodes if n.op == "Mul" and n.inputs[0].name == "xc")
    plain.inputs[0] = next(n for n in g.nodes if n.op == "Slice" and n.outputs[0].name == "xr").outputs[0]
    g = get_pass("fuse_rotary")(g, c := ctx())
    assert c.stats["fuse_rotary"] == 0
