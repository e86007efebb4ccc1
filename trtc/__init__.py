"""trtc: ahead-of-time TensorRT engine compiler for Hugging Face causal language models."""

__version__ = "0.1.0"

from .errors import TrtcError, TrtcInternalError  # noqa: E402,F401
