"""Stage 4, build: rank ONNX graph -> TensorRT parser -> strongly typed network -> engine.

Two optimization profiles: 0 = prefill (seq 1..max_input_len), 1 = decode (seq 1). The KV cache
inputs have a fixed length (max_seq_len) in both, so the same cache buffers serve both phases.

Plugin-form graphs (`--attention plugin`, full TensorRT only): trtc's plugins are registered with
TensorRT (plugins/tensorrt_plugin.py) before the ONNX parser runs, and the block pools / block
tables get profile ranges instead of the per-layer caches. Written against the documented API and
NOT run: full TensorRT cannot be installed on trtc's machines (docs/platform.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

from trtc import artifact as art
from trtc.artifact import Profile
from trtc.errors import TrtcError
from trtc.flavour import Flavour, import_trt, make_logger, sm_number
from trtc.spec import ModelSpec

from .config import BuildConfig, ExportConfig
from .direct_io import DirectWriter
from .mapped_weights import MappedWeights, _parse_with_mapped_weights, external_tensors


def check_plugin_kernels(spec: ModelSpec, ecfg: ExportConfig) -> None:
    """Plugin form: what trtc's kernels support (dtypes, head sizes; plugins/schema.py), checked
    before a full-TensorRT build. The CPU reference backend accepts more (float32, any even head size)."""
    from trtc.plugins.schema import ACT_DTYPES, PAGED_ATTENTION, SchemaError

    if ecfg.attention != "plugin":
        return
    try:
        PAGED_ATTENTION.attr_values(num_q_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                                    head_size=spec.head_dim, block_size=ecfg.kv_block_size)
        if ecfg.dtype not in ACT_DTYPES:
            raise SchemaError(f"activations are {ecfg.dtype}, the kernels take {' or '.join(ACT_DTYPES)}")
    except SchemaError as e:
        raise TrtcError(f"trtc's plugin kernels cannot build this model ({e}); use --dtype float16 for a "
                        f"float32 model, or --attention native") from None


def profiles_for(spec: ModelSpec, cfg: BuildConfig, input_names: list[str],
                 kv_block_size: int | None = None) -> list[Profile]:
    """Profiles PREFILL (seq 1..max_input_len) and DECODE (seq 1): [min, opt, max] per graph input.
    kv_block_size: plugin form (block pools + block tables) when set."""
    B, S = cfg.max_batch_size, cfg.max_input_len
    optb = min(cfg.opt_batch_size, B)

    def batch_dim(rest: tuple[int, ...], opt: int = optb, mx: int = B) -> list[list[int]]:
        return [[1, *rest], [opt, *rest], [mx, *rest]]

    out = []
    for name, (smin, sopt, smax) in (("prefill", (1, max(1, S // 2), S)), ("decode", (1, 1, 1))):
        shapes = {}
        for n in input_names:
            if n in art.TOKEN_INPUTS and kv_block_size:   # packed [1, tokens]: up to B sequences
                shapes[n] = [[1, smin], [1, optb * sopt], [1, B * smax]]
            elif n in art.TOKEN_INPUTS:
                shapes[n] = [[1, smin], [optb, sopt], [B, smax]]
            elif kv_block_size and n == art.CU_SEQLENS:
                shapes[n] = [[2], [optb + 1], [B + 1]]
            elif n.startswith(art.PAST_PREFIX):
                shapes[n] = batch_dim(art.cache_shape(1, spec.num_kv_heads, cfg.max_seq_len, spec.head_dim)[1:])
            elif kv_block_size and n == art.BLOCK_TABLES:
                shapes[n] = batch_dim((art.max_blocks(cfg.max_seq_len, kv_block_size),))
            elif kv_block_size and n.startswith(art.POOL_PREFIX):
                # pools [num_blocks, 2, Hkv, bs, D]: up to every sequence at max_seq_len
                mb = art.max_blocks(cfg.max_seq_len, kv_block_size)
                block = art.pool_shape(1, spec.num_kv_heads, kv_block_size, spec.head_dim)[1:]
                shapes[n] = batch_dim(block, optb * mb, B * mb)
            else:
                raise TrtcError(f"graph input {n!r} has no profile rule; was the graph made by trtc export?")
        out.append(Profile(name, shapes))
    return out


def _register_plugins(targets: tuple[str, ...]) -> None:
    """tensorrt.plugin keeps a global registry: register() registers once per process and sets the
    compute capability the plugin kernels are compiled for (the build's one target)."""
    from trtc.plugins.tensorrt_plugin import register

    register(targets)


def _cc_enum(trt: ModuleType, target: str) -> Any:
    return getattr(trt.ComputeCapability, "SM" + str(sm_number(target)))


def build_engine(onnx_path: Path, spec: ModelSpec, cfg: BuildConfig, flavour: Flavour,
                 engine_path: Path, kv_block_size: int | None = None, label: str | None = None) -> list[Profile]:
    """kv_block_size set: a plugin-form graph (needs flavour.plugins).

    The graph's external weights reach TensorRT as pointers into read-only memory maps of its data
    files (MappedWeights): the builder's own copy is the only one in anonymous memory (plus the
    concatenations of MatMuls it fuses, which build_engine_isolated joins on disk beforehand:
    docs/platform.md). The maps outlive the parser, network
    and builder: _build_from_maps returns only after the engine is on disk and its TensorRT objects
    are gone."""
    with MappedWeights(onnx_path) as weights:
        return _build_from_maps(onnx_path, weights, spec, cfg, flavour, engine_path, kv_block_size, label)


def _build_from_maps(onnx_path: Path, weights: MappedWeights, spec: ModelSpec, cfg: BuildConfig, flavour: Flavour,
                     engine_path: Path, kv_block_size: int | None, label: str | None) -> list[Profile]:
    if TYPE_CHECKING:
        import tensorrt as trt      # checked against tensorrt's stubs; TensorRT-RTX has the same API
    else:
        trt = import_trt(flavour)
    if kv_block_size:
        if not flavour.plugins:
            raise TrtcError(f"{flavour.name} has no plugin layer; plugin-form graphs need full TensorRT")
        _register_plugins(cfg.targets)   # trtc::RopeKvAppend / trtc::PagedAttention, before the parser meets the nodes
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    _parse_with_mapped_weights(parser, onnx_path, weights, flavour.name)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        # IAttention's layer types and boundary layer (TensorRT-RTX 1.x, TensorRT 10.14+) are newer
        # than the 10.13 stubs: hence the attr-defined ignores.
        if layer.type in (trt.LayerType.ATTENTION_INPUT, trt.LayerType.ATTENTION_OUTPUT):  # type: ignore[attr-defined]
            layer.__class__ = trt.IAttentionBoundaryLayer  # type: ignore[attr-defined]
            # fp32 attention has no fused kernel on TensorRT-RTX; allow decomposition (fused
            # kernels are still used wherever one supports the shape and type).
            layer.attention.decomposable = True  # type: ignore[attr-defined]
    config = builder.create_builder_config()
    if flavour.reproducible:
        # The default builder assigns auxiliary streams differently from one process to the next (two
        # plans, ~20 bytes apart, measured on a tiny Llama); with none, builds are byte-identical.
        # Cost at run time: the main stream runs alone; see docs/reproducible-builds.md.
        config.max_aux_streams = 0
    if flavour.name == "tensorrt_rtx":   # TensorRT-RTX's ahead-of-time targets: not in tensorrt's stubs
        config.num_compute_capabilities = len(cfg.targets)  # type: ignore[attr-defined]
        for i, t in enumerate(cfg.targets):
            config.set_compute_capability(_cc_enum(trt, t), i)  # type: ignore[attr-defined]
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    profiles = profiles_for(spec, cfg, names, kv_block_size)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for n, (mn, op, mx) in prof.shapes.items():
            # TensorRT converts a tuple to Dims (pybind11 implicit conversion); the stubs say Dims only.
            p.set_shape(n, tuple(mn), tuple(op), tuple(mx))  # type: ignore[arg-type]
        config.add_optimization_profile(p)
    monitor = _progress_monitor(trt, label or engine_path.name)
    config.progress_monitor = monitor
    # Stream the engine to disk as it is serialized: no second in-memory copy of the engine, and
    # past the page cache where the file system allows (compiler/direct_io.py says why).
    f = DirectWriter(engine_path)
    try:
        writer = _file_writer(trt, f)
        ok = builder.build_serialized_network_to_stream(network, config, writer)
    except BaseException:
        f.abort()
        engine_path.unlink(missing_ok=True)
        raise
    try:
        f.close(sync=writer.error is None)
    except OSError as e:
        writer.error = writer.error or e
    if writer.error is not None:
        import errno

        engine_path.unlink(missing_ok=True)
        err = writer.error
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrtcError(f"out of disk space writing {engine_path.name} after {writer.written / 2**30:.2f} GiB "
                            f"({err.strerror}); free space there, or point --output / TRTC_WORK_DIR at a larger disk")
        raise TrtcError(f"cannot write {engine_path.name}: {err.strerror}")
    if not ok:
        errs = "; ".join(logger.errors()[-5:]) or "no message"
        raise TrtcError(f"{flavour.name} failed to build the engine for {', '.join(cfg.targets)}: {errs}")
    # hashed as it was written: packaging the engine need not read it back (art.written_sha256)
    art.record_sha256(engine_path, writer.sha256.hexdigest(), art.file_identity(engine_path))
    return profiles


def _progress_monitor(trt: ModuleType, what: str) -> Any:
    """The builder's top-level phases, one line each on stderr as they start (the same lines on a
    terminal and in CI logs: the builder runs in a child whose output must not depend on a tty)."""
    import sys

    if TYPE_CHECKING:
        from tensorrt import IProgressMonitor
    else:
        IProgressMonitor = trt.IProgressMonitor

    class Progress(IProgressMonitor):
        def __init__(self) -> None:
            IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            if not parent_phase:
                print(f"[trtc]   {what}: {phase_name} ({num_steps} step{'s' if num_steps != 1 else ''})",
                      file=sys.stderr, flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True              # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Progress()


def _file_writer(trt: ModuleType, f: IO[bytes] | DirectWriter) -> Any:
    if TYPE_CHECKING:
        from tensorrt import IStreamWriter
    else:
        IStreamWriter = trt.IStreamWriter

    import errno
    import hashlib
    import threading

    class FileWriter(IStreamWriter):
        def __init__(self) -> None:
            IStreamWriter.__init__(self)
            self.error: OSError | None = None
            self.written = 0
            self.sha256 = hashlib.sha256()   # of the bytes written, in order: the file's sha256

        # TensorRT calls a Python writer with the chunk as bytes (64 MiB each, TensorRT-RTX 1.7; its
        # documented override); the stubs show the C++ binding's write(data: capsule, size). An
        # exception raised here is caught and logged by TensorRT, and the build still reports
        # success (seen: a full disk left a truncated engine and exit 0): the error is kept and
        # raised by the caller. The chunk is hashed on a second thread while it is written (both
        # release the GIL): a chunk costs the slower of the two, and no chunk outlives its call.
        def write(self, data: bytes) -> int:  # type: ignore[override]
            if self.error is not None:
                return 0
            hasher = threading.Thread(target=self.sha256.update, args=(data,))
            hasher.start()
            try:
                n = f.write(data)
            except OSError as e:
                self.error = e
                return 0
            finally:
                hasher.join()
            if n != len(data):     # a buffered file writes all or raises; anything else is a short write
                self.error = OSError(errno.EIO, f"short write ({n} of {len(data)} bytes)")
                return 0
            self.written += n
            return n

    return FileWriter()


def build_engine_isolated(onnx_path: Path, spec: ModelSpec, cfg: BuildConfig, flavour: Flavour,
                          engine_path: Path, kv_block_size: int | None = None) -> tuple[list[Profile], bool]:
    """build_engine in a child process without address-space randomization, with a fixed
    environment and working dir (build_worker.py says why). Returns the profiles and whether the
    build is reproducible (the flavour and the sandbox both allow it)."""
    import tempfile

    from trtc import typed_json
    from trtc.errors import TrtcInternalError

    _compile_trtc_once()
    engine_path.unlink(missing_ok=True)
    try:
        # The same short dir and relative names on every build: path lengths shape the builder's
        # allocations (docs/reproducible-builds.md), so the worker runs in a fixed-length temp dir.
        # Its "engine.plan" is a link to engine_path: the engine's bytes go straight to the output's
        # disk, never into the system temp dir (often memory-backed on CI runners) and never copied.
        with tempfile.TemporaryDirectory(prefix="trtc-build-") as cwd:
            os.symlink(engine_path.resolve(), Path(cwd) / "engine.plan")
            with _worker_graph(onnx_path, Path(cwd), engine_path):
                proc, answer = _run_worker(onnx_path, spec, cfg, flavour, engine_path, kv_block_size, Path(cwd))
        if "error" in answer:
            raise TrtcError(answer["error"])
        if proc.returncode != 0 or "profiles" not in answer:
            if proc.returncode < 0 or proc.returncode == 137:
                raise TrtcError(f"the TensorRT builder process for {engine_path.name} was killed (signal "
                                f"{-proc.returncode if proc.returncode < 0 else 9}: out of memory?); free memory "
                                f"or build on a larger machine")
            raise TrtcInternalError(f"the TensorRT build of {engine_path.name} failed (exit {proc.returncode}); "
                                    f"its traceback is above")
        if not engine_path.is_file():
            raise TrtcInternalError(f"the TensorRT build worker reported success but wrote no {engine_path.name}")
    except BaseException:
        engine_path.unlink(missing_ok=True)      # no half-written engine, even inside the output's temp dir
        raise
    if "sha256" in answer:     # hashed by the worker as it wrote, keyed on the file's identity
        art.record_sha256(engine_path, answer["sha256"], answer["identity"])
    profiles = [typed_json.from_json(Profile, p, "build worker") for p in answer["profiles"]]
    return profiles, bool(flavour.reproducible and answer.get("aslr_off"))


def _run_worker(onnx_path: Path, spec: ModelSpec, cfg: BuildConfig, flavour: Flavour, engine_path: Path,
                kv_block_size: int | None, cwd: Path) -> tuple[Any, dict]:
    """Run build_worker in cwd; its exit status and its answer (the last stdout line; {} if none)."""
    import json
    import subprocess
    import sys

    from trtc import typed_json

    from .build_worker import disable_aslr_for_exec, worker_env

    req = {"onnx": onnx_path.name, "spec": typed_json.to_json(spec), "build": typed_json.to_json(cfg),
           "flavour": flavour.name, "engine": "engine.plan", "kv_block_size": kv_block_size,
           "label": engine_path.name}
    proc = subprocess.run([sys.executable, "-m", "trtc.compiler.build_worker"], input=json.dumps(req),
                          stdout=subprocess.PIPE, text=True, cwd=cwd, env=worker_env(),
                          preexec_fn=disable_aslr_for_exec)
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = {}
    return proc, answer


@contextlib.contextmanager
def _worker_graph(onnx_path: Path, cwd: Path, engine_path: Path) -> Iterator[None]:
    """Put the graph the worker parses in cwd under onnx_path.name, its data files linked under
    their relative names. MatMuls sharing an input get their weights joined first
    (compiler/fuse_linears.py: else TensorRT-RTX joins them in memory, a second copy of ~65% of an
    8B model): the joined graph is written to cwd, the joined weights to a scratch dir next to the
    output (or under $TRTC_WORK_DIR; the system temp dir may be memory-backed), checked for free
    space first and removed when the worker is done, on failure and on SIGTERM/Ctrl-C too (they
    unwind through here). onnx_path and its data files are never written."""
    import shutil

    from trtc.log import info

    from . import fuse_linears, package

    _link_data_files(onnx_path, cwd)
    fused = fuse_linears.plan(onnx_path)
    if not fused.groups:
        os.symlink(onnx_path.resolve(), cwd / onnx_path.name)
        yield
        return
    # engine_path lies in the output's temp dir: work_dir puts scratch beside that dir.
    scratch = package.work_dir(engine_path.parent, need_bytes=fused.nbytes)
    try:
        data = scratch / f"{onnx_path.name}.joined.data"
        fused.write(cwd / onnx_path.name, data)
        os.symlink(data, cwd / data.name)
        info(f"[trtc]   {engine_path.name}: {fused.matmuls} MatMuls joined into {len(fused.groups)} "
             f"({fused.nbytes / 2**30:.2f} GiB of joined weights in {scratch})")
        yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_data_files(onnx_path: Path, cwd: Path) -> None:
    """Link each external data file the graph names (rank0.onnx.data for trtc's graphs) into the
    worker's dir under its relative name. A missing file is left for MappedWeights to report."""
    for f in sorted({t.file for t in external_tensors(onnx_path)}):
        rel = os.path.relpath(f, onnx_path.parent)
        if f.is_file() and not rel.startswith(".."):
            (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), cwd / rel)


_COMPILED = False


def _compile_trtc_once() -> None:
    """Write trtc's bytecode before the first build worker starts: a worker that compiles its modules
    from source allocates differently from one that loads .pyc files, and that alone changed the
    engine (the first build after an edit, or in a fresh editable checkout, differed from the rest)."""
    global _COMPILED
    if not _COMPILED:
        import compileall

        import trtc

        compileall.compile_dir(str(Path(trtc.__file__).parent), quiet=2)
        import trtc.compiler as compiler_pkg

        compileall.compile_dir(str(Path(compiler_pkg.__file__).parent), quiet=2)
        _COMPILED = True
