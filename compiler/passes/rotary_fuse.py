"""fuse_rotary: HF's decomposed rotate-half rotary -> RotaryEmbedding (both pipelines).

In float16 (and whenever it does not fuse), the exporter leaves HF's `apply_rotary_pos_emb` as
elementwise ops:

    out = Add(Mul(x, Unsqueeze(cos, axes=[1])), Mul(Concat(Neg(Slice(x, h:D)), Slice(x, 0:h)), Unsqueeze(sin, [1])))

with x [B, H, S, D], h = D/2, and cos/sin [B, S, D] = cos/sin of Concat(freqs, freqs) computed from
position_ids. This pass rewrites it to `RotaryEmbedding(x, cos[..., :h], sin[..., :h])`
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


def _slice_of(t, d: int):
    """(x, 'low'|'high') if t = Slice(x) over the last axis taking [0, D/2) or [D/2, D)."""
    node = producer_op(t, "Slice")
    if node is None or len(node.inputs) < 4:
        return None
    starts, ends, axes = _ints(node.inputs[1]), _ints(node.inputs[2]), _ints(node.inputs[3])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if None in (starts, ends, axes, steps) or axes not in ([-1], [3]) or steps != [1]:
        return None
    h = d // 2
    if starts == [0] and ends == [h]:
        return node.inputs[0], "low"
    if starts == [h] and ends[0] >= d:
        return node.inputs[0], "high"
    return None


def _rotate_half_of(t, d: int):
    """x if t = Concat(Neg(x[..., h:]), x[..., :h], axis=-1), else None."""
    cat = producer_op(t, "Concat")
    if cat is None or len(cat.inputs) != 2 or int(cat.attrs.get("axis", 0)) not in (-1, 3):
        return None
    neg = producer_op(cat.inputs[0], "Neg")
    if neg is None:
        return None
    hi, lo = _slice_of(neg.inputs[0], d), _slice_of(cat.inputs[1], d)
    if hi is None or lo is None or hi[1] != "high" or lo[1] != "low" or hi[0] is not lo[0]:
        return None
    return hi[0]


def _unsqueezed_1(t):
    """The [B, S, D] tensor under Unsqueeze(., axes=[1]), else None."""
    node = producer_op(t, "Unsqueeze")
    if node is None:
        return None
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = _ints(node.inputs[1])
    return node.inputs[0] if axes is not None and [int(a) for a in axes] == [1] else None


def _match(add, d: int):
    """(add, x, cos [B,S,D], sin [B,S,D]) for a decomposed rotary ending in `add`, else None."""
    muls = [producer_op(t, "Mul") for t in add.inputs]
    if len(muls) != 2 or any(m is None for m in muls):
        return None
    for rot_mul, plain_mul in (muls, muls[::-1]):
        for r_in, s_in in (rot_mul.inputs, rot_mul.inputs[::-1]):
            x = _rotate_half_of(r_in, d)
            if x is None:
                continue
            others = [t for t in plain_mul.inputs if t is not x]
            if len(others) != 1 or len(plain_mul.inputs) != 2:
                return None
            cos, sin = _unsqueezed_1(others[0]), _unsqueezed_1(s_in)
            if cos is None or sin is None:
                return None
            return add, x, cos, sin
    return None


def _halves_equal(graph, tensors, max_seq_len: int, fallback_dtype) -> dict[str, bool]:
    """Evaluate the cos/sin tensors for positions 0..max_seq_len-1; name -> halves equal."""
    import numpy as np

    vals = eval_on_positions(graph, tensors, max_seq_len, fallback_dtype)
    out = {}
    for t, v in zip(tensors, vals):
        h = v.shape[-1] // 2
        out[t.name] = v.ndim == 3 and v.shape[-1] % 2 == 0 and np.array_equal(v[..., :h], v[..., h:])
    return out


@register_pass("fuse_rotary")
def fuse_rotary(graph, ctx: PassContext):
    import numpy as np
    import onnx_graphsurgeon as gs

    d = ctx.spec.head_dim
    found = []
    if graph_input(graph, POSITION_IDS) is not None:
        for node in graph.nodes:
            if node.op == "Add" and len(node.inputs) == 2:
                m = _match(node, d)
                if m is not None and all(graph_inputs_reached(t, graph) == {POSITION_IDS} for t in m[2:]):
                    found.append(m)
    if found:
        ok = _halves_equal(graph, list({t.name: t for m in found for t in m[2:]}.values()), ctx.max_seq_len,
                           found[0][1].dtype)
        found = [m for m in found if ok[m[2].name] and ok[m[3].name]]
    halves: dict[str, object] = {}

    def half(t):
        if t.name not in halves:
            out = gs.Variable(f"{t.name}_half", dtype=t.dtype)
            graph.nodes.append(gs.Node("Slice", f"{t.name}_half", inputs=[
                t, gs.Constant(f"{t.name}_half_starts", np.array([0], np.int64)),
                gs.Constant(f"{t.name}_half_ends", np.array([d // 2], np.int64)),
                gs.Constant(f"{t.name}_half_axes", np.array([-1], np.int64))], outputs=[out]))
            halves[t.name] = out
        return halves[t.name]

    for add, x, cos, sin in found:
        out = add.outputs[0]
        add.outputs = []
        graph.nodes.append(gs.Node("RotaryEmbedding", f"{out.name}_rotary", attrs={"interleaved": 0},
                                   inputs=[x, half(cos), half(sin)], outputs=[out]))
    if found:
        graph.cleanup(remove_unused_graph_inputs=False)
    ctx.stats["fuse_rotary"] = len(found)
    return graph
