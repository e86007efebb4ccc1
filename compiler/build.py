"""Stage 4, build: rank ONNX graph -> TensorRT parser -> strongly typed network -> engine.

Two optimization profiles: 0 = prefill (seq 1..max_input_len), 1 = decode (seq 1). The KV cache
inputs have a fixed length (max_seq_len) in both, so the same cache buffers serve both phases.

Plugin-form graphs (`--attention plugin`, full TensorRT only): trtc's plugins are registered with
TensorRT (plugins/tensorrt_plugin.py) before the ONNX parser runs, and the block pools / block
tables get profile ranges instead of the per-layer caches. Written against the documented API and
NOT run: full TensorRT cannot be installed on trtc's machines (FACTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtc.errors import TrtcError

from trtc.flavour import Flavour, import_trt, make_logger, sm_number
from .config import BuildConfig, ExportConfig
from trtc.spec import ModelSpec


@dataclass(frozen=True)
class ProfileShapes:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # min, opt, max


def check_plugin_kernels(spec: ModelSpec, ecfg: ExportConfig) -> None:
    """Plugin form: what trtc's kernels support (dtypes, head sizes; plugins/schema.py), checked
    before a full-TensorRT build. The CPU reference backend accepts more (float32, any even head size)."""
    from trtc.plugins.schema import ACT_DTYPES, PAGED_ATTENTION, SchemaError

    if ecfg.attention != "plugin":
        return
    try:
        PAGED_ATTENTION.attr_values(num_q_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                                    head_size=spec.head_dim, block_size=ecfg.kv_block_size)
        if ecfg.dtype not in ACT_DTYPES:
            raise SchemaError(f"activations are {ecfg.dtype}, the kernels take {' or '.join(ACT_DTYPES)}")
    except SchemaError as e:
        raise TrtcError(f"trtc's plugin kernels cannot build this model ({e}); use --dtype float16 for a "
                        f"float32 model, or --attention native") from None


def profiles_for(spec: ModelSpec, cfg: BuildConfig, input_names: list[str],
                 kv_block_size: int | None = None) -> list[ProfileShapes]:
    """kv_block_size: plugin form (block pools + block tables) when set."""
    B, S = cfg.max_batch_size, cfg.max_input_len
    optb = min(cfg.opt_batch_size, B)
    cache = (spec.num_kv_heads, cfg.max_seq_len, spec.head_dim)
    if kv_block_size:   # pools [num_blocks, 2, Hkv, bs, D]: up to every sequence at max_seq_len
        mb = -(-cfg.max_seq_len // kv_block_size)
        block = (2, spec.num_kv_heads, kv_block_size, spec.head_dim)
    out = []
    for name, (smin, sopt, smax) in (("prefill", (1, max(1, S // 2), S)), ("decode", (1, 1, 1))):
        shapes = {}
        for n in input_names:
            if n in ("input_ids", "position_ids"):
                shapes[n] = ((1, smin), (optb, sopt), (B, smax))
            elif n.startswith("past_key_values."):
                shapes[n] = ((1, *cache), (optb, *cache), (B, *cache))
            elif kv_block_size and n == "block_tables":
                shapes[n] = ((1, mb), (optb, mb), (B, mb))
            elif kv_block_size and n.startswith("past_kv_pool."):
                shapes[n] = ((1, *block), (optb * mb, *block), (B * mb, *block))
            else:
                raise TrtcError(f"graph input {n!r} has no profile rule; was the graph made by trtc export?")
        out.append(ProfileShapes(name, shapes))
    return out


_PLUGINS_REGISTERED = False


def _register_plugins() -> None:
    """Once per process: tensorrt.plugin keeps a global registry."""
    global _PLUGINS_REGISTERED
    if not _PLUGINS_REGISTERED:
        from trtc.plugins.tensorrt_plugin import register

        register()
        _PLUGINS_REGISTERED = True


def _cc_enum(trt, target: str):
    return getattr(trt.ComputeCapability, "SM" + str(sm_number(target)))


def build_engine(onnx_path: Path, spec: ModelSpec, cfg: BuildConfig, flavour: Flavour,
                 engine_path: Path, kv_block_size: int | None = None) -> list[ProfileShapes]:
    """kv_block_size set: a plugin-form graph (needs flavour.plugins)."""
    trt = import_trt(flavour)
    if kv_block_size:
        if not flavour.plugins:
            raise TrtcError(f"{flavour.name} has no plugin layer; plugin-form graphs need full TensorRT")
        _register_plugins()   # trtc::RopeKvAppend / trtc::PagedAttention, before the parser meets the nodes
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtcError(f"the {flavour.name} ONNX parser rejected {onnx_path.name}: {errs}")
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.ATTENTION_INPUT, trt.LayerType.ATTENTION_OUTPUT):
            layer.__class__ = trt.IAttentionBoundaryLayer
            # fp32 attention has no fused kernel on TensorRT-RTX; allow decomposition (fused
            # kernels are still used wherever one supports the shape and type).
            layer.attention.decomposable = True
    config = builder.create_builder_config()
    if flavour.name == "tensorrt_rtx":
        config.num_compute_capabilities = len(cfg.targets)
        for i, t in enumerate(cfg.targets):
            config.set_compute_capability(_cc_enum(trt, t), i)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    profiles = profiles_for(spec, cfg, names, kv_block_size)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for n, (mn, op, mx) in prof.shapes.items():
            p.set_shape(n, mn, op, mx)
        config.add_optimization_profile(p)
    # Stream the engine to disk as it is serialized: no second in-memory copy of the engine.
    with open(engine_path, "wb") as f:
        ok = builder.build_serialized_network_to_stream(network, config, _file_writer(trt, f))
    if not ok:
        errs = "; ".join(logger.errors()[-5:]) or "no message"
        raise TrtcError(f"{flavour.name} failed to build the engine for {', '.join(cfg.targets)}: {errs}")
    return profiles


def _file_writer(trt, f):
    class FileWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)

        def write(self, data) -> int:
            return f.write(data)

    return FileWriter()
