"""Tensor-parallel policy: which tp sizes a model (and its quantization and attention lowering)
can be split into, checked before any work, and the all-reduce node's attributes. The split itself
is compiler/shard.py."""

from __future__ import annotations

from pathlib import Path

from trtc import artifact as art
from trtc.errors import TrtcError
from trtc.spec import ModelSpec


COLLECTIVE = "DistCollective"          # default ONNX domain: TensorRT's parser -> IDistCollectiveLayer


def all_reduce_attrs(tp: int) -> dict:
    """Attributes of a sum all-reduce over all `tp` ranks (root -1: none; group_size 0: every rank)."""
    return {"collective_operation": "all_reduce", "reduce_op": "sum", "root": -1, "group_size": 0, "nb_rank": tp}


# --- which tp sizes a model takes ---------------------------------------------------------------

def _tp_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why `tp` cannot split this model, or None."""
    if spec.num_heads % tp:
        return f"the {spec.num_heads} query heads are not divisible by {tp}"
    if spec.intermediate_size % tp:
        return f"the intermediate size {spec.intermediate_size} is not divisible by {tp}"
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        return (f"the {spec.num_kv_heads} KV heads can neither be split {tp} ways nor replicated "
                f"({tp} is not a multiple of {spec.num_kv_heads})")
    return None


def valid_tp_sizes(spec: ModelSpec) -> list[int]:
    return [t for t in range(1, spec.num_heads + 1) if _tp_problem(spec, t) is None]


def check_tp(spec: ModelSpec, tp: int, algo: str = "none", group_size: int = 0, attention: str = "native") -> None:
    """TrtcError naming the valid sizes when `tp` cannot split this model (with its quantization
    mode, int4 group size and attention lowering); cheap: run before any export work."""
    check_tp_attention(tp, attention)
    if tp == 1:
        return
    if getattr(spec, "num_experts", 0):     # a field of newer specs (mixture of experts)
        raise TrtcError(f"--tp-size {tp}: tensor parallelism of mixture-of-experts MLPs is not implemented; "
                        f"use --tp-size 1")
    if getattr(spec, "fused_projections", False):
        raise TrtcError(f"--tp-size {tp}: {spec.family}'s fused qkv_proj / gate_up_proj weights are not split by "
                        f"trtc's sharding yet (it splits separate q, k, v, gate and up linears); use --tp-size 1")
    why = _tp_problem(spec, tp)
    if why:
        valid = ", ".join(map(str, valid_tp_sizes(spec)))
        raise TrtcError(f"--tp-size {tp} cannot split {spec.architecture}: {why}; valid tp sizes for this model: "
                        f"{valid}")
    _check_tp_blocks(spec, tp, algo, group_size)


def check_tp_attention(tp: int, attention: str) -> None:
    """What needs no model: tp at least 1, and the attention lowering sharding supports."""
    if tp < 1:
        raise TrtcError(f"--tp-size {tp} must be at least 1")
    if attention == "plugin" and tp > 1:
        raise TrtcError(f"--attention plugin with --tp-size {tp} is not supported: trtc splits the native graph's "
                        f"Attention/RotaryEmbedding/TensorScatter by head, while trtc's plugins, their paged KV cache "
                        f"and their reference backend run one rank; use --attention native for tensor parallelism")


def check_tp_early(model: str | None, tp: int | None, attention: str | None) -> None:
    """check_tp on what can be read before loading anything (build and export call it first, so a
    bad --tp-size is the only line printed)."""
    if tp is None or tp == 1:
        return
    check_tp_attention(tp, attention or "native")
    spec = local_spec(model)
    if spec is not None and not (model is not None and (Path(model) / art.EXPORT_CONFIG).is_file()):
        check_tp(spec, tp, attention=attention or "native")


def local_spec(model: str | None) -> ModelSpec | None:
    """The model's spec when it can be read without preparing or loading weights (an export dir, a
    Hugging Face dir, a bundled model already prepared in the cache); else None."""
    from .families import adapter_for_config
    from .load import BUNDLED, DEFAULT_MODEL, cache_dir, read_hf_config

    name = model or DEFAULT_MODEL
    d = cache_dir() / "models" / name if name in BUNDLED else Path(name).expanduser()
    if (d / art.EXPORT_CONFIG).is_file():
        return art.read_export_config(d).pretrained_config
    if not (d / "config.json").is_file():
        return None
    cfg = read_hf_config(d)
    return adapter_for_config(cfg).spec_from_config(cfg)


def _check_tp_blocks(spec: ModelSpec, tp: int, algo: str, group_size: int) -> None:
    """Blockwise scales run along a linear's input rows: a row-parallel shard must hold whole blocks."""
    block = group_size if algo.startswith("int4") else 16 if algo == "nvfp4" else 0
    if not block:
        return
    rows = {"o_proj": spec.num_heads * spec.head_dim // tp, "down_proj": spec.intermediate_size // tp}
    for name, n in rows.items():
        if n % block:
            g = block
            while g > 1 and any(v % g for v in rows.values()):
                g //= 2
            what = f"--group-size {block}" if algo.startswith("int4") else "nvfp4's 16-row blocks"
            fix = (f"use --group-size {g}" if algo.startswith("int4") and g >= 16
                   else "use another --tp-size or --quant mode")
            raise TrtcError(f"--quant {algo} with --tp-size {tp}: each rank's {name} holds {n} input rows, which "
                            f"{what} do not divide (a block of scales would straddle two ranks); {fix}")


def tp_for_export(have: int, requested: int | None, export_dir) -> int:
    """The ranks to build from an export dir of `have` ranks: its own, or more from a one-rank export."""
    if requested is None or requested == have:
        return have
    if have > 1:
        raise TrtcError(f"--tp-size {requested} differs from the export dir's {have} ({export_dir} holds {have} "
                        f"rank graphs); re-export with --tp-size {requested}, or drop --tp-size")
    return requested
