"""Option resolution for export and build: turn CLI/API values into the typed configs of the
artifact contract (trtc/artifact.py: ExportConfig, BuildConfig), checked early."""

from __future__ import annotations

from trtc.artifact import (ATTENTIONS, DEFAULT_KV_BLOCK_SIZE, DTYPES, KV_BLOCK_SIZES, BuildConfig,
                           ExportConfig)
from trtc.errors import TrtcError

__all__ = ["BuildConfig", "ExportConfig", "resolve_attention", "resolve_dtype"]


def resolve_dtype(requested: str, source_dtype: str) -> str:
    """`auto` keeps the model's own dtype (float32 for anything unusual)."""
    if requested == "auto":
        return source_dtype if source_dtype in DTYPES else "float32"
    if requested not in DTYPES:
        raise TrtcError(f"--dtype {requested!r} is not supported; use auto, {', '.join(DTYPES)}")
    return requested


def resolve_attention(attention: str | None, kv_block_size: int | None) -> tuple[str, int | None]:
    """(--attention, --kv-block-size) -> (lowering, block size or None for native); checked early."""
    attention = attention or "native"
    if attention not in ATTENTIONS:
        raise TrtcError(f"--attention {attention!r} is unknown; use one of {', '.join(ATTENTIONS)}")
    if attention == "native":
        if kv_block_size is not None:
            raise TrtcError(f"--kv-block-size {kv_block_size} applies to the paged KV cache of --attention plugin; "
                            f"drop it or add --attention plugin")
        return attention, None
    bs = DEFAULT_KV_BLOCK_SIZE if kv_block_size is None else kv_block_size
    if bs not in KV_BLOCK_SIZES:
        raise TrtcError(f"--kv-block-size {bs} is not supported by trtc's plugins; use one of "
                        f"{', '.join(map(str, KV_BLOCK_SIZES))}")
    return attention, bs
