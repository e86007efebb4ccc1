"""Option resolution for export and build: turn CLI/API values into the typed configs of the
artifact contract (trtc/artifact.py: ExportConfig, BuildConfig), checked early."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trtc.artifact import (ATTENTIONS, DEFAULT_KV_BLOCK_SIZE, DTYPES, KV_BLOCK_SIZES, BuildConfig,
                           ExportConfig)
from trtc.errors import TrtcError
from trtc.flavour import Flavour

if TYPE_CHECKING:
    from .quant_config import QuantConfig

__all__ = ["BuildConfig", "ExportConfig", "check_against_export", "check_attention_against_export",
           "check_plugin_flavour", "check_plugin_quant", "check_quant_dtype", "resolve_attention", "resolve_dtype"]


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


# --- checks of options against each other and against an export dir (before any work) ---

def check_plugin_flavour(attention: str, flavour: Flavour) -> None:
    if attention == "plugin" and not flavour.plugins:
        raise TrtcError(f"--attention plugin needs TensorRT's plugin layer, which {flavour.name} does not have "
                        f"(trtc's attention plugins are a full-TensorRT feature); use --attention native, or "
                        f"--flavour tensorrt where full TensorRT is installed (`trtc export --attention plugin` "
                        f"writes the plugin-form graph without TensorRT)")


def check_plugin_quant(attention: str, quant: "QuantConfig | None") -> None:
    if attention == "plugin" and quant is not None and quant.enabled:
        raise TrtcError("--quant/--kv-cache-dtype with --attention plugin is not supported yet (the quantizer "
                        "works on the native graph's Attention/TensorScatter); drop one of them")


def check_attention_against_export(have: ExportConfig, attention: str | None, kv_block_size: int | None) -> None:
    if attention is not None and attention != have.attention:
        raise TrtcError(f"--attention {attention} differs from the export dir's {have.attention}; "
                        f"re-export with --attention {attention} or drop --attention")
    if kv_block_size is not None and kv_block_size != have.kv_block_size:
        raise TrtcError(f"--kv-block-size {kv_block_size} differs from the export dir's {have.kv_block_size}; "
                        f"re-export with it or drop --kv-block-size")


def check_against_export(have: ExportConfig, dtype: str, max_seq_len: int | None) -> None:
    if dtype not in ("auto", have.dtype):
        raise TrtcError(f"--dtype {dtype} differs from the export dir's {have.dtype}; "
                        f"re-export with --dtype {dtype} or drop --dtype")
    if max_seq_len is not None and max_seq_len != have.max_seq_len:
        raise TrtcError(f"--max-seq-len {max_seq_len} differs from the export dir's "
                        f"{have.max_seq_len} (the KV cache length is fixed at export); "
                        f"re-export with --max-seq-len {max_seq_len} or drop the option")


def check_quant_dtype(quant: "QuantConfig | None", dtype: str) -> None:
    """Calibration runs the float graph on ONNX Runtime, whose CPU provider has no bfloat16 kernels."""
    if quant is not None and quant.enabled and quant.needs_calibration and dtype == "bfloat16":
        raise TrtcError(f"--quant {quant.algo} calibrates on ONNX Runtime, which cannot run bfloat16 graphs; "
                        f"quantize with --dtype float16 or float32")
