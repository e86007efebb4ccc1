"""Export by stacking: trace a few decoder layers, repeat them in ONNX to the model's depth.

Tracing costs seconds per decoder layer and needs the whole torch model in memory; the layers of a
model are the same computation up to their weights. So the export traces a *template*: the model's
config cut to T layers (T: until every kind of layer has appeared twice; 2 for a uniform model),
with distinct random parameters, and builds the full graph from it:

  1. trace    the template, each decoder layer's output hidden states marked as extra graph
              outputs (the layer boundaries); every node carries the namespace of its module
              ("m.model.layers.3: ...DecoderLayer"), which says which layer it belongs to.
  2. bind     every initializer that holds a parameter, as stored (transposed for MatMul, `1 + w`
              for some norms, ...), found by hashing the template's parameters under each such
              transform: the random values make every parameter distinct, so the exporter's constant
              folding and de-duplication cannot merge two of them.
  3. stack    layers T..L-1 are copies of the last template layer of the same kind: its nodes with
              their tensors renamed, its cache inputs/outputs renumbered, its hidden-state input
              taken from the previous layer; the final norm and lm_head read the last layer.
  4. weights  each initializer bound to a parameter is named after the parameter of its layer and
              streamed into the data file from the safetensors files, one tensor at a time, in the
              export dtype, with the same transform.

Whatever this cannot prove it handles (a parameter folded by an unknown transform, a model whose
weights are not in safetensors, names the checkpoint does not hold, nodes outside the layers that
read a layer) raises StackUnsupported and the caller traces the whole model instead (export.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtc import artifact as art
from trtc.log import info

MARK = "trtc.layer_out."          # graph output naming the hidden states after decoder layer j


class StackUnsupported(Exception):
    """The model cannot be exported by stacking; the reason is the message."""


# ---- plan: which layers the template holds, and which template layer each deeper layer copies


def layer_kinds(cfg: Any) -> list[tuple]:
    """Per layer, what distinguishes its computation: every config list with one entry per layer
    (layer_types, no_rope_layers, ...) and the dense/sparse MLP choice of MoE configs."""
    L = int(cfg.num_hidden_layers)
    lists = sorted((k, v) for k, v in cfg.to_dict().items() if isinstance(v, list) and len(v) == L)
    step = getattr(cfg, "decoder_sparse_step", None)
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or ())
    kinds = []
    for i in range(L):
        k = tuple((name, json.dumps(v[i])) for name, v in lists)
        if step:
            k += (("sparse", i not in mlp_only and (i + 1) % step == 0),)
        kinds.append(k)
    return kinds


@dataclass(frozen=True)
class StackPlan:
    num_layers: int
    template_layers: int
    source: tuple[int, ...]       # per layer i >= template_layers: the template layer it copies


def plan_stack(kinds: list[tuple]) -> StackPlan:
    """T = the fewest leading layers in which every kind of a later layer appears twice; each later
    layer copies the last template layer of its kind (never layer 0, whose input is the embedding)."""
    L = len(kinds)
    for T in range(2, L + 1):
        seen: dict[tuple, list[int]] = defaultdict(list)
        for j in range(T):
            seen[kinds[j]].append(j)
        if all(len(seen[kinds[i]]) >= 2 for i in range(T, L)):
            return StackPlan(L, T, tuple(seen[kinds[i]][-1] for i in range(T, L)))
    return StackPlan(L, L, ())


def template_config(cfg: Any, T: int) -> Any:
    """The HF config cut to its first T layers (per-layer lists cut with it)."""
    L = int(cfg.num_hidden_layers)
    t = copy.deepcopy(cfg)
    for k, v in cfg.to_dict().items():
        if isinstance(v, list) and len(v) == L and hasattr(t, k):
            setattr(t, k, v[:T])
    t.num_hidden_layers = T
    return t


def fill_distinct(model, seed: int = 1234) -> None:
    """Parameters that differ from each other (norm-like vectors around 1, weights around 0), so
    the exporter cannot de-duplicate two parameters into one initializer. Each parameter is a
    1M-value random block, rolled by an offset of its own and tiled: drawing fresh random numbers
    for an 8B model's 2 x 0.5G-element embeddings took 15 s here; tiling takes memory bandwidth."""
    import torch

    g = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 20, generator=g, dtype=torch.float32) * 0.02
    B = block.numel()
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            src = torch.roll(block, (k * 7919) % B) + (1.0 if p.ndim == 1 else 0.0)
            src = src.to(p.dtype)
            flat = p.view(-1)
            for i in range(0, flat.numel(), B):
                n = min(B, flat.numel() - i)
                flat[i:i + n].copy_(src[:n])


# ---- bind: initializers -> (parameter, transform)

def _t_last(x):
    return x.transpose(-1, -2).contiguous()


TRANSFORMS = {                     # name -> f(param tensor in the export dtype) -> stored tensor
    "id": lambda x: x,
    "T": _t_last,
    "f32": lambda x: x.float(),
    "plus1": lambda x: x + 1,
    "plus1_f32": lambda x: x.float() + 1,
}


def _candidates(ndim: int) -> tuple[str, ...]:
    return ("id", "f32", "plus1", "plus1_f32") if ndim == 1 else ("id", "T")


_HASH_CHUNK = 16 << 20     # bytes hashed at a time from one reused buffer (no whole-tensor copies)


def _digest(t) -> str:
    import torch

    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    h = hashlib.sha1(raw.numpy().reshape(-1).view("u1"))    # the tensor's own buffer, not a bytes copy
    return _digest_key(h, tuple(t.shape), t.dtype)


def _digest_key(h, shape: tuple[int, ...], dtype) -> str:
    return h.hexdigest() + str(tuple(shape)) + str(dtype)


def param_index(model) -> dict[str, tuple[str, str]]:
    """digest of each (parameter, transform) -> (parameter name, transform); tied parameters once."""
    idx: dict[str, tuple[str, str]] = {}
    for name, p in model.named_parameters():
        x = p.detach()
        for tf in _candidates(x.ndim):
            idx.setdefault(_digest(TRANSFORMS[tf](x)), (name, tf))
    return idx


_ONNX_FLOAT_TORCH = {1: "float32", 10: "float16", 16: "bfloat16"}    # FLOAT_TYPES -> torch dtype names


def _init_digest(init, data_dir: Path) -> str:
    """_digest(tensor_of(init, data_dir)), read from the bytes as stored: external data is hashed
    from its file through one reused buffer (tensor_of copies a weight three times)."""
    import os

    import torch
    from onnx import TensorProto

    kv = {e.key: e.value for e in init.external_data}
    if init.data_type not in _ONNX_FLOAT_TORCH or init.data_location != TensorProto.EXTERNAL or "length" not in kv:
        return _digest(tensor_of(init, data_dir))
    loc = kv.get("location", "")
    if not loc or Path(loc).name != loc:
        raise ValueError(f"initializer {init.name}: external data location {loc!r} is not a file name in {data_dir}")
    length, offset = int(kv["length"]), int(kv.get("offset") or 0)
    h, buf = hashlib.sha1(), bytearray(min(length, _HASH_CHUNK))
    with open(data_dir / loc, "rb") as f:
        done = 0
        while done < length:
            n = os.preadv(f.fileno(), [memoryview(buf)[:min(len(buf), length - done)]], offset + done)
            if n <= 0:
                raise ValueError(f"initializer {init.name}: {loc} ends before offset {offset} + {length}")
            h.update(memoryview(buf)[:n])
            done += n
    return _digest_key(h, tuple(init.dims), getattr(torch, _ONNX_FLOAT_TORCH[init.data_type]))


def tensor_of(init, data_dir: Path):
    """A TensorProto's values as a torch tensor (external data read from data_dir)."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from .onnx_io import inline_external

    t = onnx.TensorProto()
    t.CopyFrom(init)
    if uses_external_data(t):
        inline_external(t, data_dir)
    if t.data_type == onnx.TensorProto.BFLOAT16:
        raw = np.frombuffer(t.raw_data, dtype=np.int16).reshape(tuple(t.dims)) if t.raw_data else \
            np.asarray(t.int32_data, dtype=np.int32).astype(np.int16).reshape(tuple(t.dims))
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(numpy_helper.to_array(t)))


FLOAT_TYPES = (1, 10, 16)    # FLOAT, FLOAT16, BFLOAT16


def bind_initializers(model_proto, data_dir: Path, index: dict) -> dict[str, tuple[str, str]]:
    """initializer name -> (parameter name, transform) for every float initializer that is one."""
    out = {}
    for init in model_proto.graph.initializer:
        if init.data_type in FLOAT_TYPES:
            hit = index.get(_init_digest(init, data_dir))
            if hit is not None:
                out[init.name] = hit
    return out


_IR_FLOAT_TORCH = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16"}


def bind_program(ir_model, index: dict, data_dir: Path):
    """The exporter's in-memory model as a ModelProto, and its binding (as bind_initializers), without
    writing the template's weights to disk and reading them back (TinyLlama: 0.44 GB, the 8B shape:
    2.9 GB, mostly the embedding and lm_head). Each float initializer is hashed where the exporter
    holds it; one bound to a parameter becomes a placeholder: name, type and dims, its values marked
    external in a file that is never written (write_weights streams them from the checkpoint, and
    nothing reads a bound template initializer). The rest (small constants) stay inline. data_dir
    only names where the placeholders would lie."""
    import numpy as np
    import onnx_ir as ir
    import torch

    bound: dict[str, tuple[str, str]] = {}
    for name, v in ir_model.graph.initializers.items():
        t = v.const_value
        tname = _IR_FLOAT_TORCH.get(t.dtype.name) if t is not None else None
        if tname is None:
            continue
        arr = np.asarray(t.numpy())
        raw = np.ascontiguousarray(arr).reshape(-1).view("u1")
        key = _digest_key(hashlib.sha1(raw), tuple(int(d) for d in t.shape), getattr(torch, tname))
        hit = index.get(key)
        if hit is None:
            continue
        bound[name] = hit
        v.const_value = ir.ExternalTensor("trtc-template-placeholder.data", 0, raw.nbytes, t.dtype,
                                          shape=t.shape, name=name, base_dir=str(data_dir))
    return ir.serde.serialize_model(ir_model), bound


# ---- stack

def _layer_re(layers_path: str) -> re.Pattern:
    return re.compile(r"(?:^|/)m\." + re.escape(layers_path) + r"\.(\d+): ")


def node_layer(node, pattern: re.Pattern) -> int | None | bool:
    """The decoder layer whose module made `node`; None outside the layers; False when the node has
    no namespace (nodes made by the exporter's rewrites, e.g. a Split of a fused projection)."""
    for p in node.metadata_props:
        if p.key == "namespace":
            found = pattern.findall(p.value)
            return int(found[-1]) if found else None
    return False


def decoder_layers_path(model) -> str:
    """Dotted name (without the wrapper's `m.`) of the ModuleList holding the decoder layers."""
    import torch

    L = int(model.config.num_hidden_layers)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == L and name.endswith("layers"):
            return name
    raise StackUnsupported("no ModuleList of decoder layers found")


@dataclass
class _Parts:
    prefix: list          # nodes that read no layer (embedding, rotary, masks, shapes), in order
    blocks: dict          # template layer j -> its nodes, in order
    suffix: list          # nodes after the layers (final norm, lm_head)
    order: list           # prefix and block nodes in the traced order


def split_nodes(graph, pattern: re.Pattern, T: int) -> _Parts:
    blocks: dict[int, list] = {j: [] for j in range(T)}
    prefix, suffix, order = [], [], []
    after_layers: set[str] = set()           # tensors that depend on a layer's output
    made_by: dict[str, int] = {}             # tensor -> the layer whose node computes it
    for n in graph.node:
        j = node_layer(n, pattern)
        if j is False:                       # no namespace: the layer of what it reads, if just one
            src = {made_by[i] for i in n.input if i in made_by}
            j = src.pop() if len(src) == 1 else None
        if any(a.g.node or a.graphs for a in n.attribute):
            raise StackUnsupported(f"node {n.name} has a subgraph")
        if j is not None:
            if j >= T:
                raise StackUnsupported(f"node {n.name} names layer {j} of a {T}-layer template")
            blocks[j].append(n)
            order.append(n)
            after_layers.update(n.output)
            made_by.update((o, j) for o in n.output)
        elif any(i in after_layers for i in n.input):
            suffix.append(n)
            after_layers.update(n.output)
        else:
            prefix.append(n)
            order.append(n)
    if any(not b for b in blocks.values()):
        raise StackUnsupported("a template layer has no nodes")
    return _Parts(prefix, blocks, suffix, order)


def check_siblings(parts: _Parts, graph, bound: dict, kinds: list[tuple], data_dir: Path) -> None:
    """A float initializer read by one layer only and bound to no parameter must be a constant of
    that kind of layer (the same values in a sibling layer), else it was folded from a parameter
    by a transform this module does not know, and copies would get the template's values."""
    readers: dict[str, set] = defaultdict(set)
    for j, nodes in parts.blocks.items():
        for n in nodes:
            for i in n.input:
                readers[i].add(j)
    inits = {t.name: t for t in graph.initializer}
    digests: dict[int, set] = defaultdict(set)     # layer -> digests of its unbound float initializers
    lone = []
    for name, t in inits.items():
        if t.data_type in FLOAT_TYPES and name not in bound and readers.get(name):
            d = _init_digest(t, data_dir)
            for j in readers[name]:
                digests[j].add(d)
            if len(readers[name]) == 1:
                lone.append((name, next(iter(readers[name])), d))
    for name, j, d in lone:
        sibs = [s for s in parts.blocks if s != j and kinds[s] == kinds[j]]
        if sibs and not any(d in digests[s] for s in sibs):
            raise StackUnsupported(f"initializer {name} of layer {j} is derived from its parameters in a "
                                   f"way stacking cannot repeat")


@dataclass(frozen=True)
class WeightRef:
    name: str         # initializer name in the stacked graph: the parameter of that layer
    param: str        # checkpoint tensor name
    transform: str    # TRANSFORMS key
    dims: tuple[int, ...]
    data_type: int    # onnx TensorProto data type (the export dtype, or float32 for folded norms)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n * (4 if self.data_type == 1 else 2)


class Stacker:
    """The stacked graph's nodes, and the weights they read (see the module doc)."""

    def __init__(self, proto, parts: _Parts, plan: StackPlan, layers_path: str, bound: dict, aliases: dict[str, str]):
        self.proto, self.parts, self.plan, self.layers_path = proto, parts, plan, layers_path
        self.bound, self.aliases = bound, aliases     # aliases: parameter name -> checkpoint name (tied)
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.weights: dict[str, WeightRef] = {}
        self.renames: list[dict[str, str]] = []      # per copied layer: template tensor -> its copy
        self.layer_of_node = {id(n): j for j, nodes in parts.blocks.items() for n in nodes}
        self._param_layer = re.compile(re.escape(layers_path) + r"\.(\d+)\.")

    def layer_of_param(self, name: str) -> int | None:
        """The decoder layer a checkpoint parameter belongs to (None: embedding, final norm, lm_head)."""
        m = self._param_layer.match(name)
        return int(m.group(1)) if m else None

    def _weight(self, init_name: str, i: int | None) -> str:
        """The stacked graph's initializer for template initializer `init_name` read by layer i."""
        pname, tf = self.bound[init_name]
        pname = pname.removeprefix("m.")
        m = self._param_layer.match(pname)
        if m and i is not None:
            pname = f"{self.layers_path}.{i}." + pname[m.end():]
        name = pname if tf in ("id", "T") else f"{pname}.{tf}"
        if name not in self.weights:
            t = self.inits[init_name]
            self.weights[name] = WeightRef(name, self.aliases.get(pname, pname), tf, tuple(t.dims), t.data_type)
        return name

    def _rebind(self, node, j: int | None, i: int | None, rename: dict) -> None:
        for k, x in enumerate(node.input):
            if x in self.bound:
                m = self._param_layer.match(self.bound[x][0].removeprefix("m."))
                lj = int(m.group(1)) if m else None
                if lj is not None and lj != j:
                    raise StackUnsupported(f"a node of layer {j} reads a parameter of layer {lj}")
                node.input[k] = self._weight(x, i if lj is not None else None)
            elif x in rename:
                node.input[k] = rename[x]

    def nodes(self) -> list:
        L, T = self.plan.num_layers, self.plan.template_layers
        out = []
        for n in self.parts.order:                    # prefix and template layers, as traced
            m = copy.deepcopy(n)
            j = self.layer_of_node.get(id(n))
            self._rebind(m, j, j, {})
            out.append(m)
        for i, b in zip(range(T, L), self.plan.source):
            out += self._copy_layer(b, i)
        last = {f"{MARK}{T - 1}": f"{MARK}{L - 1}"}
        for n in self.parts.suffix:
            m = copy.deepcopy(n)
            self._rebind(m, None, None, last)
            out.append(m)
        return out

    def _copy_layer(self, b: int, i: int) -> list:
        nodes = self.parts.blocks[b]
        rename = {f"{MARK}{b - 1}": f"{MARK}{i - 1}", f"{MARK}{b}": f"{MARK}{i}"}
        for kv in ("key", "value"):
            rename[art.past_name(b, kv)], rename[art.present_name(b, kv)] = art.past_name(i, kv), art.present_name(i, kv)
        for n in nodes:
            for o in n.output:
                if o:
                    rename.setdefault(o, f"{o}__{i}")
        copies = []
        for n in nodes:
            m = copy.deepcopy(n)
            m.name = f"{n.name}__{i}"
            self._rebind(m, b, i, rename)
            for k, o in enumerate(m.output):
                if o:
                    m.output[k] = rename[o]
            for p in m.metadata_props:
                if p.key == "namespace":
                    p.value = p.value.replace(f".{self.layers_path}.{b}: ", f".{self.layers_path}.{i}: ")
            copies.append(m)
        self.renames.append(rename)
        return copies



def assemble(proto, parts: _Parts, plan: StackPlan, stacker: Stacker, data_dir: Path):
    """The stacked ModelProto (weights not yet placed: see write_weights), from the template's."""
    import onnx

    L, T = plan.num_layers, plan.template_layers
    g = proto.graph
    nodes = stacker.nodes()
    copied = list(zip(range(T, L), plan.source))
    by_name = {v.name: v for v in list(g.input) + list(g.output)}

    def io(names_src: list[tuple[str, str]]) -> list:
        out = []
        for new, src in names_src:
            v = copy.deepcopy(by_name[src])
            v.name = new
            out.append(v)
        return out

    cache = art.cache_names(L)
    src_layer = {i: i for i in range(T)} | dict(copied)
    inputs = [v for v in g.input if not art.is_cache_input(v.name)]
    inputs += io([(art.past_name(i, kv), art.past_name(src_layer[i], kv)) for i in range(L) for kv in ("key", "value")])
    outputs = io([(art.LOGITS, art.LOGITS)])
    outputs += io([(art.present_name(i, kv), art.present_name(src_layer[i], kv)) for i in range(L)
                   for kv in ("key", "value")])
    assert [v.name for v in inputs if art.is_cache_input(v.name)] == [p for p, _ in cache]
    value_info = list(g.value_info)
    vi = {v.name: v for v in g.value_info}
    for rename in stacker.renames:
        for old, new in rename.items():
            if old in vi and new != old:
                v = copy.deepcopy(vi[old])
                v.name = new
                value_info.append(v)
    # The layer boundaries were graph outputs of the template (their types were there): keep the
    # types as value_info, or passes that look at a tensor's type (rms_norm_dtypes) cannot.
    value_info += io([(f"{MARK}{i}", f"{MARK}{src_layer[i]}") for i in range(L)])
    used = {x for n in nodes for x in n.input}
    kept = []
    for t in g.initializer:                     # constants that are no parameter: inline
        if t.name in used and t.name not in stacker.bound:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            if c.data_location == onnx.TensorProto.EXTERNAL:
                from .onnx_io import inline_external

                inline_external(c, data_dir)
            kept.append(c)
    graph = onnx.helper.make_graph(nodes, g.name, inputs, outputs, initializer=kept, value_info=value_info)
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    for f in proto.functions:
        model.functions.append(f)
    check_order(model.graph, set(stacker.weights))
    return model


def check_order(graph, weights: set[str]) -> None:
    """Every node reads only graph inputs, initializers (or weights still to be written) and outputs
    of earlier nodes."""
    have = {v.name for v in graph.input} | {t.name for t in graph.initializer} | weights | {""}
    for n in graph.node:
        missing = [x for x in n.input if x not in have]
        if missing:
            raise StackUnsupported(f"node {n.name} reads {missing[0]} before it is computed")
        have.update(n.output)


# ---- weights: streamed from the checkpoint

def checkpoint_index(hf_dir: Path) -> dict[str, Path]:
    """checkpoint tensor name -> its safetensors file."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise StackUnsupported("the weights are not in safetensors files")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: hf_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update({k: f for k in st.keys()})
    return out


_ONNX_TO_TORCH = {1: "float32", 10: "float16", 16: "bfloat16"}


def write_weights(model, weights: list[WeightRef], ckpt: dict[str, Path], dtype: str, data_path: Path,
                  layer_of, num_layers: int) -> None:
    """Stream every weight into `data_path` (one tensor in memory at a time) and add it to the graph
    as an external initializer."""
    import onnx
    import torch
    from safetensors import safe_open

    missing = sorted({w.param for w in weights} - set(ckpt))
    if missing:
        raise StackUnsupported(f"the checkpoint has no tensor {missing[0]}")
    check_free_space(data_path.parent, sum(w.nbytes + 64 for w in weights))
    handles: dict[Path, Any] = {}
    target = getattr(torch, dtype)
    offset, done = 0, -1
    with open(data_path, "wb") as f:
        for w in weights:
            path = ckpt[w.param]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            x = TRANSFORMS[w.transform](handles[path].get_tensor(w.param).to(target))
            x = x.to(getattr(torch, _ONNX_TO_TORCH[w.data_type])).contiguous()
            if tuple(x.shape) != w.dims:
                raise StackUnsupported(f"{w.param} has shape {tuple(x.shape)} after {w.transform}, the "
                                       f"template's has {w.dims}")
            raw = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().reshape(-1).view("u1")
            pad = -offset % 64
            f.write(b"\0" * pad)
            offset += pad
            f.write(memoryview(raw))        # the tensor's own buffer: no bytes copy
            t = onnx.TensorProto(name=w.name, data_type=w.data_type, dims=list(w.dims),
                                 data_location=onnx.TensorProto.EXTERNAL)
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            model.graph.initializer.append(t)
            offset += len(raw)
            layer = layer_of(w.param)
            if layer is not None and layer > done:
                done = layer
                info(f"[trtc]   weights: layer {layer + 1}/{num_layers}")
            del x, raw


def name_after_params(proto, bound: dict[str, tuple[str, str]]) -> None:
    """Rename each initializer bound to a parameter after it (a whole-model trace's `val_123`
    becomes `model.layers.3.mlp.down_proj.weight`), where the name is free."""
    taken = {t.name for t in proto.graph.initializer} | {x for n in proto.graph.node for x in n.output}
    rename = {}
    for t in proto.graph.initializer:
        if t.name in bound:
            pname, tf = bound[t.name]
            pname = pname.removeprefix("m.")
            new = pname if tf in ("id", "T") else f"{pname}.{tf}"
            if new not in taken:
                taken.add(new)
                rename[t.name] = new
                t.name = new
    for n in proto.graph.node:
        for k, x in enumerate(n.input):
            if x in rename:
                n.input[k] = rename[x]


def check_free_space(d: Path, need: int) -> None:
    """Before writing `need` bytes of weights into `d`: a user error naming both sizes if they do not fit."""
    import shutil

    from trtc.errors import TrtcError

    free = shutil.disk_usage(d).free
    if free < need:
        raise TrtcError(f"export: the weights need {need / 2**30:.2f} GiB in {d} and {free / 2**30:.2f} GiB is "
                        f"free; free space there, or set TRTC_WORK_DIR (or --output) to a larger disk")
