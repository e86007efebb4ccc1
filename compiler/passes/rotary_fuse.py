"""fuse_rotary: HF's decomposed rotate-half rotary -> RotaryEmbedding (both pipelines).

In float16 (and whenever it does not fuse), the exporter leaves HF's `apply_rotary_pos_emb` as
elementwise ops:

    out = Add(Mul(x, Unsqueeze(cos, axes=[1])), Mul(Concat(Neg(Slice(x, h:D)), Slice(x, 0:h)), Unsqueeze(sin, [1])))

with x [B, H, S, 2h], and cos/sin [B, S, 2h] = cos/sin of Concat(freqs, freqs) computed from
position_ids. 2h is the head dim, or less with partial rotary (GPT-NeoX: x is then the Slice of the
head that rotates, and a Concat appends the rest). Where the model rotates in a wider type (OLMo 2:
float32 cos/sin, float16 q), both products read x through the same Cast and x is that Cast's
output. This pass rewrites it to `RotaryEmbedding(x, cos[..., :h], sin[..., :h])`
(interleaved 0), the form rotary_cache turns into position-indexed caches (TensorRT's rotary layer)
and plugin_attention lowers to RopeKvAppend. It only fires when cos/sin depend on position_ids alone and their two halves
are equal for every position 0..max_seq_len-1 (evaluated once in ONNX Runtime): otherwise the
rotation is not rotate-half with duplicated frequencies and is left alone (then plugin_attention
refuses the layer; the native form runs the elementwise ops as exported).
"""

from __future__ import annotations

from trtc.artifact import POSITION_IDS

from . import PassContext, register_pass
from ._match import const_values, eval_on_positions, graph_input, graph_inputs_reached, producer_op


def _ints(t):
    v = const_values(t)
    return None if v is None else [int(x) for x in list(v.reshape(-1))]


def _slice_of(t):
    """(x, start, end) if t = Slice(x) over the last axis with step 1, else None."""
    node = producer_op(t, "Slice")
    if node is None or len(node.inputs) < 4:
        return None
    starts, ends, axes = _ints(node.inputs[1]), _ints(node.inputs[2]), _ints(node.inputs[3])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if None in (starts, ends, axes, steps) or axes not in ([-1], [3]) or steps != [1]:
        return None
    return node.inputs[0], starts[0], ends[0]


def _rotate_half_of(t):
    """(x, h) if t = Concat(Neg(x[..., h:]), x[..., :h], axis=-1), else None. x's last dim must be
    2h for this to be rotate-half; the caller checks that through cos/sin's width."""
    cat = producer_op(t, "Concat")
    if cat is None or len(cat.inputs) != 2 or int(cat.attrs.get("axis", 0)) not in (-1, 3):
        return None
    neg = producer_op(cat.inputs[0], "Neg")
    if neg is None:
        return None
    hi, lo = _slice_of(neg.inputs[0]), _slice_of(cat.inputs[1])
    if hi is None or lo is None or hi[0] is not lo[0]:
        return None
    h = lo[2]
    if lo[1] != 0 or h <= 0 or hi[1] != h or hi[2] < 2 * h:
        return None
    return hi[0], h


def _uncast(t):
    """(source, target type) for t = Cast(source), else (t, None)."""
    node = producer_op(t, "Cast")
    return (node.inputs[0], int(node.attrs["to"])) if node is not None else (t, None)


def _unsqueezed_1(t):
    """The [B, S, D] tensor under Unsqueeze(., axes=[1]), else None."""
    node = producer_op(t, "Unsqueeze")
    if node is None:
        return None
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = _ints(node.inputs[1])
    return node.inputs[0] if axes is not None and [int(a) for a in axes] == [1] else None


def _match(add):
    """(add, x, cos [B,S,2h], sin [B,S,2h], h) for a decomposed rotary ending in `add`, else None.

    x is what the plain product multiplies: the rotated tensor itself, or that tensor cast to a
    wider type when the model rotates in float32 (OLMo 2: `(q * cos) + (rotate_half(q) * sin)` with
    float32 cos/sin and a float16 q); the rotated half must then be cast to the same type."""
    muls = [producer_op(t, "Mul") for t in add.inputs]
    if len(muls) != 2 or any(m is None for m in muls):
        return None
    for rot_mul, plain_mul in (muls, muls[::-1]):
        for r_in, s_in in (rot_mul.inputs, rot_mul.inputs[::-1]):
            inner, to = _uncast(r_in)
            rh = _rotate_half_of(inner)
            if rh is None:
                continue
            src, h = rh
            if len(plain_mul.inputs) != 2:
                return None
            for p_in, c_in in (plain_mul.inputs, plain_mul.inputs[::-1]):
                p_src, p_to = _uncast(p_in) if to is not None else (p_in, None)
                if p_src is src and p_to == to:
                    cos, sin = _unsqueezed_1(c_in), _unsqueezed_1(s_in)
                    if cos is None or sin is None:
                        return None
                    return add, p_in, cos, sin, h
            return None
    return None


def _halves(graph, tensors, max_seq_len: int, fallback_dtype) -> dict[str, int | None]:
    """Evaluate the cos/sin tensors for positions 0..max_seq_len-1; name -> h when the value is
    [1, max_seq_len, 2h] with equal halves (duplicated frequencies), else None."""
    import numpy as np

    vals = eval_on_positions(graph, tensors, max_seq_len, fallback_dtype)
    out = {}
    for t, v in zip(tensors, vals):
        h = v.shape[-1] // 2
        ok = v.ndim == 3 and v.shape[-1] % 2 == 0 and np.array_equal(v[..., :h], v[..., h:])
        out[t.name] = h if ok else None
    return out


@register_pass("fuse_rotary")
def fuse_rotary(graph, ctx: PassContext):
    import numpy as np
    import onnx_graphsurgeon as gs

    found = []
    if graph_input(graph, POSITION_IDS) is not None:
        for node in graph.nodes:
            if node.op == "Add" and len(node.inputs) == 2:
                m = _match(node)
                if m is not None and all(graph_inputs_reached(t, graph) == {POSITION_IDS} for t in m[2:4]):
                    found.append(m)
    if found:
        h_of = _halves(graph, list({t.name: t for m in found for t in m[2:4]}.values()), ctx.max_seq_len,
                       found[0][1].dtype)
        # cos/sin must be [.., 2h] for the h the slices split x at: then x is [.., 2h] (the Mul
        # broadcasts it against cos) and the pattern is rotate-half over all of x.
        found = [m for m in found if h_of[m[2].name] == m[4] and h_of[m[3].name] == m[4]]
    halves: dict[str, object] = {}

    def half(t, h: int):
        if t.name not in halves:
            out = gs.Variable(f"{t.name}_half", dtype=t.dtype)
            graph.nodes.append(gs.Node("Slice", f"{t.name}_half", inputs=[
                t, gs.Constant(f"{t.name}_half_starts", np.array([0], np.int64)),
                gs.Constant(f"{t.name}_half_ends", np.array([h], np.int64)),
                gs.Constant(f"{t.name}_half_axes", np.array([-1], np.int64))], outputs=[out]))
            halves[t.name] = out
        return halves[t.name]

    for add, x, cos, sin, h in found:
        out = add.outputs[0]
        add.outputs = []
        graph.nodes.append(gs.Node("RotaryEmbedding", f"{out.name}_rotary", attrs={"interleaved": 0},
                                   inputs=[x, half(cos, h), half(sin, h)], outputs=[out]))
    if found:
        graph.cleanup(remove_unused_graph_inputs=False)
    ctx.stats["fuse_rotary"] = len(found)
    return graph
