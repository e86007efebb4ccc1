"""kv_cache_scatter: concat-style KV cache -> fixed-size cache updated in place by TensorScatter.

Matches, per layer, `present = Concat(past, new, axis=-2)` with `past` a graph input
`past_key_values.{i}.{key,value}` [B, Hkv, P, D]. Rewrites it to
`present = TensorScatter(cache, new, write_indices, axis=-2, mode=linear)`, where `cache` is the
same graph input now of fixed length [B, Hkv, max_seq_len, D] and write_indices [B] is each
sequence's first new position (position_ids[:, 0]). TensorRT maps this to IKVCacheUpdateLayer
(cache a network input, result a network output, as here); ONNX Runtime runs it as written.
Slots past a sequence's length hold stale values; the attention mask built from positions
(attention_mask_from_positions) keeps them out.
"""

from __future__ import annotations

from trtc.artifact import PAST_PREFIX, POSITION_IDS

from . import PassContext, register_pass
from ._match import graph_input


def _is_past_input(t, graph) -> bool:
    return t.name.startswith(PAST_PREFIX) and graph_input(graph, t.name) is not None


@register_pass("kv_cache_scatter")
def kv_cache_scatter(graph, ctx: PassContext):
    import numpy as np
    import onnx_graphsurgeon as gs

    matches = []
    for node in graph.nodes:
        if node.op != "Concat" or len(node.inputs) != 2:
            continue
        past, new = node.inputs
        if not _is_past_input(past, graph):
            continue
        if node.attrs.get("axis") not in (-2, 2):
            continue
        matches.append(node)
    if not matches:
        ctx.stats["kv_cache_scatter"] = 0
        return graph

    graph.opset = max(graph.opset, 24)   # TensorScatter is opset 24
    for d in graph.import_domains or []:
        if d.domain in ("", "ai.onnx"):
            d.version = max(d.version, 24)
    pos = graph_input(graph, POSITION_IDS)
    write_idx = gs.Variable("kv_write_indices", dtype=np.int64, shape=["batch"])
    graph.nodes.append(gs.Node(
        "Gather", "kv_write_indices_gather", attrs={"axis": 1},
        inputs=[pos, gs.Constant("kv_write_indices_zero", np.array(0, dtype=np.int64))],
        outputs=[write_idx]))
    spec = ctx.spec
    for node in matches:
        past, new = node.inputs
        out = node.outputs[0]
        # TensorRT requires a static cache length (IKVCacheUpdateLayer).
        past.shape = ["batch", spec.num_kv_heads, ctx.max_seq_len, spec.head_dim]
        out.shape = list(past.shape)
        node.op = "TensorScatter"
        node.attrs = {"axis": -2, "mode": "linear"}
        node.inputs = [past, new, write_idx]
    ctx.stats["kv_cache_scatter"] = len(matches)
    return graph
