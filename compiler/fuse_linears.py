"""Build-time rewrite: MatMuls that read the same input A and whose weight B is a float initializer
[K, Ni] become one MatMul on the joined weight [K, sum Ni] and one Split on the last axis (sizes Ni);
each old output is now an output of the Split, under its old name.

Why: TensorRT-RTX 1.7.1's builder fuses such MatMuls itself (q/k/v, gate/up) and makes a new joined
copy of their weights in anonymous memory, on top of its one copy of every weight: +1.16 GiB on a
TinyLlama-1.1B-shaped fp16 graph, about +8.5 GiB on a Llama-3.1-8B shape (docs/platform.md). Joined
here, on disk and read through memory maps, the builder holds one copy.

Applied to a copy of a rank graph just before TensorRT parses it (compiler/build.py): the graph on
disk is never changed. The joined weights go to a new data file of their own; every other initializer
keeps pointing at its original data file. Skipped: weights behind DequantizeLinear (not an
initializer), non-constant B, weights that are not 2-D, integer weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from trtc.errors import TrtcError

# Float element types a weight may have, and their bytes per element (the join copies bytes).
_FLOAT_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}
_ALIGN = 4096            # offset of each joined weight in its file, as trtc's exporter aligns them
_CHUNK = 64 << 20        # bytes of joined rows held in memory at a time


@dataclass(frozen=True)
class Group:
    """MatMuls (graph node indices, in graph order) on one input whose weights join."""
    a: str
    nodes: tuple[int, ...]
    weights: tuple[str, ...]
    k: int
    widths: tuple[int, ...]          # Ni per weight
    data_type: int

    @property
    def name(self) -> str:           # the joined initializer: its parts' names, in order
        return "+".join(self.weights)

    @property
    def nbytes(self) -> int:
        return self.k * sum(self.widths) * _FLOAT_BYTES[self.data_type]


def find_groups(model: onnx.ModelProto) -> list[Group]:
    """Groups of two or more MatMuls with the same A, each with a float 2-D initializer B of the
    same K and element type. Initializers that are also graph inputs can be overridden: not constant."""
    g = model.graph
    inputs = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in inputs}
    by_key: dict[tuple[str, int, int], list[int]] = {}
    for i, n in enumerate(g.node):
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        w = inits.get(n.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in _FLOAT_BYTES:
            continue
        by_key.setdefault((n.input[0], w.dims[0], w.data_type), []).append(i)
    groups = []
    for (a, k, dt), idx in by_key.items():
        if len(idx) < 2:
            continue
        ws = tuple(g.node[i].input[1] for i in idx)
        groups.append(Group(a, tuple(idx), ws, k, tuple(inits[w].dims[1] for w in ws), dt))
    return sorted(groups, key=lambda gr: gr.nodes[0])


def joined_bytes(groups: list[Group]) -> int:
    """Size of the joined data file (each weight at a 4096-byte aligned offset)."""
    total = 0
    for gr in groups:
        total += -total % _ALIGN + gr.nbytes
    return total


def _weight_rows(t: TensorProto, base: Path) -> np.ndarray:
    """[K, N] view of a weight's bytes as unsigned ints of its element size (no copy for external
    data: a read-only memory map of its file, whose pages are the page cache's, not ours)."""
    uint = np.dtype(f"<u{_FLOAT_BYTES[t.data_type]}")
    k, n = t.dims
    if t.data_location == TensorProto.EXTERNAL:
        kv = {e.key: e.value for e in t.external_data}
        path = base / kv["location"]
        try:
            m = np.memmap(path, dtype=np.uint8, mode="r", offset=int(kv.get("offset", 0)),
                          shape=(k * n * uint.itemsize,))
        except (OSError, ValueError) as e:
            raise TrtcError(f"cannot read the weight {t.name!r} from {path} ({e}); keep the .onnx.data file "
                            f"next to its .onnx graph, or export the model again") from None
        return m.view(uint).reshape(k, n)
    return np.ascontiguousarray(numpy_helper.to_array(t)).view(uint).reshape(k, n)


def _write_joined(f: BinaryIO, parts: list[np.ndarray], buf: np.ndarray) -> None:
    """[K, sum Ni] row-major, streamed: about _CHUNK bytes of rows at a time, joined into `buf`
    (uint8, reused for every group: a fresh 64 MiB array per chunk cost more kernel time in page
    faults than the copy itself) and written from it."""
    n = sum(p.shape[1] for p in parts)
    step = max(1, _CHUNK // (n * parts[0].itemsize))
    for r in range(0, parts[0].shape[0], step):
        rows = min(step, parts[0].shape[0] - r)
        out = buf[:rows * n * parts[0].itemsize].view(parts[0].dtype).reshape(rows, n)
        np.concatenate([p[r:r + rows] for p in parts], axis=1, out=out)
        f.write(memoryview(out).cast("B"))


def write_joined_data(model: onnx.ModelProto, groups: list[Group], base: Path, data_path: Path) -> list[int]:
    """Write every group's joined weight to data_path, one group at a time; return their offsets.
    base: the dir the graph's external data locations are relative to."""
    inits = {t.name: t for t in model.graph.initializer}
    offsets = []
    # one chunk of rows at a time (a single row may be larger than _CHUNK)
    buf = np.empty(max([_CHUNK] + [sum(gr.widths) * _FLOAT_BYTES[gr.data_type] for gr in groups]), np.uint8)
    with open(data_path, "wb") as f:
        for gr in groups:
            f.write(b"\0" * (-f.tell() % _ALIGN))
            offsets.append(f.tell())
            _write_joined(f, [_weight_rows(inits[w], base) for w in gr.weights], buf)
    return offsets


def _external(name: str, gr: Group, location: str, offset: int) -> TensorProto:
    t = TensorProto(name=name, data_type=gr.data_type, dims=[gr.k, sum(gr.widths)],
                    data_location=TensorProto.EXTERNAL)
    for key, v in (("location", location), ("offset", str(offset)), ("length", str(gr.nbytes))):
        e = t.external_data.add()
        e.key, e.value = key, v
    return t


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _joined_nodes(model: onnx.ModelProto, gr: Group) -> tuple[list[NodeProto], TensorProto]:
    """MatMul(A, joined) -> [..., sum Ni] and Split(axis -1) into the old outputs; the split sizes
    (int64 [n]) as an inline initializer (Split takes them as an input from opset 13)."""
    old = [model.graph.node[i] for i in gr.nodes]
    first = old[0].name or old[0].output[0]
    y = f"{gr.name}/matmul"
    sizes = numpy_helper.from_array(np.array(gr.widths, np.int64), f"{gr.name}/split_sizes")
    mm = helper.make_node("MatMul", [gr.a, gr.name], [y], name=f"{first}/joined")
    outs = [n.output[0] for n in old]
    if _opset(model) >= 13:
        split = helper.make_node("Split", [y, sizes.name], outs, name=f"{first}/split", axis=-1)
    else:
        split = helper.make_node("Split", [y], outs, name=f"{first}/split", axis=-1, split=list(gr.widths))
    return [mm, split], sizes


def _read_names(nodes: list[NodeProto]) -> set[str]:
    """Every tensor name the nodes read, inside their subgraphs (If/Loop bodies) too."""
    out = set()
    for n in nodes:
        out.update(n.input)
        for a in n.attribute:
            for sub in [a.g] * a.HasField("g") + list(a.graphs):
                out |= _read_names(list(sub.node))
    return out


def rewrite(model: onnx.ModelProto, groups: list[Group], location: str, offsets: list[int]) -> onnx.ModelProto:
    """The graph with each group joined (in place; returns it). The joined nodes stand where the
    group's first MatMul stood: A exists there, and every reader of a group's output comes later.
    The group's weights are dropped unless something else reads them."""
    g = model.graph
    at = {gr.nodes[0]: gr for gr in groups}
    gone = {i for gr in groups for i in gr.nodes}
    nodes: list[NodeProto] = []
    new_inits: list[TensorProto] = []
    for i, n in enumerate(g.node):
        if i in at:
            made, sizes = _joined_nodes(model, at[i])
            nodes += made
            new_inits.append(sizes)
        elif i not in gone:
            nodes.append(n)
    for gr, off in zip(groups, offsets):
        new_inits.append(_external(gr.name, gr, location, off))
    used = _read_names(nodes) | {o.name for o in g.output}
    dropped = {w for gr in groups for w in gr.weights} - used
    kept = [t for t in g.initializer if t.name not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    return model


@dataclass
class Plan:
    """A rank graph (read without its weights) and the groups it joins."""
    model: onnx.ModelProto
    groups: list[Group]
    base: Path                       # the dir its external data locations are relative to

    @property
    def nbytes(self) -> int:         # of the joined data file
        return joined_bytes(self.groups)

    @property
    def matmuls(self) -> int:
        return sum(len(gr.nodes) for gr in self.groups)

    def write(self, out_graph: Path, out_data: Path) -> None:
        """The joined weights to out_data (one group in memory at a time, in chunks), the graph to
        out_graph, naming out_data relative to out_graph's dir (where the caller links the
        original data files too)."""
        offsets = write_joined_data(self.model, self.groups, self.base, out_data)
        onnx.save(rewrite(self.model, self.groups, out_data.name, offsets), str(out_graph))


def plan(onnx_path: Path) -> Plan:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return Plan(model, find_groups(model), onnx_path.parent)
