"""trtc runtime: engine dir loading, sessions (TensorRT, ONNX Runtime), generator, sampler."""

from .api import LLM, Completion  # noqa: F401
