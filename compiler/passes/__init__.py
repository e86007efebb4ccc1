"""Graph passes: small named functions `(graph, ctx) -> graph` over onnx-graphsurgeon graphs.

Each pass finds its targets by pattern and leaves everything else alone. `PIPELINE` is the order
`trtc build/export` runs them in; its names are what `--dump-after NAME` accepts. With
`--attention plugin`, PLUGIN_PIPELINE runs instead: the native lowering, then plugin_attention
(compiler/passes/plugin_attention.py) replaces each layer's rotary/KV-update/attention nodes by
trtc's plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trtc.errors import TrtcError

from trtc.spec import ModelSpec


@dataclass
class PassContext:
    spec: ModelSpec
    max_seq_len: int
    dump_after: tuple[str, ...] = ()          # pass names whose output graph is written
    dump_dir: Path | None = None
    check: Callable | None = None             # graph check run after every pass (tests)
    stats: dict[str, int] = field(default_factory=dict)   # pass name -> number of rewrites
    attention: str = "native"                 # "native" | "plugin": which pipeline runs
    kv_block_size: int | None = None          # tokens per KV block (plugin form only)


PassFn = Callable[["object", PassContext], "object"]
_PASSES: dict[str, PassFn] = {}


def register_pass(name: str):
    def deco(fn: PassFn) -> PassFn:
        _PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def get_pass(name: str) -> PassFn:
    return _PASSES[name]


from . import attention, cleanup, kv_cache, norm, plugin_attention, rotary, rotary_fuse  # noqa: E402,F401  (registers the passes)

# fuse_rotary turns HF's decomposed rotate-half (what float16 exports leave) into RotaryEmbedding,
# so rotary_cache and TensorRT's IRotaryEmbeddingLayer see one form whatever the dtype.
PIPELINE = ("kv_cache_scatter", "rms_norm_dtypes", "fold_repeat_kv", "attention_mask_from_positions",
            "fuse_rotary", "rotary_cache", "cleanup")
PLUGIN_PIPELINE = PIPELINE[:-1] + ("plugin_attention", "cleanup")   # the native lowering, then the plugins
PIPELINES = {"native": PIPELINE, "plugin": PLUGIN_PIPELINE}


def pipeline_for(attention: str = "native") -> tuple[str, ...]:
    if attention not in PIPELINES:
        raise TrtcError(f"--attention {attention!r} is unknown; use one of {', '.join(PIPELINES)}")
    return PIPELINES[attention]


def validate_dump_after(names: tuple[str, ...], attention: str = "native") -> None:
    passes = pipeline_for(attention)
    bad = [n for n in names if n not in passes]
    if bad:
        raise TrtcError(f"--dump-after {', '.join(bad)}: unknown pass with --attention {attention}; "
                        f"passes: {', '.join(passes)}")


def run_passes(graph, ctx: PassContext):
    import onnx
    import onnx_graphsurgeon as gs

    validate_dump_after(ctx.dump_after, ctx.attention)
    for name in pipeline_for(ctx.attention):
        graph = _PASSES[name](graph, ctx)
        graph.toposort()   # passes append new nodes at the end; keep the order valid
        if ctx.check is not None:
            ctx.check(graph, after=name)
        if name in ctx.dump_after and ctx.dump_dir is not None:
            ctx.dump_dir.mkdir(parents=True, exist_ok=True)
            path = ctx.dump_dir / f"after_{name}.onnx"
            # Graph structure for inspection: large weights stay references to the rank's
            # external data file (they are never loaded by the passes).
            onnx.save_model(gs.export_onnx(graph.copy()), str(path))
    return graph
