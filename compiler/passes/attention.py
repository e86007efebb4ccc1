"""Attention passes.

fold_repeat_kv: HF's `repeat_kv` (GQA: copy each KV head num_heads/num_kv_heads times) exports as
`Reshape(Expand(Unsqueeze(kv, axes=[2]), [B, Hkv, n_rep, T, D]), [B, Hq, T, D])` in front of the
Attention node. Attention-23 does GQA itself (TensorRT's IAttention too), so the copy is dropped
and the cache [B, Hkv, T, D] feeds Attention directly: no n_rep-times larger K/V tensors.

attention_mask_from_positions: the exported mask is HF's causal+padding mask computed from the
`attention_mask` input and the concat-cache length. With a fixed-size cache the mask must come
from positions instead: key slot j is visible to a query at position p iff j <= p (and, with a
sliding window W, j > p - W). Bool mask [B, 1, S, cache_len], built once and shared by all
layers. Attention's is_causal would be wrong here: ONNX defines it with upper-left alignment.
"""

from __future__ import annotations

from trtc.artifact import POSITION_IDS, past_name

from . import PassContext, register_pass
from ._match import const_values, graph_input, producer_op


def _repeat_kv_source(t):
    """The [B, Hkv, T, D] tensor under a repeat_kv pattern ending in `t`, or None."""
    reshape = producer_op(t, "Reshape")
    if reshape is None:
        return None
    expand = producer_op(reshape.inputs[0], "Expand")
    if expand is None:
        return None
    unsq = producer_op(expand.inputs[0], "Unsqueeze")
    if unsq is None:
        return None
    axes = unsq.attrs.get("axes")
    if axes is None and len(unsq.inputs) > 1:
        axes = const_values(unsq.inputs[1])
    if axes is None or [int(a) for a in list(axes)] != [2]:
        return None
    return unsq.inputs[0]


@register_pass("fold_repeat_kv")
def fold_repeat_kv(graph, ctx: PassContext):
    n = 0
    for node in graph.nodes:
        if node.op != "Attention":
            continue
        for i in (1, 2):
            src = _repeat_kv_source(node.inputs[i])
            if src is not None:
                node.inputs[i] = src
                n += 1
    ctx.stats["fold_repeat_kv"] = n
    return graph


@register_pass("attention_mask_from_positions")
def attention_mask_from_positions(graph, ctx: PassContext):
    import numpy as np
    import onnx_graphsurgeon as gs

    attn = [n for n in graph.nodes if n.op == "Attention"]
    cache = graph_input(graph, past_name(0, "key"))
    pos = graph_input(graph, POSITION_IDS)
    if not attn or cache is None or pos is None:
        ctx.stats["attention_mask_from_positions"] = 0
        return graph

    def c(name, v):
        return gs.Constant(f"mask_{name}", np.array(v, dtype=np.int64))

    def var(name, dtype):
        return gs.Variable(f"mask_{name}", dtype=dtype)

    nodes = []

    def add(op, inputs, name, dtype, attrs=None):
        out = var(name, dtype)
        nodes.append(gs.Node(op, f"mask_{name}_node", attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    cache_len = add("Shape", [cache], "cache_len", np.int64, {"start": 2, "end": 3})
    cache_len = add("Squeeze", [cache_len], "cache_len_scalar", np.int64)
    keys = add("Range", [c("zero", 0), cache_len, c("one", 1)], "key_slots", np.int64)          # [T]
    keys = add("Unsqueeze", [keys, c("key_axes", [0, 1, 2])], "key_slots_4d", np.int64)        # [1,1,1,T]
    qpos = add("Unsqueeze", [pos, c("query_axes", [1, 3])], "query_pos_4d", np.int64)          # [B,1,S,1]
    mask = add("LessOrEqual", [keys, qpos], "causal", np.bool_)                               # [B,1,S,T]
    if ctx.spec.sliding_window:
        lo = add("Sub", [qpos, c("window", ctx.spec.sliding_window)], "window_start", np.int64)
        inside = add("Greater", [keys, lo], "in_window", np.bool_)
        mask = add("And", [mask, inside], "causal_window", np.bool_)
    graph.nodes.extend(nodes)
    for node in attn:
        if len(node.inputs) >= 4:
            node.inputs[3] = mask
        else:
            node.inputs.append(mask)
        node.attrs["is_causal"] = 0
    ctx.stats["attention_mask_from_positions"] = len(attn)
    return graph
