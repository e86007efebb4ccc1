"""Attention passes.

fold_repeat_kv: HF's `repeat_kv` (GQA: copy each KV head num_heads/num_kv_heads times) exports as
`Reshape(Expand(Unsqueeze(kv, axes=[2]), [B, Hkv, n_rep, T, D]), [B, Hq, T, D])` in front of the
Attention node. Attention-23 does GQA itself (TensorRT's IAttention too), so the copy is dropped
and the cache [B, Hkv, T, D] feeds Attention directly: no n_rep-times larger K/V tensors.
In front of decomposed (eager) attention the copy stays, since MatMul needs it, but its two shapes
are computed by the exporter as T = past + seq, the concat cache's length, wrong once the cache
has a fixed length (TensorRT: "ISliceLayer has out of bounds access"). They become constants
that follow the tensor: Expand to [1, 1, n_rep, 1, 1] (broadcast) and Reshape to [0, Hq, -1, D].

attention_mask_from_positions: the exported mask is HF's causal+padding mask computed from the
`attention_mask` input and the concat-cache length. With a fixed-size cache the mask must come
from positions instead: key slot j is visible to a query at position p iff j <= p (and, on a layer
with a sliding window W, j > p - W). Bool mask [B, 1, S, cache_len], built once per distinct window
and shared by the layers that use it (Gemma 2 alternates sliding and full layers; Gemma 3 has five
sliding to one full). Attention's is_causal would be wrong here: ONNX defines it with upper-left
alignment. A layer is known by the cache its keys come from (past_key_values.{i}.key).

The mask goes to two forms of attention:
- `Attention(q, k, v, mask)`: the ONNX op (SDPA exports), mask input 3 replaced by the bool mask.
- decomposed, HF's eager attention, which the exporter leaves as ops: `Softmax(Add(scores, mask))`
  with `scores = f(MatMul(q, Transpose(k)))`, f the scaling and, with soft-capping (Gemma 2),
  `c * Tanh(s / c)`. TensorRT's Attention has no softcap (its ONNX parser rejects Attention with
  softcap != 0: "Setting softcap is not supported in TensorRT Attention"), so soft-capped models stay
  in this form on every backend; TensorRT builds it from MatMul/Tanh/Softmax layers. The mask
  operand is replaced by the additive mask HF uses: 0 where visible, the dtype's lowest value
  elsewhere.
"""

from __future__ import annotations

from trtc.artifact import POSITION_IDS, past_name
from trtc.errors import TrtcInternalError

from . import PassContext, register_pass
from ._match import const_values, graph_input, onnx_dtype, producer, producer_op

# Ops between a layer's cache input and the keys its attention reads: the cache update, GQA's
# repeat_kv, the transpose of eager attention, casts.
_CACHE_PATH_OPS = ("TensorScatter", "Concat", "Reshape", "Expand", "Unsqueeze", "Transpose", "Cast", "Identity")


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
    import numpy as np
    import onnx_graphsurgeon as gs

    n = 0
    for node in graph.nodes:
        if node.op != "Attention":
            continue
        for i in (1, 2):
            src = _repeat_kv_source(node.inputs[i])
            if src is not None:
                node.inputs[i] = src
                n += 1
    spec = ctx.spec
    n_rep = spec.num_heads // spec.num_kv_heads
    for node in graph.nodes:   # the copies eager attention still reads: shapes that follow the cache
        if node.op != "Reshape" or not node.outputs[0].outputs:
            continue
        src = _repeat_kv_source(node.outputs[0])
        if src is None or all(_cache_layer(src, graph, kv, spec.num_layers) is None for kv in ("key", "value")):
            continue
        expand = producer(node.inputs[0])
        tag = node.name
        expand.inputs[1] = gs.Constant(f"{tag}_repeat", np.array([1, 1, n_rep, 1, 1], np.int64))
        node.inputs[1] = gs.Constant(f"{tag}_heads", np.array([0, spec.num_heads, -1, spec.head_dim], np.int64))
        node.attrs.pop("allowzero", None)   # 0 copies the batch dim
        n += 1
    ctx.stats["fold_repeat_kv"] = n
    return graph


def _cache_layer(t, graph, kv: str, num_layers: int) -> int | None:
    """Layer i if `t` is past_key_values.{i}.{kv} seen through _CACHE_PATH_OPS (first inputs)."""
    names = {past_name(i, kv): i for i in range(num_layers)}
    inputs = {x.name for x in graph.inputs}
    for _ in range(16):
        if t.name in names and t.name in inputs:
            return names[t.name]
        node = producer(t)
        if node is None or node.op not in _CACHE_PATH_OPS or not node.inputs:
            return None
        t = node.inputs[0]
    return None


def _scores_layer(t, graph, num_layers: int) -> int | None:
    """Layer i if `t` = f(MatMul(q, keys of layer i)), f a chain of Mul/Div by constants (scale,
    soft-cap), Tanh and Cast; else None."""
    for _ in range(8):
        node = producer(t)
        if node is None:
            return None
        if node.op == "MatMul" and len(node.inputs) == 2:
            return _cache_layer(node.inputs[1], graph, "key", num_layers)
        if node.op in ("Tanh", "Cast"):
            t = node.inputs[0]
        elif node.op in ("Mul", "Div") and len(node.inputs) == 2 and const_values(node.inputs[1]) is not None:
            t = node.inputs[0]
        elif node.op == "Mul" and len(node.inputs) == 2 and const_values(node.inputs[0]) is not None:
            t = node.inputs[1]
        else:
            return None
    return None


def _decomposed_sites(graph, num_layers: int) -> list[tuple[object, int, int]]:
    """(Add node, index of its mask operand, layer) of each eager attention: Softmax(Cast?(Add(scores, mask)))."""
    sites = []
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        add = producer(node.inputs[0])
        if add is not None and add.op == "Cast":
            add = producer(add.inputs[0])
        if add is None or add.op != "Add" or len(add.inputs) != 2:
            continue
        for i in (0, 1):
            layer = _scores_layer(add.inputs[i], graph, num_layers)
            if layer is not None:
                sites.append((add, 1 - i, layer))
                break
    return sites


class _Masks:
    """The masks of a graph, built once each from position_ids and the cache length: bool
    [B, 1, S, T] per window (None: full causal), additive per (window, dtype)."""

    def __init__(self, cache, pos):
        import numpy as np

        self.nodes: list = []
        add, c, i64 = self._add, self._c, np.int64
        cache_len = add("Shape", [cache], "cache_len", i64, {"start": 2, "end": 3})
        cache_len = add("Squeeze", [cache_len], "cache_len_scalar", i64)
        keys = add("Range", [c("zero", 0), cache_len, c("one", 1)], "key_slots", i64)                 # [T]
        self.keys = add("Unsqueeze", [keys, c("key_axes", [0, 1, 2])], "key_slots_4d", i64)          # [1,1,1,T]
        self.qpos = add("Unsqueeze", [pos, c("query_axes", [1, 3])], "query_pos_4d", i64)            # [B,1,S,1]
        self.bools = {None: add("LessOrEqual", [self.keys, self.qpos], "causal", np.bool_)}          # [B,1,S,T]
        self.additives: dict = {}

    @staticmethod
    def _c(name, v, dtype=None):
        import numpy as np
        import onnx_graphsurgeon as gs

        return gs.Constant(f"mask_{name}", np.array(v, dtype=dtype or np.int64))

    def _add(self, op, inputs, name, dtype, attrs=None):
        import onnx_graphsurgeon as gs

        out = gs.Variable(f"mask_{name}", dtype=dtype)
        self.nodes.append(gs.Node(op, f"mask_{name}_node", attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    def bool(self, window: int | None):
        """Slot j visible to position p iff j <= p (and j > p - window)."""
        import numpy as np

        if window not in self.bools:
            lo = self._add("Sub", [self.qpos, self._c(f"window_{window}", window)], f"window_{window}_start", np.int64)
            inside = self._add("Greater", [self.keys, lo], f"in_window_{window}", np.bool_)
            self.bools[window] = self._add("And", [self.bools[None], inside], f"causal_window_{window}", np.bool_)
        return self.bools[window]

    def additive(self, window: int | None, dtype):
        """HF's eager mask: 0 where visible, finfo(dtype).min elsewhere (exact in float32, then cast)."""
        import ml_dtypes
        import numpy as np
        import onnx

        key = (window, onnx_dtype(dtype))
        if key not in self.additives:
            low = float(ml_dtypes.finfo(onnx.helper.tensor_dtype_to_np_dtype(key[1])).min)   # bfloat16 too
            tag, f32 = f"add_{window}_{key[1]}", key[1] == onnx.TensorProto.FLOAT
            f = self._add("Where", [self.bool(window), self._c(f"{tag}_zero", 0.0, np.float32),
                                    self._c(f"{tag}_low", low, np.float32)], tag if f32 else f"{tag}_f32", np.float32)
            self.additives[key] = f if f32 else self._add("Cast", [f], tag, dtype, {"to": key[1]})
        return self.additives[key]


def _window_of(spec, node, layer: int | None) -> int | None:
    if not spec.layer_types:
        return spec.sliding_window
    if layer is None:
        raise TrtcInternalError(f"attention_mask_from_positions: cannot tell which layer {node.name} belongs to "
                                f"(its keys do not come from a past_key_values.{{i}}.key input), and the "
                                f"layers' windows differ")
    return spec.window(layer)


@register_pass("attention_mask_from_positions")
def attention_mask_from_positions(graph, ctx: PassContext):
    spec = ctx.spec
    attn = [n for n in graph.nodes if n.op == "Attention"]
    eager = _decomposed_sites(graph, spec.num_layers)
    cache = graph_input(graph, past_name(0, "key"))
    pos = graph_input(graph, POSITION_IDS)
    if not (attn or eager) or cache is None or pos is None:
        ctx.stats["attention_mask_from_positions"] = 0
        return graph
    masks = _Masks(cache, pos)
    for node in attn:
        mask = masks.bool(_window_of(spec, node, _cache_layer(node.inputs[1], graph, "key", spec.num_layers)))
        if len(node.inputs) >= 4:
            node.inputs[3] = mask
        else:
            node.inputs.append(mask)
        node.attrs["is_causal"] = 0
    for node, i, layer in eager:
        scores, old_mask = node.inputs[1 - i], node.inputs[i]
        dtype = scores.dtype if scores.dtype is not None else old_mask.dtype
        if dtype is None:
            raise TrtcInternalError(f"attention_mask_from_positions: {node.name} has operands of unknown type")
        node.inputs[i] = masks.additive(_window_of(spec, node, layer), dtype)
    graph.nodes.extend(masks.nodes)
    ctx.stats["attention_mask_from_positions"] = len(attn) + len(eager)
    return graph
