"""Stage 4, build: rank ONNX graph -> TensorRT parser -> strongly typed network -> engine.

Two optimization profiles: 0 = prefill (seq 1..max_input_len), 1 = decode (seq 1). The KV cache
inputs have a fixed length (max_seq_len) in both, so the same cache buffers serve both phases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtc.errors import TrtcError

from .backend import Flavour, import_trt, make_logger, sm_number
from .config import BuildConfig
from .spec import ModelSpec


@dataclass(frozen=True)
class ProfileShapes:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # min, opt, max


def profiles_for(spec: ModelSpec, cfg: BuildConfig, input_names: list[str]) -> list[ProfileShapes]:
    B, S = cfg.max_batch_size, cfg.max_input_len
    optb = min(cfg.opt_batch_size, B)
    cache = (spec.num_kv_heads, cfg.max_seq_len, spec.head_dim)
    out = []
    for name, (smin, sopt, smax) in (("prefill", (1, max(1, S // 2), S)), ("decode", (1, 1, 1))):
        shapes = {}
        for n in input_names:
            if n in ("input_ids", "position_ids"):
                shapes[n] = ((1, smin), (optb, sopt), (B, smax))
            elif n.startswith("past_key_values."):
                shapes[n] = ((1, *cache), (optb, *cache), (B, *cache))
            else:
                raise TrtcError(f"graph input {n!r} has no profile rule; was the graph made by trtc export?")
        out.append(ProfileShapes(name, shapes))
    return out


def _cc_enum(trt, target: str):
    return getattr(trt.ComputeCapability, "SM" + str(sm_number(target)))


def build_engine(onnx_path: Path, spec: ModelSpec, cfg: BuildConfig, flavour: Flavour,
                 engine_path: Path) -> list[ProfileShapes]:
    trt = import_trt(flavour)
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
    profiles = profiles_for(spec, cfg, names)
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
