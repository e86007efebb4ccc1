"""OnnxRuntimeTPSession: every tensor-parallel rank graph of a dir on CPU, in one process.

One ONNX Runtime session per rank, each stepped in its own thread. The graphs' DistCollective nodes
(all_reduce, sum) cannot run in ONNX Runtime, so each is rewritten at load time (in memory and a
temp copy of the graph; the dir's file is untouched) to a Python custom op (onnxruntime-extensions
PyOp, as runtime/ort_plugin_session.py registers trtc's plugins) whose function all-reduces across
the rank threads: every rank deposits its partial sum, waits at a barrier, and all receive the same
sum, added in rank order. PyOps take float32 only, so a float16 graph's collectives are wrapped in
Casts (the sum is computed in float32 and rounded once, as NCCL's fp16 all-reduce of two ranks does).

The lm_head is replicated, so every rank computes the same logits; rank 0's are returned. The
generator drives this session like any other (runtime/session.py).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from trtc import artifact as art
from trtc.errors import TrtcError

from .engine_dir import EngineDir
from .ort_session import session_options

DOMAIN, OP = "trtc_tp", "AllReduce"       # the PyOp a DistCollective becomes
_TYPES = {"float32": np.float32, "float16": np.float16}
_GROUPS: dict[int, "RankGroup"] = {}     # group id (a node attribute) -> the live group
_NEXT_ID = itertools.count(1)
_REGISTERED = False


class RankGroup:
    """An in-process communicator of `size` ranks (threads). all_reduce(rank, x) returns the sum of
    every rank's x, in rank order, to every rank; abort() releases ranks waiting on a failed peer."""

    def __init__(self, size: int, timeout: float = 600.0):
        self.size = size
        self.id = next(_NEXT_ID)
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list = [None] * size
        self._sum = None
        _GROUPS[self.id] = self

    def all_reduce(self, rank: int, x: np.ndarray) -> np.ndarray:
        self._slots[rank] = x
        self._barrier.wait()              # every rank's x is in
        if rank == 0:
            total = self._slots[0].astype(np.float32, copy=True)
            for part in self._slots[1:]:
                total += part
            self._sum = total
        self._barrier.wait()              # the sum is ready; slots may be refilled after the next first wait
        return self._sum

    def abort(self) -> None:
        self._barrier.abort()

    def close(self) -> None:
        _GROUPS.pop(self.id, None)


def _all_reduce_op(x, **attrs):
    group = _GROUPS.get(int(attrs["group"]))
    if group is None:
        raise RuntimeError(f"trtc tp: no rank group {attrs['group']} (the session was closed)")
    return group.all_reduce(int(attrs["rank"]), x)


def register_all_reduce() -> str:
    """Register the all-reduce PyOp (once per process); returns the custom op library path."""
    global _REGISTERED
    from onnxruntime_extensions import PyCustomOpDef as T
    from onnxruntime_extensions import get_library_path, onnx_op

    if not _REGISTERED:
        onnx_op(op_type=f"{DOMAIN}::{OP}", inputs=[T.dt_float], outputs=[T.dt_float],
                attrs={"rank": T.dt_int64, "group": T.dt_int64})(_all_reduce_op)
        _REGISTERED = True
    return get_library_path()


def rewrite_collectives(model, rank: int, group: int, float16: bool) -> int:
    """DistCollective(all_reduce, sum) -> the PyOp, in `model` (a ModelProto); returns how many.
    Anything else (another collective or reduction) is a TrtcError."""
    from onnx import TensorProto, helper

    nodes, n = [], 0
    for node in model.graph.node:
        if node.op_type != "DistCollective" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kind = (attrs.get("collective_operation"), attrs.get("reduce_op"))
        if kind != (b"all_reduce", b"sum"):
            raise TrtcError(f"{node.name}: DistCollective {kind[0]!r}/{kind[1]!r} has no reference implementation "
                            f"(trtc writes all_reduce/sum only); rebuild with this trtc")
        x, y = node.input[0], node.output[0]
        if float16:
            nodes.append(helper.make_node("Cast", [x], [f"{x}__f32"], to=TensorProto.FLOAT, name=f"{node.name}__in"))
            x, y = f"{x}__f32", f"{y}__f32"
        nodes.append(helper.make_node(OP, [x], [y], domain=DOMAIN, name=node.name, rank=rank, group=group))
        if float16:
            nodes.append(helper.make_node("Cast", [y], [node.output[0]], to=TensorProto.FLOAT16,
                                          name=f"{node.name}__out"))
        n += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return n


def check_rank_stamps(ed: EngineDir) -> list[art.RankGraph]:
    hint = "re-run trtc export" if ed.is_export else "rebuild the engine dir (trtc build --keep-onnx)"
    return art.check_rank_stamps(ed.path, ed.config, hint)


def check_rank_graphs(ed: EngineDir) -> list[art.RankGraph]:
    """check_rank_stamps, then every rank file's sha256 against the dir's config."""
    graphs = check_rank_stamps(ed)
    ed.verify([n for g in graphs for n in (g.file, g.data)])
    return graphs


def _link_or_copy(src: Path, dst: Path) -> None:
    """ONNX Runtime reads external data next to the graph only (no symlinks out of its dir)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _RankSession:
    """One rank's graph on ONNX Runtime, its collectives rewritten; KV cache as in OnnxRuntimeSession."""

    def __init__(self, ed: EngineDir, g: art.RankGraph, group: RankGroup, threads: int):
        import onnx
        import onnxruntime as ort

        so = session_options(threads)
        so.register_custom_ops_library(register_all_reduce())
        if ed.quantized:      # as OnnxRuntimeSession: compute the quantized graph as written
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        model = onnx.load(str(ed.path / g.file), load_external_data=False)
        rewrite_collectives(model, g.rank, group.id, ed.dtype == "float16")
        tmp = Path(tempfile.mkdtemp(prefix=f"trtc-tp-rank{g.rank}-"))
        try:
            _link_or_copy(ed.path / g.data, tmp / g.data)
            onnx.save_model(model, str(tmp / g.file))
            self.sess = ort.InferenceSession(str(tmp / g.file), so, providers=["CPUExecutionProvider"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        past = ed.io.input(art.past_name(0, "key"))
        self.kv_heads = int(past.shape[1]) if past is not None else art.kv_heads_per_rank(
            ed.spec.num_kv_heads, ed.config.mapping.tp_size)
        self.ed = ed
        self.names = art.cache_names(ed.spec.num_layers)
        self.cache: list = []

    def allocate(self, batch: int) -> None:
        import onnxruntime as ort

        s = self.ed.spec
        zeros = np.zeros(art.cache_shape(batch, self.kv_heads, self.ed.max_seq_len, s.head_dim),
                         dtype=_TYPES[self.ed.dtype])
        self.cache = [ort.OrtValue.ortvalue_from_numpy(zeros.copy()) for _ in self.names]

    def keep(self, rows: list[int]) -> None:
        import onnxruntime as ort

        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows])) for v in self.cache]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        io = self.sess.io_binding()
        io.bind_output(art.LOGITS)
        io.bind_cpu_input(art.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(art.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        for (past, present), value in zip(self.names, self.cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy().astype(np.float32, copy=False)


class OnnxRuntimeTPSession:
    """All ranks of a tensor-parallel dir as one Session (runtime/session.py)."""

    backend = "onnxruntime"

    def __init__(self, ed: EngineDir, threads: int | None = None):
        if ed.attention != "native":
            raise TrtcError(f"{ed.path}: tensor-parallel {ed.attention}-form graphs have no reference backend; "
                            f"rebuild with --attention native")
        if ed.dtype not in _TYPES:
            raise TrtcError(f"ONNX Runtime's CPU provider has no {ed.dtype} kernels for this graph; "
                            f"build with --dtype float16 or float32 to check numerics on CPU")
        graphs = check_rank_graphs(ed)
        world = len(graphs)
        self.group = RankGroup(world)
        per_rank = threads or max(1, (os.cpu_count() or 1) // world)
        self.ranks = [_RankSession(ed, g, self.group, per_rank) for g in graphs]
        self.pool = ThreadPoolExecutor(max_workers=world, thread_name_prefix="trtc-tp-rank")

    def _each(self, fn) -> list:
        """fn(rank session) on every rank at once; a failure on one rank releases the others."""
        futures = [self.pool.submit(fn, r) for r in self.ranks]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in futures if f.done()):
            self.group.abort()               # ranks waiting for the failed one give up
            wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return [f.result() for f in futures]

    def allocate(self, batch: int) -> None:
        for r in self.ranks:
            r.allocate(batch)

    def keep(self, rows: list[int]) -> None:
        for r in self.ranks:
            r.keep(rows)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray | None = None) -> np.ndarray:
        return self._each(lambda r: r.step(input_ids, position_ids))[0]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.group.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:      # noqa: BLE001  (interpreter shutdown)
            pass


def open_tp_session(ed: EngineDir, backend: str):
    """The Session of a tensor-parallel dir: the GPU launcher (runtime/launcher.py: TensorRT, one
    process per rank) or every rank on CPU here. auto: the GPUs when this machine can run the
    engines, else the rank graphs on ONNX Runtime."""
    has_graphs = ed.config.rank_graph(0) is not None
    if ed.is_export:
        if backend == "tensorrt":
            raise TrtcError(f"cannot run {ed.path} with the TensorRT backend: an export dir holds no engine (build "
                            f"one with `trtc build --model DIR`); use --backend onnxruntime")
        return OnnxRuntimeTPSession(ed)
    if backend == "onnxruntime":
        return OnnxRuntimeTPSession(ed)
    from .launcher import TensorRTTPSession

    try:
        return TensorRTTPSession(ed)
    except TrtcError as e:
        if backend == "tensorrt":
            raise
        if not has_graphs:
            raise TrtcError(f"cannot run {ed.path}: TensorRT is not usable here ({e}), and the dir holds no ONNX "
                            f"rank graphs for the onnxruntime backend (rebuild with --keep-onnx)") from None
        from trtc.log import info

        info(f"[trtc] TensorRT backend not usable here ({e}); running the {ed.config.mapping.world_size} rank "
             f"graphs on onnxruntime")
    return OnnxRuntimeTPSession(ed)
