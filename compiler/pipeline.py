"""The compiler pipeline, top to bottom: load -> export -> passes -> build -> package.

`export_model` stops after the passes and writes an export dir (ONNX rank graphs + tokenizer +
trtc_export.json); `build_model` accepts a model or such an export dir and writes an engine dir.
Stage names are what the CLI prints; pass names are what `--dump-after` accepts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trtc import __version__
from trtc.errors import TrtcError
from trtc.log import StageTimes, info, stage

from . import package
from trtc.flavour import Flavour, trt_version
from .config import BuildConfig, ExportConfig, resolve_attention, resolve_dtype
from .graph_check import check_graph
from .load import BUNDLED, DEFAULT_MODEL, LoadedModel, load_model, save_tokenizer
from .package import EXPORT_CONFIG, ENGINE_CONFIG, FORMAT_VERSION
from .passes import PassContext, run_passes, validate_dump_after
from .quantize import QuantConfig, quantize_rank_graph, resolve_for_model
from trtc.spec import ModelSpec, fingerprint_of

RANK_ONNX = "rank{r}.onnx"
RANK_ENGINE = "rank{r}.engine"


@dataclass(frozen=True)
class RankGraphs:
    """Typed hand-off from export+passes to build: the rank graphs on disk and what they are."""

    dir: Path
    files: tuple[str, ...]         # rank0.onnx, rank0.onnx.data
    spec: ModelSpec
    config: ExportConfig
    io: dict                       # {"inputs": [...], "outputs": [...]}: name, dtype, shape
    source: dict                   # {"model": ..., "weights_sha256": ...}
    tokenizer_dir: Path
    pass_stats: dict
    tokenizer_files: tuple[str, ...] = ()
    quantization: dict | None = None   # compiler/quantize.py report, when the graphs are quantized


def default_output(model: str | None, root: str = "engines") -> Path:
    name = model or DEFAULT_MODEL
    if name not in BUNDLED:
        name = Path(name).name.removesuffix(".gguf") or "model"
    return Path(root) / name


def _io_table(model) -> dict:
    import onnx

    def rows(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
        return out

    return {"inputs": rows(model.graph.input), "outputs": rows(model.graph.output)}


def _export_rank_graphs(loaded: LoadedModel, cfg: ExportConfig, work: Path, times: StageTimes,
                        dump_after: tuple[str, ...], dump_dir: Path | None) -> RankGraphs:
    from .export import trace
    from .onnx_io import load_graph, save_graph

    with stage("export", times, f"torch.onnx dynamo, opset {cfg.opset}, {cfg.dtype}"):
        traced = trace(loaded, cfg, work / "traced")
    with stage("passes", times):
        graph = load_graph(traced.onnx_path)
        ctx = PassContext(spec=loaded.spec, max_seq_len=cfg.max_seq_len, dump_after=dump_after,
                          dump_dir=dump_dir, check=check_graph if os.environ.get("TRTC_CHECK_PASSES") else None,
                          attention=cfg.attention, kv_block_size=cfg.kv_block_size or 16)
        graph = run_passes(graph, ctx)
        check_graph(graph, after="all passes")
        info("[trtc]   " + ", ".join(f"{k}: {v}" for k, v in ctx.stats.items()))
        name = RANK_ONNX.format(r=0)
        model = save_graph(graph, traced.onnx_path.parent / (traced.onnx_path.name + ".data"), work / name)
        io = _io_table(model)
        del model, graph
        shutil.rmtree(work / "traced", ignore_errors=True)
    return RankGraphs(dir=work, files=(name, name + ".data"), spec=loaded.spec, config=cfg, io=io,
                      source={"model": loaded.source, "hf_dir": str(loaded.hf_dir),
                              "weights_sha256": loaded.weights_sha256},
                      tokenizer_dir=loaded.hf_dir, pass_stats=dict(ctx.stats))


def _load_export_dir(d: Path) -> RankGraphs:
    meta = package.read_json(d / EXPORT_CONFIG, "export dir")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TrtcError(f"{d} was exported by another trtc format ({meta.get('format_version')}); "
                        f"re-run trtc export with this version")
    files = meta["files"]
    onnx_files = [n for n in files if n.startswith("rank")]
    tok = [n for n in files if not n.startswith("rank")]
    package.verify_files(d, files, onnx_files + tok, rebuild_hint="re-run trtc export")
    return RankGraphs(dir=d, files=tuple(onnx_files), spec=ModelSpec.from_dict(meta["pretrained_config"]),
                      config=ExportConfig(**meta["export_config"]), io=meta["io"], source=meta["source"],
                      tokenizer_dir=d, pass_stats=meta.get("passes", {}), tokenizer_files=tuple(tok),
                      quantization=meta.get("quantization"))


def _quantize(graphs: RankGraphs, q: QuantConfig, out_dir: Path, times: StageTimes) -> RankGraphs:
    """Quantize rank 0's graph into out_dir (may be graphs.dir); see compiler/quantize.py."""
    name = RANK_ONNX.format(r=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    with stage("quantize", times, f"{q.algo}, kv cache {q.kv_cache_dtype}"):
        res = quantize_rank_graph(graphs.dir / graphs.files[0], out_dir / name, graphs.spec, q,
                                  graphs.tokenizer_dir, graphs.config.max_seq_len)
    return dataclasses.replace(graphs, dir=out_dir, files=(name, name + ".data"), io=_io_table(res.model),
                               quantization=res.report)


def _no_quantization() -> dict:
    return {"quant_algo": None, "kv_cache_quant_algo": None}


def is_export_dir(model: str | None) -> bool:
    return model is not None and (Path(model) / EXPORT_CONFIG).is_file()


def export_model(model: str | None, output: Path, dtype: str = "auto", max_seq_len: int | None = None,
                 dump_after: tuple[str, ...] = (), quant: QuantConfig | None = None,
                 attention: str | None = None, kv_block_size: int | None = None) -> tuple[Path, StageTimes]:
    attention, kv_block_size = resolve_attention(attention, kv_block_size)
    _check_plugin_quant(attention, quant)
    validate_dump_after(dump_after, attention)
    package.check_output_dir(output, EXPORT_CONFIG)      # before any expensive work
    times = StageTimes()
    with stage("load", times, model or DEFAULT_MODEL):
        loaded = load_model(model)
    if quant is not None and quant.enabled:
        quant = resolve_for_model(quant, loaded.spec)   # bad group size: fail before exporting
    cfg = ExportConfig(dtype=resolve_dtype(dtype, loaded.spec.source_dtype),
                       max_seq_len=_default_seq_len(max_seq_len, loaded.spec),
                       attention=attention, kv_block_size=kv_block_size)
    with package.atomic_dir(output, EXPORT_CONFIG) as tmp:
        graphs = _export_rank_graphs(loaded, cfg, tmp, times, dump_after, output.parent / (output.name + ".dump"))
        if quant is not None and quant.enabled:
            graphs = _quantize(graphs, quant, tmp, times)
        with stage("package", times):
            tok = save_tokenizer(loaded.hf_dir, tmp)
            meta = {
                "format_version": FORMAT_VERSION, "trtc_version": __version__,
                "pretrained_config": graphs.spec.to_dict(), "export_config": dataclasses.asdict(cfg),
                "io": graphs.io, "source": graphs.source, "passes": graphs.pass_stats,
                "quantization": graphs.quantization or _no_quantization(),
                "tokenizer_files": tok,
                "files": package.file_table(tmp, list(graphs.files) + tok),
            }
            package.write_json(tmp / EXPORT_CONFIG, meta)
    return output, times


def _default_seq_len(requested: int | None, spec: ModelSpec) -> int:
    if requested is None:
        return min(2048, spec.max_position_embeddings)
    if requested > spec.max_position_embeddings:
        raise TrtcError(f"--max-seq-len {requested} exceeds the model's max_position_embeddings "
                        f"{spec.max_position_embeddings}; lower it")
    return requested


def build_model(model: str | None, output: Path, flavour: Flavour, targets: tuple[str, ...],
                dtype: str = "auto", max_batch_size: int = 8, max_input_len: int | None = None,
                max_seq_len: int | None = None, keep_onnx: bool = False,
                dump_after: tuple[str, ...] = (), quant: QuantConfig | None = None,
                attention: str | None = None, kv_block_size: int | None = None) -> tuple[Path, StageTimes]:
    """attention/kv_block_size None: native, or the export dir's."""
    from .build import build_engine, check_plugin_kernels

    if not is_export_dir(model):
        attention, kv_block_size = resolve_attention(attention, kv_block_size)
        _check_plugin_flavour(attention, flavour)       # before anything is loaded or written
        _check_plugin_quant(attention, quant)
    validate_dump_after(dump_after, attention or "native")
    package.check_output_dir(output, ENGINE_CONFIG)      # before any expensive work
    times = StageTimes()
    work_root = Path(tempfile.mkdtemp(prefix="trtc-work-"))
    try:
        if is_export_dir(model):
            with stage("load", times, f"export dir {model}"):
                graphs = _load_export_dir(Path(model))
            _check_against_export(graphs, dtype, max_seq_len)
            _check_attention_against_export(graphs, attention, kv_block_size)
            _check_plugin_flavour(graphs.config.attention, flavour)
            _check_plugin_quant(graphs.config.attention, quant)
            if quant is not None and quant.enabled:
                if graphs.quantization and graphs.quantization.get("config"):
                    raise TrtcError(f"{model} was quantized at export ({graphs.quantization['config']}); "
                                    f"drop --quant/--kv-cache-dtype, or re-export without them")
                quant = resolve_for_model(quant, graphs.spec)
        else:
            with stage("load", times, model or DEFAULT_MODEL):
                loaded = load_model(model)
            ecfg = ExportConfig(dtype=resolve_dtype(dtype, loaded.spec.source_dtype),
                                max_seq_len=_default_seq_len(max_seq_len, loaded.spec),
                                attention=attention, kv_block_size=kv_block_size)
            check_plugin_kernels(loaded.spec, ecfg)      # full TensorRT: the kernels' dtypes/head sizes
            bcfg_check = BuildConfig(max_batch_size, max_input_len or min(1024, ecfg.max_seq_len),
                                     ecfg.max_seq_len, targets)  # validate options before exporting
            del bcfg_check
            if quant is not None and quant.enabled:
                quant = resolve_for_model(quant, loaded.spec)   # bad group size: fail before exporting
            graphs = _export_rank_graphs(loaded, ecfg, work_root, times, dump_after,
                                         output.parent / (output.name + ".dump"))
        if quant is not None and quant.enabled:
            graphs = _quantize(graphs, quant, work_root / "quant", times)
        spec, ecfg = graphs.spec, graphs.config
        check_plugin_kernels(spec, ecfg)
        bcfg = BuildConfig(max_batch_size=max_batch_size,
                           max_input_len=max_input_len or min(1024, ecfg.max_seq_len),
                           max_seq_len=ecfg.max_seq_len, targets=targets)
        version = trt_version(flavour)
        fingerprint = fingerprint_of({
            "trtc": __version__, "spec": spec.to_dict(), "weights": graphs.source.get("weights_sha256"),
            "export": dataclasses.asdict(ecfg), "build": bcfg.to_dict(),
            "tensorrt": [flavour.name, version],
            **({"quant": graphs.quantization["fingerprint"]} if graphs.quantization
               and graphs.quantization.get("fingerprint") else {})})
        with package.atomic_dir(output, ENGINE_CONFIG) as tmp:
            engine_name = RANK_ENGINE.format(r=0)
            with stage("build", times, f"{flavour.name} {version}, targets {','.join(targets)}"):
                profiles = build_engine(graphs.dir / graphs.files[0], spec, bcfg, flavour, tmp / engine_name,
                                        kv_block_size=ecfg.kv_block_size)
            with stage("package", times):
                if graphs.tokenizer_files:   # an export dir: already saved by trtc
                    tok = package.copy_files(graphs.tokenizer_dir, tmp, graphs.tokenizer_files)
                else:
                    tok = save_tokenizer(graphs.tokenizer_dir, tmp)
                files = [engine_name] + tok
                onnx_files = []
                if keep_onnx:
                    for n in graphs.files:
                        shutil.copy2(graphs.dir / n, tmp / n)
                    onnx_files = list(graphs.files)
                config = {
                    "format_version": FORMAT_VERSION,
                    "trtc_version": __version__,
                    "fingerprint": fingerprint,
                    "pretrained_config": {**spec.to_dict(), "dtype": ecfg.dtype},
                    "build_config": {**bcfg.to_dict(), "profiles": [
                        {"name": p.name, "shapes": {k: [list(x) for x in v] for k, v in p.shapes.items()}}
                        for p in profiles]},
                    "export_config": dataclasses.asdict(ecfg),
                    "quantization": graphs.quantization or _no_quantization(),
                    "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1, "ranks": [0]},
                    "tensorrt": {"flavour": flavour.name, "version": version, "targets": list(targets)},
                    "io": graphs.io,
                    "engines": {"0": engine_name},
                    "onnx": {"0": graphs.files[0]} if keep_onnx else None,
                    "source": graphs.source,
                    "passes": graphs.pass_stats,
                    "files": package.file_table(tmp, files + onnx_files),
                }
                package.write_json(tmp / ENGINE_CONFIG, config)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    return output, times


def _check_plugin_flavour(attention: str, flavour: Flavour) -> None:
    if attention == "plugin" and not flavour.plugins:
        raise TrtcError(f"--attention plugin needs TensorRT's plugin layer, which {flavour.name} does not have "
                        f"(trtc's attention plugins are a full-TensorRT feature); use --attention native, or "
                        f"--flavour tensorrt where full TensorRT is installed (`trtc export --attention plugin` "
                        f"writes the plugin-form graph without TensorRT)")


def _check_plugin_quant(attention: str, quant: QuantConfig | None) -> None:
    if attention == "plugin" and quant is not None and quant.enabled:
        raise TrtcError("--quant/--kv-cache-dtype with --attention plugin is not supported yet (the quantizer "
                        "works on the native graph's Attention/TensorScatter); drop one of them")


def _check_attention_against_export(graphs: RankGraphs, attention: str | None, kv_block_size: int | None) -> None:
    have = graphs.config
    if attention is not None and attention != have.attention:
        raise TrtcError(f"--attention {attention} differs from the export dir's {have.attention}; "
                        f"re-export with --attention {attention} or drop --attention")
    if kv_block_size is not None and kv_block_size != have.kv_block_size:
        raise TrtcError(f"--kv-block-size {kv_block_size} differs from the export dir's {have.kv_block_size}; "
                        f"re-export with it or drop --kv-block-size")


def _check_against_export(graphs: RankGraphs, dtype: str, max_seq_len: int | None) -> None:
    if dtype not in ("auto", graphs.config.dtype):
        raise TrtcError(f"--dtype {dtype} differs from the export dir's {graphs.config.dtype}; "
                        f"re-export with --dtype {dtype} or drop --dtype")
    if max_seq_len is not None and max_seq_len != graphs.config.max_seq_len:
        raise TrtcError(f"--max-seq-len {max_seq_len} differs from the export dir's "
                        f"{graphs.config.max_seq_len} (the KV cache length is fixed at export); "
                        f"re-export with --max-seq-len {max_seq_len} or drop the option")
