"""Stage 3c, shard: one rank graph (after the passes and any quantization) -> tp rank graphs.
Which tp sizes are possible: compiler/tp.py; finding the projections: compiler/shard_match.py.

Megatron-style tensor parallelism, decided per layer from the graph itself:
  q, k, v, gate, up   column-parallel: rank r keeps its heads' / its intermediate slice's output
                      columns of W [K, N] (and of the bias, scales and correction terms of N)
  o, down             row-parallel: rank r keeps the input rows of its heads / intermediate slice,
                      then y = DistCollective(all_reduce, sum) of the partial outputs (after the
                      sum of every quantization path: main GEMM + outliers + low rank + int4 offset)
  norms, embedding, lm_head, rotary caches, masks: replicated (lm_head: docs/tensor-parallel.md)
GQA: up to num_kv_heads ranks split the KV heads; beyond, rank r keeps KV head r // (tp / num_kv_heads).

Each rank graph is written with only its own weights: slices are read from the source data file
one tensor at a time (np.memmap) and appended to the rank's data file; replicated tensors are
copied the same way. Peak memory is about one tensor, whatever the model size.

Rank graphs carry the build fingerprint, rank and world size in their metadata_props (artifact.GRAPH_*).
"""

from __future__ import annotations

from pathlib import Path

from trtc import artifact as art
from trtc.errors import TrtcError, TrtcInternalError
from trtc.spec import ModelSpec

from .shard_match import Layer, Layout, Linear, find_layers, is_const, producer
from .tp import COLLECTIVE, all_reduce_attrs, check_tp


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
    if is_const(wt):
        _retarget(mm, 1, _sliced(w, wt, axis, sel))
        return
    dq = producer(wt)
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
    inner = producer(s)
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
        i = next(j for j, t in enumerate(lin.bias.inputs) if is_const(t))
        _retarget(lin.bias, i, _sliced(w, lin.bias.inputs[i], 0, cols))


def _row(w: _Weights, graph, lin: Linear, rows: tuple[int, int], tp: int, what: str) -> None:
    """Keep input rows [a, b) (the rank's part of the activation), then all-reduce the sum of every
    path: main GEMM and correction terms."""
    import numpy as np
    import onnx_graphsurgeon as gs

    a, b = rows
    _slice_weight(w, lin.main, 0, rows, what)
    t = lin.main.inputs[0]
    while (p := producer(t)) is not None and p.op in ("Mul", "QuantizeLinear", "DequantizeLinear"):
        if p.op == "Mul":       # per input channel [K]: AWQ's 1/s, the FP8 inlier mask
            i = next((j for j, x in enumerate(p.inputs) if is_const(x)), None)
            if i is None:
                break
            _retarget(p, i, _sliced(w, p.inputs[i], 0, rows))
            t = p.inputs[1 - i]
        else:
            t = p.inputs[0]
    for term in lin.terms:
        feeder = producer(term.inputs[0])
        if feeder.op == "Gather":            # outlier channels: the rank's own, renumbered
            idx = np.asarray(feeder.inputs[1].values).astype(np.int64)
            mine = (idx >= a) & (idx < b)
            add = next(iter(term.outputs[0].outputs))
            if not mine.any():               # none here: the term is zero on this rank
                add.op, add.inputs = "Identity", [add.inputs[0]]
                continue
            _retarget(feeder, 1, gs.Constant(f"{feeder.inputs[1].name}_tp_{a}", idx[mine] - a))
            _slice_weight(w, term, 0, np.flatnonzero(mine), what)
        elif is_const(feeder.inputs[1]):    # int4 offset: (x @ E) @ off, E [K, K/G] the group indicator
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
    pieces = [shape] if is_const(shape) else list(producer(shape).inputs) \
        if producer(shape) is not None and producer(shape).op == "Concat" else []
    pos = 0
    for j, p in enumerate(pieces):
        n = int(np.prod(p.shape)) if p.shape is not None and all(isinstance(d, int) for d in p.shape) else None
        if n is None:
            return                          # unknown layout: the rank's tests would catch a wrong shape
        if is_const(p):
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
                    producer(shape).inputs[j] = c
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
