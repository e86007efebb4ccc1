"""Typed, validated configs for export and build, each with a fingerprint.

A fingerprint covers exactly the fields that change the produced graph or engine; it names cache
entries and is stamped in config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trtc.errors import TrtcError

from trtc.spec import fingerprint_of

DTYPES = ("float16", "bfloat16", "float32")


def resolve_dtype(requested: str, source_dtype: str) -> str:
    """`auto` keeps the model's own dtype (float32 for anything unusual)."""
    if requested == "auto":
        return source_dtype if source_dtype in DTYPES else "float32"
    if requested not in DTYPES:
        raise TrtcError(f"--dtype {requested!r} is not supported; use auto, {', '.join(DTYPES)}")
    return requested


ATTENTIONS = ("native", "plugin")
DEFAULT_KV_BLOCK_SIZE = 16


def resolve_attention(attention: str | None, kv_block_size: int | None) -> tuple[str, int | None]:
    """(--attention, --kv-block-size) -> (lowering, block size or None for native); checked early."""
    from trtc.plugins.schema import BLOCK_SIZES

    attention = attention or "native"
    if attention not in ATTENTIONS:
        raise TrtcError(f"--attention {attention!r} is unknown; use one of {', '.join(ATTENTIONS)}")
    if attention == "native":
        if kv_block_size is not None:
            raise TrtcError(f"--kv-block-size {kv_block_size} applies to the paged KV cache of --attention plugin; "
                            f"drop it or add --attention plugin")
        return attention, None
    bs = DEFAULT_KV_BLOCK_SIZE if kv_block_size is None else kv_block_size
    if bs not in BLOCK_SIZES:
        raise TrtcError(f"--kv-block-size {bs} is not supported by trtc's plugins; use one of "
                        f"{', '.join(map(str, BLOCK_SIZES))}")
    return attention, bs


@dataclass(frozen=True)
class ExportConfig:
    dtype: str            # resolved: float16 | bfloat16 | float32
    max_seq_len: int      # KV cache length and rotary cache rows; prompt + generated tokens
    opset: int = 23       # exporter fuses Attention/RotaryEmbedding/RMSNormalization at 23; passes add TensorScatter-24
    attention: str = "native"          # "native": ONNX Attention/RotaryEmbedding/TensorScatter, per-layer caches;
                                       # "plugin": trtc::RopeKvAppend/PagedAttention, paged KV (block pools)
    kv_block_size: int | None = None   # tokens per KV block (plugin form only)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TrtcError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if (self.attention, self.kv_block_size) != resolve_attention(self.attention, self.kv_block_size):
            raise TrtcError(f"--attention plugin needs a KV block size (got {self.kv_block_size})")
        if self.max_seq_len < 2:
            raise TrtcError(f"--max-seq-len {self.max_seq_len} is too small; use at least 2")

    def fingerprint(self) -> str:
        return fingerprint_of(self)


@dataclass(frozen=True)
class BuildConfig:
    max_batch_size: int
    max_input_len: int    # longest prompt (prefill profile upper bound on sequence length)
    max_seq_len: int      # prompt + generated tokens (KV cache length)
    targets: tuple[str, ...]  # compute capabilities, e.g. ("sm_89", "sm_120")
    opt_batch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_len", "max_seq_len"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise TrtcError(f"{flag} {getattr(self, name)} must be at least 1")
        if self.max_input_len > self.max_seq_len:
            raise TrtcError(
                f"--max-input-len {self.max_input_len} exceeds --max-seq-len {self.max_seq_len}; "
                f"raise --max-seq-len or lower --max-input-len"
            )
        if not self.targets:
            raise TrtcError("no --target given; name at least one compute capability, e.g. sm_89")

    def fingerprint(self) -> str:
        return fingerprint_of(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d
