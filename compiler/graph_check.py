"""Structural graph check, run after every pass in tests (and on the final graph always).

Checks: topological order, no dangling tensors (every node input is produced earlier, is a graph
input or a constant), every graph output is produced, and the LLM ops match what TensorRT's
parser maps to its native layers (input counts, attributes).
"""

from __future__ import annotations

from trtc.errors import TrtcInternalError

# op -> (allowed input counts, required attributes with allowed values or None for any)
LLM_OPS = {
    "Attention": ((3, 4, 5, 6, 7), {"is_causal": (0,)}),
    "TensorScatter": ((3,), {"axis": (-2,), "mode": ("linear",)}),
    "RotaryEmbedding": ((3, 4), {"interleaved": (0, 1)}),
}


def check_graph(graph, after: str = "") -> None:
    import onnx_graphsurgeon as gs

    where = f" after pass {after!r}" if after else ""
    available = {t.name for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name == "" or isinstance(t, gs.Constant):
                continue
            if t.name not in available:
                raise TrtcInternalError(f"graph check{where}: node {node.name} ({node.op}) reads "
                                        f"{t.name}, which no earlier node or graph input produces")
        for t in node.outputs:
            available.add(t.name)
        if node.op in LLM_OPS:
            counts, attrs = LLM_OPS[node.op]
            if len(node.inputs) not in counts:
                raise TrtcInternalError(f"graph check{where}: {node.op} {node.name} has "
                                        f"{len(node.inputs)} inputs; allowed {counts}")
            for key, allowed in attrs.items():
                if key in node.attrs and allowed is not None and node.attrs[key] not in allowed:
                    raise TrtcInternalError(f"graph check{where}: {node.op} {node.name} has "
                                            f"{key}={node.attrs[key]!r}; allowed {allowed}")
    for t in graph.outputs:
        if t.name not in available:
            raise TrtcInternalError(f"graph check{where}: graph output {t.name} is not produced")
