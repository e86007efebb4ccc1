"""The GPU launcher of tensor-parallel engine dirs: one process per rank, each on its own GPU.

UNVERIFIED: written against the documented APIs (TensorRT's IExecutionContext.set_communicator,
torch.distributed's NCCL process group) and type-checked against TensorRT's stubs
(tests/test_typecheck.py), but never run: trtc's machines have no TensorRT that runs engines and
no multi-GPU machine is lent (README, "Tensor parallelism"). Its pure parts (rank -> GPU, world
size and engine checks, the set-up order) are tested on CPU (tests/runtime/test_launcher.py).

Shape: the calling process (the driver) keeps the generator and the sampler; it plans the launch
(plan_launch: every check that needs no GPU work, so too few GPUs is an error before anything
loads), verifies every rank engine's checksum, then spawns one worker per rank. Each worker sets
itself up in SETUP order: its GPU, the NCCL process group, the communicator (materialized by a
barrier), its engine, one execution context per profile, and set_communicator on each context
(a collective call: every rank makes it for profile 0, then profile 1). Every step the driver sends
the same inputs to all workers; the all-reduces run inside the engines over NCCL; rank 0 returns
the logits (the lm_head is replicated: every rank computes the same).
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trtc import artifact as art
from trtc.errors import TrtcError

from trtc.flavour import make_logger

from . import tensorrt_plan as plan
from .engine_dir import EngineDir, check_tensorrt_compat, load_engine_dir
from .session import Session
from .tensorrt_session import TensorRTSession, _engine_tensors, _import_flavour

if TYPE_CHECKING:
    import tensorrt

RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class RankLaunch:
    """What one worker process is started with."""

    rank: int
    world_size: int
    device: int            # CUDA device index (of the devices visible to the driver)
    engine: str            # its engine file (the one holding kernels for that GPU)
    env: dict[str, str]    # torch.distributed rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK


def plan_launch(ed: EngineDir, gpu_sms: list[int], port: int) -> list[RankLaunch]:
    """One launch per rank: rank r on visible GPU r, with rank r's engine for that GPU. gpu_sms: the
    compute capability of each visible GPU (e.g. [90, 90]). TrtcError, before anything loads, when
    there are fewer GPUs than ranks or a GPU has no engine of its rank."""
    cfg = ed.config
    if not isinstance(cfg, art.EngineConfig):
        raise TrtcError(f"{ed.path} is an export dir and holds no engine; build one with `trtc build --model {ed.path}`")
    world, tp = cfg.mapping.world_size, cfg.mapping.tp_size
    if len(gpu_sms) < world:
        raise TrtcError(f"{ed.path} has {world} ranks (tp {tp}), each needing its own GPU, but {len(gpu_sms)} "
                        f"GPU{'s are' if len(gpu_sms) != 1 else ' is'} visible; run it on a machine with {world} GPUs "
                        f"(CUDA_VISIBLE_DEVICES), or use --backend onnxruntime (CPU, with --keep-onnx)")
    launches = []
    for r in range(world):
        sm = gpu_sms[r]
        engine = cfg.engine_for(r, sm)
        if engine is None:
            raise TrtcError(f"{ed.path} has no rank {r} engine for GPU {r} (sm_{sm}); it was built for "
                            f"{', '.join(cfg.tensorrt.targets)}: rebuild with --target sm_{sm}")
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(r)}
        launches.append(RankLaunch(r, world, r, engine.file, env))
    return launches


# Worker set-up, in order; each step names the steps it needs before it (check_setup_order).
SETUP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("select_device", ()),                                     # torch.cuda.set_device: NCCL binds to it
    ("init_process_group", ("select_device",)),                # NCCL process group over the env rendezvous
    ("materialize_communicator", ("init_process_group",)),     # torch creates the NCCL comm lazily: a barrier
    ("load_engine", ("select_device",)),                       # deserialize on this rank's GPU
    ("create_contexts", ("load_engine",)),                     # one per optimization profile
    ("set_communicator", ("create_contexts", "materialize_communicator")),  # collective: all ranks, same order
)


def check_setup_order(steps: tuple[tuple[str, tuple[str, ...]], ...] = SETUP) -> None:
    """TrtcInternalError when a step comes before one it needs."""
    from trtc.errors import TrtcInternalError

    done: set[str] = set()
    for name, needs in steps:
        missing = [n for n in needs if n not in done]
        if missing:
            raise TrtcInternalError(f"launcher set-up: {name} runs before {', '.join(missing)}")
        done.add(name)


def visible_gpu_sms() -> list[int]:
    """Compute capability of each GPU torch sees ([] without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [int(a) * 10 + int(b) for a, b in (torch.cuda.get_device_capability(i)
                                              for i in range(torch.cuda.device_count()))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_view(ed: EngineDir) -> EngineDir:
    """The dir as one rank sees it: the spec's head counts and MLP width are the rank's (cache
    buffers, I/O checks)."""
    spec = art.rank_spec(ed.spec, ed.config.mapping.tp_size)
    return EngineDir(ed.path, dataclasses.replace(ed.config, pretrained_config=spec))


def verify_rank_engines(ed: EngineDir, launches: list[RankLaunch]) -> None:
    """sha256 of every rank's engine against config.json, in the driver, before any worker starts;
    a mismatch names the rank (a rank engine of another build, or a damaged one)."""
    cfg = ed.config
    assert isinstance(cfg, art.EngineConfig)
    for launch in launches:
        try:
            ed.verify([launch.engine])
        except TrtcError as e:
            raise TrtcError(f"rank {launch.rank}: {e} (config.json binds each rank engine of build "
                            f"{cfg.fingerprint} by its sha256: an engine of another build cannot be mixed in)") from None


def nccl_communicator(torch: Any, dist: Any) -> Any:
    """The default process group's NCCL communicator as a PyCapsule (what set_communicator takes).
    ProcessGroupNCCL._comm_ptr() is torch's (private) accessor of the ncclComm_t."""
    import ctypes

    ptr = dist.group.WORLD._get_backend(torch.device("cuda"))._comm_ptr()
    if not ptr:
        raise TrtcError("torch.distributed has not created the NCCL communicator (comm pointer 0); "
                        "the barrier before set_communicator must run first")
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ptr, None, None)


class _RankSetup:
    """A worker's set-up, one method per SETUP step (run in that order by run_setup)."""

    def __init__(self, path: str, launch: RankLaunch):
        self.path, self.launch = path, launch
        self.session: Any = None
        self.communicator: Any = None

    def select_device(self) -> None:
        import torch

        torch.cuda.set_device(self.launch.device)

    def init_process_group(self) -> None:
        import torch
        import torch.distributed as dist

        e = self.launch.env
        dist.init_process_group("nccl", init_method=f"tcp://{e['MASTER_ADDR']}:{e['MASTER_PORT']}",
                                rank=self.launch.rank, world_size=self.launch.world_size,
                                device_id=torch.device("cuda", self.launch.device))

    def materialize_communicator(self) -> None:
        import torch
        import torch.distributed as dist

        dist.barrier(device_ids=[self.launch.device])
        self.communicator = nccl_communicator(torch, dist)

    def load_engine(self) -> None:
        self.session = TensorRTRankSession(rank_view(load_engine_dir(self.path)), self.launch)

    def create_contexts(self) -> None:
        self.session.create_contexts()

    def set_communicator(self) -> None:
        self.session.set_communicator(self.communicator)


def run_setup(setup: Any, steps: tuple[tuple[str, tuple[str, ...]], ...] = SETUP) -> None:
    check_setup_order(steps)
    for name, _ in steps:
        getattr(setup, name)()


class TensorRTRankSession(TensorRTSession):
    """One rank's engine on its GPU: TensorRTSession's buffers and steps over a rank view of the
    dir (rank head counts), with this rank's engine and the NCCL communicator on its contexts."""

    def __init__(self, ed: EngineDir, launch: RankLaunch) -> None:
        if TYPE_CHECKING:
            import tensorrt as trt      # checked against tensorrt's stubs; TensorRT-RTX has the same API
        else:
            trt = _import_flavour(ed)[1]
        import torch

        self.ed, self.where = ed, f"{ed.path} (rank {launch.rank})"
        plan.check_io(ed.io, ed.spec, ed.max_seq_len, self.where)
        self.torch = torch
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine((ed.path / launch.engine).read_bytes())
        if engine is None:
            raise TrtcError(f"TensorRT could not deserialize {ed.path / launch.engine}: {self._errors()}")
        self.engine = engine
        plan.check_engine_io(ed.io, ed.spec, _engine_tensors(engine), self.where)
        self.stream = torch.cuda.Stream()
        self.contexts: list[tensorrt.IExecutionContext] = []
        self.cache: dict[str, Any] = {}
        self.cache_batch = 0

    def create_contexts(self) -> None:
        self.contexts = [self._context(profile) for profile in (art.PREFILL, art.DECODE)]

    def set_communicator(self, communicator: Any) -> None:
        for profile, ctx in enumerate(self.contexts):
            # set_communicator (TensorRT 10.16+, TensorRT-RTX 1.7) is newer than the 10.13 stubs.
            if not ctx.set_communicator(communicator):  # type: ignore[attr-defined]
                raise TrtcError(f"TensorRT refused the NCCL communicator for profile {profile} of {self.where}: "
                                f"{self._errors()}")


# --- driver <-> worker ----------------------------------------------------------------------------

def _worker(path: str, launch: RankLaunch, conn: Any) -> None:
    """Worker process main: set up, then serve ("allocate", b) / ("keep", rows) / ("step", ids, pos)
    / ("close",) until closed. Replies ("ok", value) or ("error", message)."""
    import os

    os.environ.update(launch.env)
    try:
        setup = _RankSetup(path, launch)
        run_setup(setup)
        session = setup.session
        conn.send(("ok", None))
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            if msg[0] == "allocate":
                session.allocate(msg[1])
                conn.send(("ok", None))
            elif msg[0] == "keep":
                session.keep(msg[1])
                conn.send(("ok", None))
            elif msg[0] == "step":
                logits = session.step(msg[1], msg[2])
                conn.send(("ok", logits if launch.rank == 0 else None))
    except TrtcError as e:
        conn.send(("error", str(e)))
    except Exception as e:       # noqa: BLE001  (the driver reports it with the rank)
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class TensorRTTPSession:
    """The Session (runtime/session.py) of a tensor-parallel engine dir on this machine's GPUs."""

    backend = "tensorrt"

    def __init__(self, ed: EngineDir, gpu_sms: list[int] | None = None) -> None:
        import multiprocessing as mp

        sms = visible_gpu_sms() if gpu_sms is None else gpu_sms
        launches = plan_launch(ed, sms, free_port())       # too few GPUs: an error before anything loads
        flavour, trt = _import_flavour(ed)
        check_tensorrt_compat(ed, trt, flavour.name, sms[0])   # flavour and version, before any process starts
        verify_rank_engines(ed, launches)
        ctx = mp.get_context("spawn")   # CUDA cannot be used in a forked child
        self.conns, self.procs = [], []
        for launch in launches:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(str(ed.path), launch, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._gather()                  # every rank set up (or the first error)

    def _gather(self) -> list:
        out, errors = [], []
        for r, conn in enumerate(self.conns):
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", f"the process exited (code {self.procs[r].exitcode})"
            if status != "ok":
                errors.append(f"rank {r}: {value}")
            out.append(value)
        if errors:
            self.close()
            raise TrtcError(f"tensor-parallel run failed: {errors[0]}")
        return out

    def _all(self, *msg: Any) -> list:
        for conn in self.conns:
            conn.send(msg)
        return self._gather()

    def allocate(self, batch: int) -> None:
        self._all("allocate", batch)

    def keep(self, rows: list[int]) -> None:
        self._all("keep", rows)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray | None = None) -> np.ndarray:
        logits: np.ndarray = self._all("step", np.asarray(input_ids), np.asarray(position_ids))[0]
        return logits

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.conns, self.procs = [], []


def _implements_session(s: TensorRTTPSession) -> Session:
    return s       # the type check proves the launcher's session has the generator's interface

