"""Tensor parallelism, matching: find each decoder layer's projections in a rank graph (q/k/v,
o, gate/up, down, with their quantization paths) and the per-rank head layout. Used by
compiler/shard.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from trtc.artifact import kv_heads_per_rank
from trtc.errors import TrtcError
from trtc.spec import ModelSpec


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


def producer(t):
    return t.inputs[0] if len(t.inputs) == 1 else None


def is_const(t) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


def _has_weight(node) -> bool:
    """A MatMul whose right operand is a constant matrix, or a DequantizeLinear of one."""
    if node is None or node.op != "MatMul":
        return False
    w = node.inputs[1]
    if is_const(w):
        return len(w.shape) == 2
    p = producer(w)
    return p is not None and p.op == "DequantizeLinear" and is_const(p.inputs[0]) and len(p.inputs[0].shape) == 2


def _linear_ending_at(t, what: str) -> Linear:
    """The linear whose output (bias included) is `t`: Add(y, bias)? <- Add(acc, term)* <- MatMul."""
    bias = None
    node = producer(t)
    if node is not None and node.op == "Add" and sum(is_const(i) for i in node.inputs) == 1:
        bias = node
        t = next(i for i in node.inputs if not is_const(i))
    y, terms = t, []
    node = producer(t)
    while node is not None and node.op == "Add":
        term = producer(node.inputs[1])
        if term is None or not _has_weight(term):
            raise _NoMatch(f"{what}: {node.name} adds {node.inputs[1].name}, not a correction term of a linear")
        terms.append(term)
        t = node.inputs[0]
        node = producer(t)
    if not _has_weight(node):
        raise _NoMatch(f"{what}: {t.name} is not produced by a MatMul with a constant weight")
    return Linear(node, y, terms, bias)


_HEAD_LOCAL = ("RotaryEmbedding", "Transpose", "Reshape", "RMSNormalization", "QuantizeLinear",
               "DequantizeLinear")


def _walk_to_linear(t, layer: Layer, path: str, head_dim: int) -> Linear:
    """Back from an attention input through head-local ops (cache write, rotary, q/k norm, KV
    quantization, head split) to the linear that made it."""
    while True:
        node = producer(t)
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
            if not is_const(w) or tuple(w.shape) != (head_dim,):
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
            if (n.op == "Mul" and any(is_const(i) for i in n.inputs)) or \
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
        term = producer(add.inputs[1])
        feeder = producer(term.inputs[0]) if term is not None and term.op == "MatMul" else None
        if feeder is None or not any(feeder.inputs[0] is p for p in prelude):
            break            # not a correction term (the residual add)
        terms.append(term)
        t = add.outputs[0]
    bias = _single_consumer(t, ("Add",))
    bias = bias if bias is not None and sum(is_const(i) for i in bias.inputs) == 1 else None
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
