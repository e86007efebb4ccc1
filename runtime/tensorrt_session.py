"""TensorRTSession: runs rank0.engine on a GPU with TensorRT (either flavour).

Written against TensorRT's documented Python API (Runtime.deserialize_cuda_engine, one
IExecutionContext per optimization profile, set_input_shape / set_tensor_address on torch CUDA
tensors, execute_async_v3). It cannot run on the project's machines (no GPU; the borrowed
H100/H200 have no TensorRT and reject TensorRT-RTX engines), so it is verified only by users'
GPUs; its tests skip with that reason.

The KV cache buffers are bound as both the `past_key_values.*` input and the `present.*` output:
IKVCacheUpdateLayer updates the cache in place (the engine reports the output as aliased to the
input).
"""

from __future__ import annotations

import numpy as np

from trtc.flavour import FLAVOURS, Flavour, import_trt, make_logger
from trtc.errors import TrtcError

from .engine_dir import EngineDir, check_tensorrt_compat
from .session import cache_names

PREFILL, DECODE = 0, 1   # optimization profile indices written by compiler/build.py


def _gpu_sm() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


class TensorRTSession:
    backend = "tensorrt"

    def __init__(self, ed: EngineDir):
        flavour: Flavour = FLAVOURS.get(ed.config["tensorrt"]["flavour"])
        if flavour is None:
            raise TrtcError(f"{ed.path} names an unknown TensorRT flavour {ed.config['tensorrt']['flavour']!r}")
        built = ed.config["tensorrt"]
        try:
            trt = import_trt(flavour)
        except TrtcError as e:
            raise TrtcError(f"{ed.path} was built with {flavour.name} {built['version']}, which is not "
                            f"usable here ({e})") from e
        ed.verify([ed.engine_file])
        check_tensorrt_compat(ed, trt, flavour.name, _gpu_sm())
        import torch

        self.torch = torch
        self.ed = ed
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        blob = (ed.path / ed.engine_file).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise TrtcError(f"TensorRT could not deserialize {ed.path / ed.engine_file}: "
                            f"{'; '.join(self.logger.errors()[-3:])}")
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for profile in (PREFILL, DECODE):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.names = cache_names(ed.spec.num_layers)
        self.dtype = getattr(torch, ed.dtype)
        self.cache: list = []

    def allocate(self, batch: int) -> None:
        s = self.ed.spec
        shape = (batch, s.num_kv_heads, self.ed.max_seq_len, s.head_dim)
        self.cache = [self.torch.zeros(shape, dtype=self.dtype, device="cuda") for _ in self.names]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        B, S = input_ids.shape
        ctx = self.contexts[PREFILL if S > 1 else DECODE]
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).cuda()
        pos = torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)).cuda()
        logits = torch.empty((B, S, self.ed.spec.vocab_size), dtype=self.dtype, device="cuda")
        for name, t in (("input_ids", ids), ("position_ids", pos)):
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for (past, present), buf in zip(self.names, self.cache):
            ctx.set_input_shape(past, tuple(buf.shape))
            ctx.set_tensor_address(past, buf.data_ptr())
            ctx.set_tensor_address(present, buf.data_ptr())
        ctx.set_tensor_address("logits", logits.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise TrtcError(f"TensorRT execution failed: {'; '.join(self.logger.errors()[-3:])}")
        self.stream.synchronize()
        return logits.float().cpu().numpy()
