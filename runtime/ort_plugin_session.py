"""OnnxRuntimePluginSession: the reference backend for plugin-form graphs (`--attention plugin`).

The trtc::RopeKvAppend / trtc::PagedAttention nodes run as ONNX Runtime custom ops written in
Python (onnxruntime-extensions PyOp, domain "trtc"), each calling the torch reference of exactly
the declared semantics (plugins/reference.py: rope_kv_append_numpy, paged_attention_numpy). The KV
cache is the paged one (runtime/paged_kv.py): block pools per layer + block tables, fed as
`past_kv_pool.i` / `block_tables`, the updated pools read back from `present_kv_pool.i`.

PyOp kernels only take float32/int32 tensors here (onnxruntime-extensions has no float16 PyOp type),
so for a float16 graph each plugin node is wrapped at load time in Casts: float16 -> float32 on its
activation/pool inputs (exact) and float32 -> float16 on its outputs. The pool and q_rot are then
rounded to float16 exactly where a float16 plugin stores them, so the semantics are those of the
float16 plugins. The graph file in the engine/export dir is not modified (the wrapped copy lives
in a temp dir next to a hard link to, or a copy of, the weights).

Slow (Python per layer per step, the pool copied through the op), and meant for proofs of numerics
on tiny and small models, not for serving.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from trtc import artifact as art
from trtc.errors import TrtcError
from trtc.plugins import reference
from trtc.plugins.schema import ACT_DTYPES, NAMESPACE, PAGED_ATTENTION, POOL_DTYPES, ROPE_KV_APPEND, PluginSpec

from .engine_dir import EngineDir
from .ort_session import checked_rank_graph, session_options
from .paged_kv import PagedKVCache

_TYPES = {"float32": np.float32, "float16": np.float16}
_REGISTERED = False


def _attr_types(spec: PluginSpec) -> dict:
    from onnxruntime_extensions import PyCustomOpDef as T

    return {a.name: {int: T.dt_int64, float: T.dt_float, str: T.dt_string}[a.type] for a in spec.attrs}


def _in_types(spec: PluginSpec) -> list:
    from onnxruntime_extensions import PyCustomOpDef as T

    return [T.dt_int32 if ts.dtypes == ("int32",) else T.dt_float for ts in spec.inputs]


def register_custom_ops() -> str:
    """Register the trtc plugins as PyOps (once per process); returns the custom op library path."""
    global _REGISTERED
    from onnxruntime_extensions import PyCustomOpDef as T
    from onnxruntime_extensions import get_library_path, onnx_op

    if not _REGISTERED:
        onnx_op(op_type=f"{NAMESPACE}::{ROPE_KV_APPEND.name}", inputs=_in_types(ROPE_KV_APPEND),
                outputs=[T.dt_float, T.dt_float], attrs=_attr_types(ROPE_KV_APPEND))(reference.rope_kv_append_numpy)
        onnx_op(op_type=f"{NAMESPACE}::{PAGED_ATTENTION.name}", inputs=_in_types(PAGED_ATTENTION),
                outputs=[T.dt_float], attrs=_attr_types(PAGED_ATTENTION))(reference.paged_attention_numpy)
        _REGISTERED = True
    return get_library_path()


def _cast_plugins_to_f32(model) -> None:
    """Wrap every trtc node of a float16 graph in Casts (see the module docstring)."""
    from onnx import TensorProto, helper

    specs = {ROPE_KV_APPEND.name: ROPE_KV_APPEND, PAGED_ATTENTION.name: PAGED_ATTENTION}
    new_nodes = []
    for node in model.graph.node:
        spec = specs.get(node.op_type) if node.domain == NAMESPACE else None
        if spec is None:
            new_nodes.append(node)
            continue
        for j, ts in enumerate(spec.inputs):
            if ts.dtypes in (ACT_DTYPES, POOL_DTYPES):
                name = f"{node.input[j]}__f32_for_{node.name}"
                new_nodes.append(helper.make_node("Cast", [node.input[j]], [name], to=TensorProto.FLOAT,
                                                  name=name))
                node.input[j] = name
        casts = []
        for j in range(len(node.output)):
            name = f"{node.output[j]}__f32"
            casts.append(helper.make_node("Cast", [name], [node.output[j]], to=TensorProto.FLOAT16, name=name))
            node.output[j] = name
        new_nodes += [node] + casts
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def _link_or_copy(src: Path, dst: Path) -> None:
    """ONNX Runtime refuses external data reached through a symlink out of the model's dir: hard-link
    the weights next to the wrapped graph (copy when the temp dir is on another file system)."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class OnnxRuntimePluginSession:
    backend = "onnxruntime"

    def __init__(self, ed: EngineDir, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        onnx_file = checked_rank_graph(ed, "rebuild it with `trtc build --keep-onnx`, or run the export dir")
        if ed.dtype not in _TYPES:
            raise TrtcError(f"the reference backend runs plugin-form graphs in float32 or float16, not {ed.dtype}; "
                            f"export with --dtype float16 or float32 to check numerics on CPU")
        so = session_options(threads)
        so.register_custom_ops_library(register_custom_ops())
        path = ed.path / onnx_file
        self._tmp = None
        if ed.dtype == "float16":
            self._tmp = Path(tempfile.mkdtemp(prefix="trtc-ort-plugin-"))
            model = onnx.load(str(path), load_external_data=False)
            _cast_plugins_to_f32(model)
            _link_or_copy(ed.path / art.onnx_data(onnx_file), self._tmp / art.onnx_data(onnx_file))
            path = self._tmp / onnx_file
            onnx.save_model(model, str(path))
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        self.ed = ed
        s = ed.spec
        self.names = art.pool_names(s.num_layers)
        self.kv = PagedKVCache(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                               block_size=ed.kv_block_size, max_seq_len=ed.max_seq_len, dtype=_TYPES[ed.dtype])

    def allocate(self, batch: int) -> None:
        self.kv.allocate(batch)

    def keep(self, rows: list[int]) -> None:
        self.kv.keep(rows)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray | None = None) -> np.ndarray:
        B, S = input_ids.shape
        lens = np.full(B, S, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        ids = np.concatenate([input_ids[b, :n] for b, n in enumerate(lens)]).astype(np.int64)[None]
        pos = np.concatenate([position_ids[b, :n] for b, n in enumerate(lens)]).astype(np.int64)[None]
        self.kv.reserve(pos[0, cu[1:] - 1] + 1)      # the graph's seq_lens
        feeds = {art.INPUT_IDS: ids, art.POSITION_IDS: pos, art.CU_SEQLENS: cu,
                 art.BLOCK_TABLES: self.kv.block_tables()}
        for (past, _), pool in zip(self.names, self.kv.pools):
            feeds[past] = pool
        outs = self.sess.run([art.LOGITS] + [present for _, present in self.names], feeds)
        self.kv.pools = list(outs[1:])
        packed = outs[0][0]                           # [tokens, vocab]
        logits = np.zeros((B, S, packed.shape[-1]), dtype=np.float32)
        for b in range(B):
            logits[b, :lens[b]] = packed[cu[b]:cu[b + 1]]
        return logits
