"""Stage 3c, shard: one rank graph (after the passes and any quantization) -> tp rank graphs.

Megatron-style tensor parallelism, decided per layer from the graph itself:
  q, k, v, gate, up   column-parallel: rank r keeps its heads' / its intermediate slice's output
                      columns of W [K, N] (and of the bias, scales and correction terms of N)
  o, down             row-parallel: rank r keeps the input rows of its heads / intermediate slice,
                      then y = DistCollective(all_reduce, sum) of the partial outputs (after the
                      sum of every quantization path: main GEMM + outliers + low rank + int4 offset)
  norms, embedding, lm_head, rotary caches, masks: replicated (lm_head: README says why)
GQA: up to num_kv_heads ranks split the KV heads; beyond, tp % num_kv_heads == 0 and rank r keeps
KV head r // (tp / num_kv_heads), the one its query heads read (KV heads replicated).

Each rank graph is written with only its own weights: slices are read from the source data file
one tensor at a time (np.memmap) and appended to the rank's data file; replicated tensors are
copied the same way. Peak memory is about one tensor, whatever the model size.

Rank graphs carry the build fingerprint in their metadata_props (artifact.GRAPH_FINGERPRINT, with
their rank and world size); the runtime refuses rank files whose stamp differs from the dir's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trtc import artifact as art
from trtc.artifact import kv_heads_per_rank
from trtc.errors import TrtcError, TrtcInternalError
from trtc.spec import ModelSpec

COLLECTIVE = "DistCollective"          # default ONNX domain: TensorRT's parser -> IDistCollectiveLayer


def all_reduce_attrs(tp: int) -> dict:
    """Attributes of a sum all-reduce over all `tp` ranks (root -1: none; group_size 0: every rank)."""
    return {"collective_operation": "all_reduce", "reduce_op": "sum", "root": -1, "group_size": 0, "nb_rank": tp}


# --- which tp sizes a model takes ---------------------------------------------------------------

def _tp_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why `tp` cannot split this model, or None."""
    if spec.num_heads % tp:
        return f"the {spec.num_heads} query heads are not divisible by {tp}"
    if spec.intermediate_size % tp:
        return f"the intermediate size {spec.intermediate_size} is not divisible by {tp}"
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        return (f"the {spec.num_kv_heads} KV heads can neither be split {tp} ways nor replicated "
                f"({tp} is not a multiple of {spec.num_kv_heads})")
    return None


def valid_tp_sizes(spec: ModelSpec) -> list[int]:
    return [t for t in range(1, spec.num_heads + 1) if _tp_problem(spec, t) is None]


def check_tp(spec: ModelSpec, tp: int, algo: str = "none", group_size: int = 0, attention: str = "native") -> None:
    """TrtcError naming the valid sizes when `tp` cannot split this model (with its quantization
    mode, int4 group size and attention lowering); cheap: run before any export work."""
    check_tp_attention(tp, attention)
    if tp == 1:
        return
    if getattr(spec, "num_experts", 0):     # a field of newer specs (mixture of experts)
        raise TrtcError(f"--tp-size {tp}: tensor parallelism of mixture-of-experts MLPs is not implemented; "
                        f"use --tp-size 1")
    if getattr(spec, "fused_projections", False):
        raise TrtcError(f"--tp-size {tp}: {spec.family}'s fused qkv_proj / gate_up_proj weights are not split by "
                        f"trtc's sharding yet (it splits separate q, k, v, gate and up linears); use --tp-size 1")
    why = _tp_problem(spec, tp)
    if why:
        valid = ", ".join(map(str, valid_tp_sizes(spec)))
        raise TrtcError(f"--tp-size {tp} cannot split {spec.architecture}: {why}; valid tp sizes for this model: "
                        f"{valid}")
    _check_tp_blocks(spec, tp, algo, group_size)


def check_tp_attention(tp: int, attention: str) -> None:
    """What needs no model: tp at least 1, and the attention lowering sharding supports."""
    if tp < 1:
        raise TrtcError(f"--tp-size {tp} must be at least 1")
    if attention == "plugin" and tp > 1:
        raise TrtcError(f"--attention plugin with --tp-size {tp} is not supported: trtc splits the native graph's "
                        f"Attention/RotaryEmbedding/TensorScatter by head, while trtc's plugins, their paged KV cache "
                        f"and their reference backend run one rank; use --attention native for tensor parallelism")


def check_tp_early(model: str | None, tp: int | None, attention: str | None) -> None:
    """check_tp on what can be read before loading anything (build and export call it first, so a
    bad --tp-size is the only line printed)."""
    if tp is None or tp == 1:
        return
    check_tp_attention(tp, attention or "native")
    spec = local_spec(model)
    if spec is not None and not (model is not None and (Path(model) / art.EXPORT_CONFIG).is_file()):
        check_tp(spec, tp, attention=attention or "native")


def local_spec(model: str | None) -> ModelSpec | None:
    """The model's spec when it can be read without preparing or loading weights (an export dir, a
    Hugging Face dir, a bundled model already prepared in the cache); else None."""
    from .families import adapter_for_config
    from .load import BUNDLED, DEFAULT_MODEL, cache_dir, read_hf_config

    name = model or DEFAULT_MODEL
    d = cache_dir() / "models" / name if name in BUNDLED else Path(name).expanduser()
    if (d / art.EXPORT_CONFIG).is_file():
        return art.read_export_config(d).pretrained_config
    if not (d / "config.json").is_file():
        return None
    cfg = read_hf_config(d)
    return adapter_for_config(cfg).spec_from_config(cfg)


def _check_tp_blocks(spec: ModelSpec, tp: int, algo: str, group_size: int) -> None:
    """Blockwise scales run along a linear's input rows: a row-parallel shard must hold whole blocks."""
    block = group_size if algo.startswith("int4") else 16 if algo == "nvfp4" else 0
    if not block:
        return
    rows = {"o_proj": spec.num_heads * spec.head_dim // tp, "down_proj": spec.intermediate_size // tp}
    for name, n in rows.items():
        if n % block:
            g = block
            while g > 1 and any(v % g for v in rows.values()):
                g //= 2
            what = f"--group-size {block}" if algo.startswith("int4") else "nvfp4's 16-row blocks"
            fix = (f"use --group-size {g}" if algo.startswith("int4") and g >= 16
                   else "use another --tp-size or --quant mode")
            raise TrtcError(f"--quant {algo} with --tp-size {tp}: each rank's {name} holds {n} input rows, which "
                            f"{what} do not divide (a block of scales would straddle two ranks); {fix}")


def tp_for_export(have: int, requested: int | None, export_dir) -> int:
    """The ranks to build from an export dir of `have` ranks: its own, or more from a one-rank export."""
    if requested is None or requested == have:
        return have
    if have > 1:
        raise TrtcError(f"--tp-size {requested} differs from the export dir's {have} ({export_dir} holds {have} "
                        f"rank graphs); re-export with --tp-size {requested}, or drop --tp-size")
    return requested


@dataclass(frozen=True)
class Layout:
    """Which heads / columns each rank keeps."""

    tp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def of(cls, spec: ModelSpec, tp: int) -> "Layout":
        return cls(tp, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size)

    @property
    def q_heads(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads(self) -> int:
        return kv_heads_per_rank(self.num_kv_heads, self.tp)

    def q_cols(self, rank: int) -> tuple[int, int]:
        """[start, stop) of rank's query heads' columns in q's output (and o's input rows)."""
        n = self.q_heads * self.head_dim
        return rank * n, (rank + 1) * n

    def kv_cols(self, rank: int) -> tuple[int, int]:
        """Columns of the KV heads rank's query heads read, in k's / v's output."""
        first = rank * self.kv_heads if self.tp <= self.num_kv_heads else rank // (self.tp // self.num_kv_heads)
        return first * self.head_dim, (first + self.kv_heads) * self.head_dim

    def ffn_cols(self, rank: int) -> tuple[int, int]:
        n = self.intermediate_size // self.tp
        return rank * n, (rank + 1) * n


# --- finding each layer's linears ---------------------------------------------------------------

@dataclass
class Linear:
    """One linear layer in the graph: y = x @ W (+ quantization correction terms) (+ bias)."""

    main: object                # the MatMul of the main GEMM: inputs[1] is W (a constant, or DequantizeLinear of one)
    out: object                 # y: after the correction terms, before the bias
    terms: list = field(default_factory=list)   # MatMuls whose outputs are added to the main GEMM's
    bias: object | None = None  # Add(y, bias constant) node


@dataclass
class Layer:
    attention: object
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    o: Linear | None = None
    gate: Linear | None = None
    up: Linear | None = None
    down: Linear | None = None
    rotary_q: list = field(default_factory=list)   # RotaryEmbedding nodes on the q / k paths
    rotary_k: list = field(default_factory=list)
    reshapes: list = field(default_factory=list)   # (Reshape node, heads before sharding, what): head splits/merges


class _NoMatch(Exception):
    pass


def _producer(t):
    return t.inputs[0] if len(t.inputs) == 1 else None


def _is_const(t) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


def _has_weight(node) -> bool:
    """A MatMul whose right operand is a constant matrix, or a DequantizeLinear of one."""
    if node is None or node.op != "MatMul":
        return False
    w = node.inputs[1]
    if _is_const(w):
        return len(w.shape) == 2
    p = _producer(w)
    return p is not None and p.op == "DequantizeLinear" and _is_const(p.inputs[0]) and len(p.inputs[0].shape) == 2


def _linear_ending_at(t, what: str) -> Linear:
    """The linear whose output (bias included) is `t`: Add(y, bias)? <- Add(acc, term)* <- MatMul."""
    bias = None
    node = _producer(t)
    if node is not None and node.op == "Add" and sum(_is_const(i) for i in node.inputs) == 1:
        bias = node
        t = next(i for i in node.inputs if not _is_const(i))
    y, terms = t, []
    node = _producer(t)
    while node is not None and node.op == "Add":
        term = _producer(node.inputs[1])
        if term is None or not _has_weight(term):
            raise _NoMatch(f"{what}: {node.name} adds {node.inputs[1].name}, not a correction term of a linear")
        terms.append(term)
        t = node.inputs[0]
        node = _producer(t)
    if not _has_weight(node):
        raise _NoMatch(f"{what}: {t.name} is not produced by a MatMul with a constant weight")
    return Linear(node, y, terms, bias)


_HEAD_LOCAL = ("RotaryEmbedding", "Transpose", "Reshape", "RMSNormalization", "QuantizeLinear",
               "DequantizeLinear")


def _walk_to_linear(t, layer: Layer, path: str, head_dim: int) -> Linear:
    """Back from an attention input through head-local ops (cache write, rotary, q/k norm, KV
    quantization, head split) to the linear that made it."""
    while True:
        node = _producer(t)
        if node is None:
            raise _NoMatch(f"{path}: {t.name} is not computed from a linear")
        if node.op == "TensorScatter":
            t = node.inputs[1]
            continue
        if node.op not in _HEAD_LOCAL:
            return _linear_ending_at(t, path)
        if node.op == "RotaryEmbedding":
            (layer.rotary_q if path == "q" else layer.rotary_k).append(node)
        elif node.op == "Reshape":
            layer.reshapes.append((node, path))
        elif node.op == "RMSNormalization":
            w = node.inputs[1]
            if not _is_const(w) or tuple(w.shape) != (head_dim,):
                raise _NoMatch(f"{path}: {node.name} normalizes over {tuple(getattr(w, 'shape', ()))}, not one "
                               f"head ({head_dim}): a norm across heads cannot be split by head")
        t = node.inputs[0]


def _single_consumer(t, ops: tuple[str, ...]):
    c = list(t.outputs)
    return c[0] if len(c) == 1 and c[0].op in ops else None


def _row_linear_from(x, what: str) -> Linear:
    """The linear that reads activation `x` (its input rows get split): x may pass through the
    quantizer's per-channel prelude (AWQ / inlier-mask Mul by a constant, FP8 Q/DQ) first; beside the
    main GEMM, the prelude feeds the correction terms' inputs (outlier Gather, int4 group sums,
    low-rank first factor)."""
    prelude, frontier = [x], [x]
    while frontier:
        t = frontier.pop()
        for n in t.outputs:
            if (n.op == "Mul" and any(_is_const(i) for i in n.inputs)) or \
                    (n.op in ("QuantizeLinear", "DequantizeLinear") and n.inputs[0] is t):
                prelude.append(n.outputs[0])
                frontier.append(n.outputs[0])
    readers = [n for t in prelude for n in t.outputs if n.op == "MatMul" and n.inputs[0] is t and _has_weight(n)]
    mains = [n for n in readers if not any(c.op == "MatMul" for c in n.outputs[0].outputs)]
    if len(mains) != 1:
        raise _NoMatch(f"{what}: {len(mains)} linears read {x.name}, expected one")
    main, t, terms = mains[0], mains[0].outputs[0], []
    while True:
        add = _single_consumer(t, ("Add",))
        if add is None or add.inputs[0] is not t:
            break
        term = _producer(add.inputs[1])
        feeder = _producer(term.inputs[0]) if term is not None and term.op == "MatMul" else None
        if feeder is None or not any(feeder.inputs[0] is p for p in prelude):
            break            # not a correction term (the residual add)
        terms.append(term)
        t = add.outputs[0]
    bias = _single_consumer(t, ("Add",))
    bias = bias if bias is not None and sum(_is_const(i) for i in bias.inputs) == 1 else None
    return Linear(main, t, terms, bias)


def _mlp_of(residual_in) -> tuple[Linear, Linear, Linear]:
    """gate, up, down of the SwiGLU MLP that reads the post-attention norm of `residual_in`:
    down(silu(gate(x)) * up(x)), silu(g) = g * sigmoid(g)."""
    norm = next((n for n in residual_in.outputs if n.op == "RMSNormalization"), None)
    if norm is None:
        raise _NoMatch(f"{residual_in.name} feeds no RMSNormalization (the MLP's norm)")
    for sig in _descendants(norm.outputs[0], "Sigmoid", depth=12):
        g = sig.inputs[0]
        silu = next((n for n in sig.outputs[0].outputs if n.op == "Mul" and g in n.inputs), None)
        act = _single_consumer(silu.outputs[0], ("Mul",)) if silu is not None else None
        if act is None:
            continue
        up_out = next(i for i in act.inputs if i is not silu.outputs[0])
        gate, up = _linear_ending_at(g, "gate"), _linear_ending_at(up_out, "up")
        return gate, up, _row_linear_from(act.outputs[0], "down")
    raise _NoMatch(f"no SwiGLU MLP after {norm.name} (gate * sigmoid(gate) * up)")


def _descendants(t, op: str, depth: int) -> list:
    found, seen, frontier = [], set(), [(t, 0)]
    while frontier:
        t, d = frontier.pop(0)
        for n in t.outputs:
            if id(n) in seen or d >= depth:
                continue
            seen.add(id(n))
            if n.op == op:
                found.append(n)
            frontier += [(o, d + 1) for o in n.outputs]
    return found


def find_layers(graph, spec: ModelSpec) -> list[Layer]:
    """Every decoder layer's linears, found from its Attention node. TrtcError naming the layer and
    what did not match (e.g. a plugin-form or unknown graph)."""
    attns = [n for n in graph.nodes if n.op == "Attention"]
    if len(attns) != spec.num_layers:
        raise TrtcError(f"cannot shard this graph: it has {len(attns)} Attention nodes for {spec.num_layers} layers "
                        f"(plugin-form or unknown graphs are not sharded); use --tp-size 1")
    layers = []
    for i, a in enumerate(attns):
        try:
            layer = Layer(a)
            layer.q = _walk_to_linear(a.inputs[0], layer, "q", spec.head_dim)
            layer.k = _walk_to_linear(a.inputs[1], layer, "k", spec.head_dim)
            layer.v = _walk_to_linear(a.inputs[2], layer, "v", spec.head_dim)
            t = a.outputs[0]
            while (n := _single_consumer(t, ("Transpose", "Reshape"))) is not None:
                if n.op == "Reshape":
                    layer.reshapes.append((n, "o"))
                t = n.outputs[0]
            layer.o = _row_linear_from(t, "o")
            residual = _single_consumer(layer.o.out if layer.o.bias is None else layer.o.bias.outputs[0], ("Add",))
            if residual is None:
                raise _NoMatch(f"o: {layer.o.out.name} is not added to the residual stream")
            layer.gate, layer.up, layer.down = _mlp_of(residual.outputs[0])
        except _NoMatch as e:
            raise TrtcError(f"cannot shard layer {i} ({a.name}) for tensor parallelism: {e}; use --tp-size 1") from None
        layers.append(layer)
    return layers


# --- reading source tensors, writing rank tensors -----------------------------------------------

_FOUR_BIT = {"INT4", "UINT4", "FLOAT4E2M1"}
_ALIGN = 64          # byte alignment of each tensor in a rank's data file
EXTERNAL_BYTES = 1024   # tensors this large go to the data file (as the quantizer's save does)


def _bits(data_type: int) -> int:
    import onnx

    if onnx.TensorProto.DataType.Name(data_type) in _FOUR_BIT:
        return 4
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8


class _Weights:
    """Rank r's data file, written tensor by tensor; source tensors read from their external data
    file through np.memmap (only the bytes asked for are read)."""

    def __init__(self, src_dir: Path, out: Path):
        self.src_dir, self.path = src_dir, out
        self.f = open(out, "wb")
        self._maps: dict[str, object] = {}
        self._made: dict[tuple, object] = {}      # (source name, axis, selection) -> the sliced constant
        self.written: set[str] = set()            # tensors whose bytes are in this rank's file (the source
                                                  # data file may have the same name: rank0.onnx.data)

    def close(self) -> None:
        self.f.close()

    def _map(self, location: str):
        import numpy as np

        if location not in self._maps:
            self._maps[location] = np.memmap(self.src_dir / location, dtype=np.uint8, mode="r")
        return self._maps[location]

    def raw(self, t):
        """The bytes of TensorProto t, as a uint8 array (a view into the memory-mapped file when external)."""
        import numpy as np
        from onnx import numpy_helper
        from onnx.external_data_helper import uses_external_data

        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            off, length = int(info.get("offset", 0)), int(info["length"])
            return self._map(info["location"])[off:off + length]
        if t.raw_data:
            return np.frombuffer(t.raw_data, dtype=np.uint8)
        return np.frombuffer(numpy_helper.to_array(t).tobytes(), dtype=np.uint8)

    def append(self, data) -> tuple[int, int]:
        """Write bytes (an array or bytes) at the next aligned offset; (offset, length)."""
        pad = -self.f.tell() % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
        off = self.f.tell()
        mv = memoryview(data).cast("B")
        for i in range(0, len(mv), 1 << 26):          # 64 MiB at a time: no second copy of a large tensor
            self.f.write(mv[i:i + (1 << 26)])
        return off, len(mv)

    def external(self, t) -> None:
        """Point TensorProto t at a copy of its bytes in this rank's data file."""
        from onnx import TensorProto

        off, length = self.append(self.raw(t))
        self.written.add(t.name)
        del t.external_data[:]
        for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")


def _proto(c):
    """The TensorProto behind a constant (an onnx-graphsurgeon Constant)."""
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(c._values, LazyValues):
        return c._values.tensor
    import numpy as np

    return numpy_helper.from_array(np.asarray(c.values), c.name)


def _take(raw, dims: list[int], bits: int, axis: int, sel, what: str):
    """Bytes of a 1-D/2-D tensor restricted along `axis` to `sel`: a (start, stop) range, or (axis 0
    of a 2-D tensor) an index array. 4-bit tensors are packed two per byte, row-major."""
    import numpy as np

    rows, cols = (1, dims[0]) if len(dims) == 1 else dims
    axis = 1 if len(dims) == 1 else axis
    if len(dims) not in (1, 2) or (rows * cols * bits) % 8 or (cols * bits) % 8:
        raise TrtcInternalError(f"shard: cannot slice {what} of shape {dims} ({bits}-bit)")
    m = raw.reshape(rows, cols * bits // 8)
    if axis == 0:
        return np.ascontiguousarray(m[np.asarray(sel)] if not isinstance(sel, tuple) else m[sel[0]:sel[1]])
    a, b = sel
    if (a * bits) % 8 or (b * bits) % 8:
        raise TrtcError(f"cannot shard {what}: columns {a}..{b} split a byte of packed {bits}-bit values; "
                        f"use another --tp-size")
    return np.ascontiguousarray(m[:, a * bits // 8:b * bits // 8])


def _sliced(w: _Weights, c, axis: int, sel):
    """A new constant: `c` restricted along `axis` to `sel`, external (in the rank's data file) when
    `c` was. The same slice of the same constant is made once."""
    import numpy as np
    import onnx_graphsurgeon as gs
    from onnx import TensorProto
    from onnx.external_data_helper import uses_external_data
    from onnx_graphsurgeon.ir.tensor import LazyValues

    key = (c.name, axis, tuple(sel) if isinstance(sel, tuple) else tuple(np.asarray(sel).tolist()))
    if key in w._made:
        return w._made[key]
    src = _proto(c)
    dims = list(src.dims)
    data = _take(w.raw(src), dims, _bits(src.data_type), axis, sel, c.name)
    n = (sel[1] - sel[0]) if isinstance(sel, tuple) else len(sel)
    new_dims = [n] if len(dims) == 1 else ([n, dims[1]] if axis == 0 else [dims[0], n])
    t = TensorProto()
    t.name = f"{c.name}_tp{len(w._made)}"
    t.data_type, t.dims[:] = src.data_type, new_dims
    if uses_external_data(src) or data.nbytes >= EXTERNAL_BYTES:
        off, length = w.append(data)
        w.written.add(t.name)
        for k, v in (("location", w.path.name), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL
    else:
        t.raw_data = data.tobytes()
    out = gs.Constant(t.name, LazyValues(t))
    w._made[key] = out
    return out


def _retarget(node, i: int, new) -> None:
    node.inputs[i] = new


# --- the edits of one rank ----------------------------------------------------------------------

def _slice_weight(w: _Weights, mm, axis: int, sel, what: str) -> None:
    """Restrict MatMul mm's weight W [K, N] along axis (0: input rows, 1: output columns):
    a constant, or DequantizeLinear(values, scales[, zero points]) with per-tensor, per-column
    (axis 1) or blockwise (block_size rows along axis 0) scales, scales themselves possibly a
    DequantizeLinear (nvfp4's two levels)."""
    wt = mm.inputs[1]
    if _is_const(wt):
        _retarget(mm, 1, _sliced(w, wt, axis, sel))
        return
    dq = _producer(wt)
    _retarget(dq, 0, _sliced(w, dq.inputs[0], axis, sel))
    qaxis = int(dq.attrs.get("axis", 1)) % 2
    block = int(dq.attrs.get("block_size", 0) or 0)
    for i in range(1, len(dq.inputs)):
        _slice_scales(w, dq, i, axis, sel, qaxis, block, what)


def _slice_scales(w: _Weights, dq, i: int, axis: int, sel, qaxis: int, block: int, what: str) -> None:
    s = dq.inputs[i]
    shape = tuple(s.shape) if s.shape is not None else ()
    if len(shape) == 0 or (len(shape) == 1 and shape[0] == 1 and not block):
        return                                         # per tensor: the same on every rank
    if block:
        if axis == qaxis:
            if not isinstance(sel, tuple) or sel[0] % block or sel[1] % block:
                raise TrtcError(f"cannot shard {what}: rows {sel[0]}..{sel[1]} of a rank split a block of "
                                f"{block} rows that share a scale; use a --group-size dividing "
                                f"{sel[1] - sel[0]}, or another --tp-size")
            sel = (sel[0] // block, sel[1] // block)
    elif axis != qaxis:
        return                                         # one scale per column; the rows are split
    else:
        axis = 0                                       # 1-D scales along the split axis
    inner = _producer(s)
    if inner is not None and inner.op == "DequantizeLinear":   # nvfp4: fp8 block scales x a global scale
        _retarget(inner, 0, _sliced(w, inner.inputs[0], axis, sel))
    else:
        _retarget(dq, i, _sliced(w, s, axis, sel))


def _column(w: _Weights, lin: Linear, cols: tuple[int, int], what: str) -> None:
    """Keep output columns [a, b) of the linear: its weight, correction terms and bias."""
    _slice_weight(w, lin.main, 1, cols, what)
    for term in lin.terms:
        _slice_weight(w, term, 1, cols, what)
    if lin.bias is not None:
        i = next(j for j, t in enumerate(lin.bias.inputs) if _is_const(t))
        _retarget(lin.bias, i, _sliced(w, lin.bias.inputs[i], 0, cols))


def _row(w: _Weights, graph, lin: Linear, rows: tuple[int, int], tp: int, what: str) -> None:
    """Keep input rows [a, b) (the rank's part of the activation), then all-reduce the sum of every
    path: main GEMM and correction terms."""
    import numpy as np
    import onnx_graphsurgeon as gs

    a, b = rows
    _slice_weight(w, lin.main, 0, rows, what)
    t = lin.main.inputs[0]
    while (p := _producer(t)) is not None and p.op in ("Mul", "QuantizeLinear", "DequantizeLinear"):
        if p.op == "Mul":       # per input channel [K]: AWQ's 1/s, the FP8 inlier mask
            i = next((j for j, x in enumerate(p.inputs) if _is_const(x)), None)
            if i is None:
                break
            _retarget(p, i, _sliced(w, p.inputs[i], 0, rows))
            t = p.inputs[1 - i]
        else:
            t = p.inputs[0]
    for term in lin.terms:
        feeder = _producer(term.inputs[0])
        if feeder.op == "Gather":            # outlier channels: the rank's own, renumbered
            idx = np.asarray(feeder.inputs[1].values).astype(np.int64)
            mine = (idx >= a) & (idx < b)
            add = next(iter(term.outputs[0].outputs))
            if not mine.any():               # none here: the term is zero on this rank
                add.op, add.inputs = "Identity", [add.inputs[0]]
                continue
            _retarget(feeder, 1, gs.Constant(f"{feeder.inputs[1].name}_tp_{a}", idx[mine] - a))
            _slice_weight(w, term, 0, np.flatnonzero(mine), what)
        elif _is_const(feeder.inputs[1]):    # int4 offset: (x @ E) @ off, E [K, K/G] the group indicator
            e = feeder.inputs[1]
            g = e.shape[0] // e.shape[1]
            values = np.asarray(e.values)[a:b, a // g:b // g]
            _retarget(feeder, 1, gs.Constant(f"{e.name}_tp_{a}", np.ascontiguousarray(values)))
            _slice_weight(w, term, 0, (a // g, b // g), what)
        else:                                # low rank: (x @ A) @ B, A [K, r] split by rows
            _slice_weight(w, feeder, 0, rows, what)
    _all_reduce(graph, lin.out, tp)


def _all_reduce(graph, y, tp: int) -> None:
    """Every reader of y reads the sum of y over the ranks instead."""
    import onnx_graphsurgeon as gs

    out = gs.Variable(f"{y.name}_allreduce", dtype=y.dtype)
    for node in list(y.outputs):
        for i, t in enumerate(node.inputs):
            if t is y:
                node.inputs[i] = out
    graph.nodes.append(gs.Node(COLLECTIVE, f"{y.name}_allreduce", attrs=all_reduce_attrs(tp), inputs=[y],
                               outputs=[out]))


def _fix_reshape(node, old: int, new: int, head_dim: int) -> None:
    """A head split [B, S, H, D] or merge [B, S, H*D] with H written as a constant: the rank's H.
    (-1 and 0 entries need nothing; the exporter writes -1.)"""
    import numpy as np
    import onnx_graphsurgeon as gs

    shape = node.inputs[1]
    pieces = [shape] if _is_const(shape) else list(_producer(shape).inputs) \
        if _producer(shape) is not None and _producer(shape).op == "Concat" else []
    pos = 0
    for j, p in enumerate(pieces):
        n = int(np.prod(p.shape)) if p.shape is not None and all(isinstance(d, int) for d in p.shape) else None
        if n is None:
            return                          # unknown layout: the rank's tests would catch a wrong shape
        if _is_const(p):
            v = np.asarray(p.values).reshape(-1).copy()
            for k in range(n):
                at = pos + k
                if at == 2 and v[k] in (old, old * head_dim):
                    v[k] = new if v[k] == old else new * head_dim
            if not np.array_equal(v, np.asarray(p.values).reshape(-1)):
                c = gs.Constant(f"{p.name}_tp_{new}", v.reshape(np.asarray(p.values).shape))
                if p is shape:
                    node.inputs[1] = c
                else:
                    _producer(shape).inputs[j] = c
        pos += n


def shard_graph(graph, layers: list[Layer], lay: Layout, rank: int, w: _Weights) -> None:
    """Rewrite `graph` (found `layers`) in place into rank `rank` of `lay.tp`."""
    import onnx_graphsurgeon as gs

    for i, L in enumerate(layers):
        q, kv, ffn = lay.q_cols(rank), lay.kv_cols(rank), lay.ffn_cols(rank)
        for name, lin, cols in (("q", L.q, q), ("k", L.k, kv), ("v", L.v, kv), ("gate", L.gate, ffn),
                                ("up", L.up, ffn)):
            _column(w, lin, cols, f"layer {i} {name}_proj")
        _row(w, graph, L.o, q, lay.tp, f"layer {i} o_proj")
        _row(w, graph, L.down, ffn, lay.tp, f"layer {i} down_proj")
        for node in L.rotary_q + L.rotary_k:
            if "num_heads" in node.attrs:
                node.attrs["num_heads"] = lay.q_heads if node in L.rotary_q else lay.kv_heads
        for key, n in (("q_num_heads", lay.q_heads), ("kv_num_heads", lay.kv_heads)):
            if key in L.attention.attrs:
                L.attention.attrs[key] = n
        for node, path in L.reshapes:
            old, new = (lay.num_heads, lay.q_heads) if path in ("q", "o") else (lay.num_kv_heads, lay.kv_heads)
            _fix_reshape(node, old, new, lay.head_dim)
    io = set()
    for t in list(graph.inputs) + list(graph.outputs):
        io.add(t.name)
        if art.is_cache_input(t.name) or t.name.startswith("present."):
            t.shape = [t.shape[0], lay.kv_heads, *t.shape[2:]]
    for t in graph.tensors().values():       # exporter shapes of split tensors are stale: drop them
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None
    graph.cleanup().toposort()


def _finish(graph, w: _Weights, fingerprint: str, rank: int, tp: int):
    """The rank's model proto: every remaining external reference copied into its data file, stamped."""
    import onnx_graphsurgeon as gs
    from onnx.external_data_helper import uses_external_data

    model = gs.export_onnx(graph)
    for t in model.graph.initializer:      # replicated: embedding, lm_head, norms, rotary caches
        if (uses_external_data(t) and t.name not in w.written) or len(t.raw_data) >= EXTERNAL_BYTES:
            w.external(t)
    stamp(model, fingerprint, rank, tp)
    return model


def stamp(model, fingerprint: str, rank: int, world_size: int) -> None:
    """Set the rank stamp (artifact.GRAPH_*) in a model proto's metadata_props."""
    want = {art.GRAPH_FINGERPRINT: fingerprint, art.GRAPH_RANK: str(rank), art.GRAPH_WORLD_SIZE: str(world_size)}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in want]
    del model.metadata_props[:]
    for k, v in kept + sorted(want.items()):
        p = model.metadata_props.add()
        p.key, p.value = k, v


def stamp_file(path: Path, fingerprint: str, rank: int, world_size: int) -> None:
    """Stamp a rank graph file in place (the graph only: its data file is untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    stamp(model, fingerprint, rank, world_size)
    onnx.save_model(model, str(path))


def shard_rank_graphs(src_dir: Path, src: art.RankGraph, out_dir: Path, spec: ModelSpec, tp: int,
                      fingerprint: str):
    """Write rank0..rank{tp-1} graphs (+ data) of `src` into out_dir (not src_dir). Returns the
    RankGraph records and rank 0's model proto (without weights: the I/O table)."""
    import onnx

    from .graph_check import check_graph
    from .onnx_io import load_graph

    check_tp(spec, tp)
    lay = Layout.of(spec, tp)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs, first = [], None
    for r in range(tp):
        graph = load_graph(src_dir / src.file)       # large weights stay references into the source data
        layers = find_layers(graph, spec)
        rg = art.RankGraph(r, art.rank_onnx(r), art.onnx_data(art.rank_onnx(r)))
        w = _Weights(src_dir, out_dir / rg.data)
        try:
            shard_graph(graph, layers, lay, r, w)
            check_graph(graph, after=f"shard rank {r}")
            model = _finish(graph, w, fingerprint, r, tp)
        finally:
            w.close()
        onnx.save_model(model, str(out_dir / rg.file))
        graphs.append(rg)
        first = model if r == 0 else first
        del graph, layers
    return graphs, first
