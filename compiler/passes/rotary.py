"""rotary_cache: per-token cos/sin computed in the graph -> one precomputed [max_seq, D/2] cache.

The exporter emits `RotaryEmbedding(x, cos, sin)` with cos/sin [B, S, D/2] computed per step from
position_ids (`cos(position * inv_freq) * attention_scaling`, whatever the model's rope type put
into inv_freq and the scaling). This pass evaluates that subgraph once, in ONNX Runtime, for
positions 0..max_seq_len-1 and rewrites each node to
`RotaryEmbedding(x, cos_cache, sin_cache, position_ids)` with caches [max_seq_len, D/2]: the
form TensorRT's IRotaryEmbeddingLayer takes (cache + position ids), no Cos/Sin per step, and the
values computed at full precision before the cast the model itself applies.

Only subgraphs that depend on position_ids alone are rewritten (a cos/sin that depends on the
sequence length, as with dynamic NTK scaling, is left alone: that is the near-miss).
"""

from __future__ import annotations

import hashlib

from trtc.artifact import POSITION_IDS

from . import PassContext, register_pass
from ._match import eval_on_positions, graph_input, graph_inputs_reached


@register_pass("rotary_cache")
def rotary_cache(graph, ctx: PassContext):
    import numpy as np
    import onnx_graphsurgeon as gs

    pos = graph_input(graph, POSITION_IDS)
    targets = []
    for node in graph.nodes:
        if node.op != "RotaryEmbedding" or len(node.inputs) != 3 or pos is None:
            continue
        if all(graph_inputs_reached(t, graph) == {POSITION_IDS} for t in node.inputs[1:3]):
            targets.append(node)
    if not targets:
        ctx.stats["rotary_cache"] = 0
        return graph

    wanted = {t.name: t for n in targets for t in n.inputs[1:3]}
    values = dict(zip(wanted, eval_on_positions(graph, list(wanted.values()), ctx.max_seq_len,
                                                targets[0].inputs[0].dtype)))

    caches: dict[str, gs.Constant] = {}   # content hash -> shared constant

    def cache_for(name: str, kind: str) -> gs.Constant:
        v = values[name]
        if v.ndim != 3 or v.shape[0] != 1 or v.shape[1] != ctx.max_seq_len:
            raise ValueError(f"rotary {kind} {name} evaluated to shape {v.shape}")
        v = np.ascontiguousarray(v[0])     # [max_seq_len, D/2]
        key = hashlib.sha256(v.tobytes()).hexdigest()
        if key not in caches:
            caches[key] = gs.Constant(f"rotary_{kind}_cache_{len(caches)}", v)
        return caches[key]

    for node in targets:
        x, cos, sin = node.inputs
        node.inputs = [x, cache_for(cos.name, "cos"), cache_for(sin.name, "sin"), pos]
    ctx.stats["rotary_cache"] = len(targets)
    return graph
