"""Small helpers for finding patterns in onnx-graphsurgeon graphs."""

from __future__ import annotations

from trtc.artifact import POSITION_IDS


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


def _is_bfloat16(dtype) -> bool:
    import ml_dtypes
    import numpy as np
    import onnx

    if dtype == onnx.TensorProto.BFLOAT16:
        return True
    try:
        return np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)
    except TypeError:
        return False


def onnx_dtype(dtype) -> int:
    """The onnx.TensorProto enum of a graphsurgeon tensor dtype (numpy, ml_dtypes or onnx enum)."""
    import numpy as np
    import onnx

    if isinstance(dtype, int):
        return dtype
    if _is_bfloat16(dtype):
        return onnx.TensorProto.BFLOAT16
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def eval_on_positions(graph, tensors, max_seq_len: int, fallback_dtype) -> list:
    """Values of `tensors` (functions of position_ids alone) for positions 0..max_seq_len-1,
    evaluated once in ONNX Runtime on a copy of the graph. bfloat16 results are read through a
    float32 cast (ORT cannot hand bfloat16 to numpy) and returned as ml_dtypes.bfloat16, exactly."""
    import ml_dtypes
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    sub = graph.copy()
    st = sub.tensors()
    sub.inputs = [st[POSITION_IDS]]
    outs, bf16 = [], []
    for src in tensors:
        t = st[src.name]
        t.dtype = src.dtype if src.dtype is not None else fallback_dtype   # cos/sin type == x type
        if _is_bfloat16(t.dtype):
            f = gs.Variable(f"{t.name}_as_f32", dtype=np.float32)
            sub.nodes.append(gs.Node("Cast", f"{t.name}_as_f32", attrs={"to": onnx.TensorProto.FLOAT},
                                     inputs=[t], outputs=[f]))
            t = f
        outs.append(t)
        bf16.append(_is_bfloat16(st[src.name].dtype))
    sub.outputs = outs
    sub.cleanup(remove_unused_graph_inputs=True).toposort()
    sess = ort.InferenceSession(gs.export_onnx(sub).SerializeToString(), providers=["CPUExecutionProvider"])
    vals = sess.run([t.name for t in outs], {POSITION_IDS: np.arange(max_seq_len, dtype=np.int64)[None]})
    return [v.astype(ml_dtypes.bfloat16) if b else v for v, b in zip(vals, bf16)]
