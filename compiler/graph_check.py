"""Structural graph check, run after every pass in tests (and on the final graph always).

Checks: topological order, no dangling tensors (every node input is produced earlier, is a graph
input or a constant), every graph output is produced, the LLM ops match what TensorRT's
parser maps to its native layers (input counts, attributes), and trtc plugin nodes (domain "trtc")
match their declaration in plugins/schema.py (op name, input/output counts, attributes, the dtypes
and ranks of tensors whose type is known; schema `reference=True`: the semantics, not the kernels'
limits, which the full-TensorRT build checks).
"""

from __future__ import annotations

from trtc.errors import TrtcError, TrtcInternalError

PLUGIN_DOMAIN = "trtc"   # plugins.schema.NAMESPACE (checked in tests)

# op -> (allowed input counts, required attributes with allowed values or None for any)
LLM_OPS = {
    "Attention": ((3, 4, 5, 6, 7), {"is_causal": (0,)}),
    "TensorScatter": ((3,), {"axis": (-2,), "mode": ("linear",)}),
    "RotaryEmbedding": ((3, 4), {"interleaved": (0, 1)}),
}


def _check_plugin_node(node, where: str) -> None:
    import numpy as np

    from trtc.plugins.schema import ACT_DTYPES, PLUGINS, POOL_DTYPES, REFERENCE_EXTRA_DTYPES

    spec = PLUGINS.get(node.op)
    bad = f"graph check{where}: plugin node {node.name} ({node.domain}::{node.op})"
    if spec is None:
        raise TrtcInternalError(f"{bad}: no such plugin; declared: {', '.join(PLUGINS)}")
    if len(node.inputs) != len(spec.inputs) or len(node.outputs) != len(spec.outputs):
        raise TrtcInternalError(f"{bad}: {len(node.inputs)} inputs / {len(node.outputs)} outputs; declared "
                                f"{len(spec.inputs)} / {len(spec.outputs)}")
    declared = {a.name for a in spec.attrs}
    trt_attrs = {"plugin_namespace": spec.namespace, "plugin_version": spec.version, "aot": None}
    unknown = set(node.attrs) - declared - set(trt_attrs)
    if unknown:
        raise TrtcInternalError(f"{bad}: unknown attributes {sorted(unknown)}")
    for k, want in trt_attrs.items():
        if want is not None and k in node.attrs and node.attrs[k] != want:
            raise TrtcInternalError(f"{bad}: {k}={node.attrs[k]!r}, expected {want!r}")
    try:
        spec.attr_values(reference=True, **{k: v for k, v in node.attrs.items() if k in declared})
    except TrtcError as e:
        raise TrtcInternalError(f"{bad}: {e}") from e
    for ts, t in list(zip(spec.inputs, node.inputs)) + list(zip(spec.outputs, node.outputs)):
        if t.dtype is not None:
            try:
                name = np.dtype(t.dtype).name
            except TypeError:
                name = None
            extra = REFERENCE_EXTRA_DTYPES if ts.dtypes in (ACT_DTYPES, POOL_DTYPES) else ()
            if name is not None and name not in ts.dtypes + extra:
                raise TrtcInternalError(f"{bad}: {ts.name} ({t.name}) has dtype {name}; declared {ts.dtypes}")
        if t.shape is not None and len(t.shape) != len(ts.shape):
            raise TrtcInternalError(f"{bad}: {ts.name} ({t.name}) has rank {len(t.shape)}; declared {ts.shape}")


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
        if node.domain == PLUGIN_DOMAIN:
            _check_plugin_node(node, where)
        elif node.op in LLM_OPS:
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
