"""The rank graph cut into one slice per decoder layer, so calibration holds one layer at a time.

A node's *unit* is the largest layer index i whose KV-cache input (past_key_values.{i}.*) is among
its ancestors, -1 if none: unit -1 is the embedding, the rotary tables, the masks and layer 0's
first projections; unit i runs from layer i's attention to layer i+1's q/k/v projections (the
residual stream reaches every later node through the attention). Tensors made in one unit and read
by a later one (the residual stream, q/k/v of the next layer, masks) are *carried*: each slice is a
small ONNX graph whose inputs are the carried tensors it reads and whose outputs are the carried
tensors it makes plus the activations calibration observes. Only the slice's own weights are
referenced, so ONNX Runtime loads one layer's weights per session.

This needs no mapping of torch modules to ONNX nodes, works for every export path and for export
dirs without the source model, and calibrates exactly the graph TensorRT compiles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
from onnx import helper

from trtc.errors import TrtcInternalError

_CACHE_LAYER = re.compile(r"^(?:past_key_values|past_kv_pool)\.(\d+)")


@dataclass
class Slice:
    unit: int
    nodes: list                                   # NodeProtos, graph order
    inputs: list[str]                             # carried tensors read here, then graph inputs
    outputs: list[str]                            # carried tensors made here, then observed activations
    carried_out: list[str] = field(default_factory=list)
    observed: list[str] = field(default_factory=list)


def _cache_layer(name: str) -> int:
    m = _CACHE_LAYER.match(name)
    return int(m.group(1)) if m else -1


def node_units(graph: onnx.GraphProto) -> dict[str, int | None]:
    """Unit of every tensor; None for constants (weights and what is computed from weights alone,
    e.g. a transposed tied embedding: recomputed in each slice that reads it, never carried).
    The graph is topologically sorted."""
    unit: dict[str, int | None] = {t.name: None for t in graph.initializer}
    unit.update({i.name: _cache_layer(i.name) for i in graph.input})
    for n in graph.node:
        us = [unit.get(t) for t in n.input if t]
        u = None if all(x is None for x in us) else max(x for x in us if x is not None)
        for t in n.output:
            unit[t] = u
    return unit


def _needed(graph, producer: dict, targets: list[str]) -> set[int]:
    """Indices of the nodes the `targets` depend on (not the lm_head: nothing observed needs it)."""
    keep: set[int] = set()
    todo = [producer[t] for t in targets]
    while todo:
        k = todo.pop()
        if k not in keep:
            keep.add(k)
            todo += [producer[t] for t in graph.node[k].input if t in producer]
    return keep


def slices(graph: onnx.GraphProto, observe: list[str]) -> list[Slice]:
    """One Slice per unit that makes an observed tensor or a tensor a later unit reads, in order."""
    unit = node_units(graph)
    producer = {t: k for k, n in enumerate(graph.node) for t in n.output}
    missing = [t for t in observe if t not in producer]
    if missing:
        raise TrtcInternalError(f"calibration: no node makes {missing[:3]}")
    needed = _needed(graph, producer, observe)
    carried: set[str] = set()
    for k in needed:
        n = graph.node[k]
        u = max((unit[t] for t in n.output if unit[t] is not None), default=None)
        for t in n.input:
            if t in producer and unit[t] is not None and u is not None and unit[t] < u:
                carried.add(t)
    out = []
    for u in sorted({unit[t] for t in carried | set(observe)}):
        made = [t for t in sorted(carried, key=producer.get) if unit[t] == u]
        # observed tensors of this unit, also those carried on (OLMo 2's q/k/v read the residual
        # stream itself, which the next unit reads too)
        seen = [t for t in observe if unit[t] == u]
        extra = [t for t in seen if t not in made]
        nodes = [graph.node[k] for k in sorted(_ancestors(graph, producer, unit, u, made + extra))]
        reads = {t for n in nodes for t in n.input if t}
        ins = [t for t in sorted(carried & reads, key=producer.get) if unit[t] < u]
        ins += [i.name for i in graph.input if i.name in reads]
        out.append(Slice(u, nodes, ins, made + extra, made, seen))
    return out


def _ancestors(graph, producer: dict, unit: dict, u: int, targets: list[str]) -> set[int]:
    """Indices of the nodes of unit u (and the constant-only nodes they read) needed for
    `targets`; earlier units' tensors are the slice's inputs."""
    keep: set[int] = set()
    todo = [producer[t] for t in targets]
    while todo:
        k = todo.pop()
        if k in keep:
            continue
        keep.add(k)
        for t in graph.node[k].input:
            if t in producer and unit[t] in (u, None):
                todo.append(producer[t])
    return keep


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor of `model` (weights not loaded) by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def slice_model(model: onnx.ModelProto, s: Slice, types: dict[str, int]) -> onnx.ModelProto:
    """The slice as a model (initializers still external references into the rank graph's data)."""
    names = {t for n in s.nodes for t in n.input}
    inits = [t for t in model.graph.initializer if t.name in names]
    unknown = [t for t in s.inputs + s.outputs if not types.get(t)]
    if unknown:
        raise TrtcInternalError(f"calibration: no element type for {unknown[:3]} (shape inference)")
    g = helper.make_graph(s.nodes, f"calib_unit_{s.unit}",
                          [helper.make_tensor_value_info(t, types[t], None) for t in s.inputs],
                          [helper.make_tensor_value_info(t, types[t], None) for t in s.outputs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m
