"""Small helpers for finding patterns in onnx-graphsurgeon graphs."""

from __future__ import annotations


def producer(tensor):
    """The node that produces `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def producer_op(tensor, op: str):
    node = producer(tensor)
    return node if node is not None and node.op == op else None


def const_values(tensor):
    """The numpy value of a constant tensor (initializer or Constant node), else None."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return tensor.values
    node = producer(tensor)
    if node is not None and node.op == "Constant":
        return node.attrs["value"].values
    return None


def graph_inputs_reached(tensor, graph) -> set[str]:
    """Names of the graph inputs that `tensor` depends on."""
    inputs = {t.name for t in graph.inputs}
    seen, found, stack = set(), set(), [tensor]
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in inputs:
            found.add(t.name)
        node = producer(t)
        if node is not None:
            stack.extend(node.inputs)
    return found


def graph_input(graph, name: str):
    for t in graph.inputs:
        if t.name == name:
            return t
    return None
