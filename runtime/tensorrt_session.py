"""TensorRTSession: runs rank 0's engine on a GPU with TensorRT (either flavour).

Written against TensorRT's documented Python API (Runtime.deserialize_cuda_engine, one
IExecutionContext per optimization profile, set_input_shape / set_tensor_address on torch CUDA
tensors, execute_async_v3) and type-checked against its stubs (tests/test_typecheck.py). It cannot
run on the project's machines (no GPU; the borrowed H100/H200 have no TensorRT and reject
TensorRT-RTX engines), so it is verified only by users' GPUs; its tests skip with that reason.

What to bind, with which shapes and dtypes, and what to refuse is decided by the plain functions
of tensorrt_plan.py (tested on CPU); this class executes that plan.

Ordering: every GPU operation of the session (zeroing the cache, copying the step's inputs in,
switching profiles, the engine's kernels, copying logits out) is queued on one stream,
`self.stream`, so they run in program order; the session takes and returns host arrays, so no
work on another stream touches its buffers. The final device-to-host copy blocks until the stream
reaches it, so the returned logits are complete.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from trtc import artifact as art
from trtc.artifact import DECODE, PREFILL
from trtc.errors import TrtcError
from trtc.flavour import FLAVOURS, Flavour, import_trt, make_logger

from . import tensorrt_plan as plan
from .engine_dir import EngineDir, check_tensorrt_compat
from .session import Session

if TYPE_CHECKING:
    import tensorrt


def _gpu_sm() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major) * 10 + int(minor)


def _import_flavour(ed: EngineDir) -> tuple[Flavour, ModuleType]:
    """The TensorRT flavour that built the engine dir, and its module; TrtcError when not usable here."""
    if not isinstance(ed.config, art.EngineConfig):
        raise TrtcError(f"{ed.path} is an export dir and holds no engine; build one with `trtc build --model {ed.path}`")
    built = ed.config.tensorrt
    flavour = FLAVOURS.get(built.flavour)
    if flavour is None:
        raise TrtcError(f"{ed.path} names an unknown TensorRT flavour {built.flavour!r}; rebuild it with this trtc")
    try:
        return flavour, import_trt(flavour)
    except TrtcError as e:
        raise TrtcError(f"{ed.path} was built with {flavour.name} {built.version}, which is not usable here ({e})") from e


def _engine_tensors(engine: tensorrt.ICudaEngine) -> dict[str, plan.EngineTensor]:
    """The engine's own account of its I/O tensors: direction, dtype, aliasing."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name).name == "INPUT"
        # get_aliased_input_tensor (TensorRT-RTX 1.x, TensorRT 10.14+: the KV-cache update) is newer
        # than the 10.13 stubs.
        alias = None if is_input else engine.get_aliased_input_tensor(name)  # type: ignore[attr-defined]
        out[name] = plan.EngineTensor(is_input, engine.get_tensor_dtype(name).name, alias or None)
    return out


class TensorRTSession:
    backend = "tensorrt"

    def __init__(self, ed: EngineDir) -> None:
        self.ed, self.where = ed, str(ed.path)
        # The I/O table is checked first: on CPU, before any GPU or TensorRT work.
        plan.check_io(ed.io, ed.spec, ed.max_seq_len, self.where)
        flavour, module = _import_flavour(ed)
        if TYPE_CHECKING:
            import tensorrt as trt      # checked against tensorrt's stubs; TensorRT-RTX has the same API
        else:
            trt = module
        engine_file = check_tensorrt_compat(ed, trt, flavour.name, _gpu_sm()).file
        ed.verify([engine_file])        # sha256 and size, before TensorRT reads a byte of it
        import torch

        self.torch: Any = torch
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine((ed.path / engine_file).read_bytes())
        if engine is None:          # the stubs say ICudaEngine; TensorRT returns None on failure
            raise TrtcError(f"TensorRT could not deserialize {ed.path / engine_file}: {self._errors()}")
        self.engine = engine
        plan.check_engine_io(ed.io, ed.spec, _engine_tensors(engine), self.where)
        self.stream = torch.cuda.Stream()
        self.contexts = [self._context(profile) for profile in (PREFILL, DECODE)]
        self.cache: dict[str, Any] = {}       # past_key_values.* -> torch CUDA tensor
        self.cache_batch = 0

    def _context(self, profile: int) -> tensorrt.IExecutionContext:
        ctx = self.engine.create_execution_context()
        if not ctx.set_optimization_profile_async(profile, self.stream.cuda_stream):
            raise TrtcError(f"TensorRT refused optimization profile {profile} of {self.where}: {self._errors()}")
        return ctx

    def _errors(self) -> str:
        return "; ".join(self.logger.errors()[-3:]) or "no message"

    def _device(self, buf: plan.Buffer) -> Any:
        return self.torch.empty(buf.shape, dtype=getattr(self.torch, buf.dtype), device="cuda")

    def allocate(self, batch: int) -> None:
        ed = self.ed
        plan.check_batch(batch, ed.max_batch_size)
        with self.torch.cuda.stream(self.stream):     # zeroed on the stream the steps run on
            self.cache = {name: self._device(buf).zero_()
                          for name, buf in plan.cache_buffers(ed.io, ed.spec, batch, ed.max_seq_len).items()}
        self.cache_batch = batch

    def keep(self, rows: list[int]) -> None:
        plan.check_keep(rows, self.cache_batch)
        torch = self.torch
        with torch.cuda.stream(self.stream):          # after the steps that wrote the cache
            index = torch.tensor(rows, dtype=torch.int64, device="cuda")
            self.cache = {name: t.index_select(0, index) for name, t in self.cache.items()}
        self.cache_batch = len(rows)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray | None = None) -> np.ndarray:
        """`lengths` is not needed: a native-form engine computes the padding rows too."""
        ed, torch = self.ed, self.torch
        B, S = input_ids.shape
        plan.check_step(B, S, self.cache_batch, ed.max_batch_size, ed.max_input_len,
                        int(position_ids.max()), ed.max_seq_len)
        p = plan.step_plan(ed.io, ed.spec, B, S, ed.max_seq_len)
        ctx = self.contexts[p.profile]
        with torch.cuda.stream(self.stream):          # see the module docstring: one stream, in order
            buffers = dict(self.cache)
            for name, host in ((art.INPUT_IDS, input_ids), (art.POSITION_IDS, position_ids)):
                arr = np.ascontiguousarray(host, dtype=np.dtype(p.step_buffers[name].dtype))
                buffers[name] = torch.from_numpy(arr).to("cuda")
            buffers[art.LOGITS] = self._device(p.step_buffers[art.LOGITS])
            for name, shape in p.input_shapes.items():
                if not ctx.set_input_shape(name, shape):
                    raise TrtcError(f"TensorRT refused shape {shape} for {name} in profile {p.profile}: {self._errors()}")
            for tensor, buf in p.bindings.items():
                if not ctx.set_tensor_address(tensor, buffers[buf].data_ptr()):
                    raise TrtcError(f"TensorRT refused the address of {tensor}: {self._errors()}")
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise TrtcError(f"TensorRT execution failed: {self._errors()}")
            logits = buffers[art.LOGITS].float().cpu()    # queued after the engine; waits for it
        return logits.numpy()


def _implements_session(s: TensorRTSession) -> Session:
    return s       # the type check proves TensorRTSession has the generator's Session interface
