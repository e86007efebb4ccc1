"""rms_norm_dtypes: RMSNormalization with X and scale of different types -> X cast to scale's type.

Norms that upcast before normalizing and multiply by a weight in the wider type (OLMo 2's
`(weight * x.float()).to(dtype)`) export in float16 as `RMSNormalization(x f16, Cast(weight) f32)
-> f32`. ONNX allows X and scale to differ, but ONNX Runtime's CPU kernel binds them to one type
and refuses the graph. Casting X up first computes exactly what the model does (x.float()), in
one type: `RMSNormalization(Cast(x, f32), scale f32)`. Nodes whose types agree are left alone.
"""

from __future__ import annotations

from . import PassContext, register_pass
from ._match import onnx_dtype


@register_pass("rms_norm_dtypes")
def rms_norm_dtypes(graph, ctx: PassContext):
    import onnx_graphsurgeon as gs

    n = 0
    for node in list(graph.nodes):
        if node.op != "RMSNormalization" or len(node.inputs) < 2:
            continue
        x, scale = node.inputs[0], node.inputs[1]
        if x.dtype is None or scale.dtype is None or onnx_dtype(x.dtype) == onnx_dtype(scale.dtype):
            continue
        wide = gs.Variable(f"{node.name}_x_as_scale_type", dtype=scale.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Cast", f"{node.name}_x_cast", attrs={"to": onnx_dtype(scale.dtype)},
                                   inputs=[x], outputs=[wide]))
        node.inputs[0] = wide
        n += 1
    ctx.stats["rms_norm_dtypes"] = n
    return graph
