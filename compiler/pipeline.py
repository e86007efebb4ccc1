"""The compiler pipeline, top to bottom: load -> export -> passes -> [quantize] -> build -> package.

`export_model` stops after the passes and writes an export dir (ONNX rank graphs + tokenizer +
trtc_export.json); `build_model` turns a model or such an export dir into the same RankGraphs
hand-off and builds from that. Stage names are what the CLI prints; pass names are what
`--dump-after` accepts. What the dirs hold is defined by trtc/artifact.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trtc import __version__
from trtc import artifact as art
from trtc.artifact import ENGINE_CONFIG, EXPORT_CONFIG, Source
from trtc.errors import TrtcError
from trtc.flavour import Flavour, trt_version
from trtc.log import StageTimes, info, stage
from trtc.spec import ModelSpec, fingerprint_of

from . import export_worker, package
from .config import (BuildConfig, ExportConfig, check_against_export, check_attention_against_export, check_quant_dtype,
                     check_plugin_flavour, check_plugin_quant, resolve_attention, resolve_dtype)
from .load import BUNDLED, DEFAULT_MODEL, LoadedModel, load_model, save_tokenizer
from .passes import validate_dump_after
from .quantize import QuantConfig, check_targets, resolve_for_model
from .rank_graphs import (RankGraphs, export_fingerprint, export_rank_graphs, load_export_dir, quantization_record,
                          quantize_graphs, shard_graphs, write_export_dir)
from .shard import stamp_file
from .tp import check_tp, check_tp_early, tp_for_export


def default_output(model: str | None, root: str = "engines") -> Path:
    name = model or DEFAULT_MODEL
    if name not in BUNDLED:
        name = Path(name).name.removesuffix(".gguf") or "model"
    return Path(root) / name


def _quant_blocks(quant: QuantConfig | None) -> tuple[str, int]:
    """(mode, int4 group size) that decide whether a row-parallel shard holds whole scale blocks."""
    return (quant.algo, quant.group_size) if quant is not None and quant.enabled else ("none", 0)


def is_export_dir(model: str | None) -> bool:
    return model is not None and (Path(model) / EXPORT_CONFIG).is_file()


def _export_config(loaded: LoadedModel, dtype: str, max_seq_len: int | None, attention: str,
                   kv_block_size: int | None) -> ExportConfig:
    return ExportConfig(dtype=resolve_dtype(dtype, loaded.spec.source_dtype),
                        max_seq_len=_default_seq_len(max_seq_len, loaded.spec),
                        attention=attention, kv_block_size=kv_block_size)


def export_model(model: str | None, output: Path, dtype: str = "auto", max_seq_len: int | None = None,
                 dump_after: tuple[str, ...] = (), quant: QuantConfig | None = None,
                 attention: str | None = None, kv_block_size: int | None = None,
                 tp_size: int = 1) -> tuple[Path, StageTimes]:
    attention, kv_block_size = resolve_attention(attention, kv_block_size)
    check_plugin_quant(attention, quant)
    check_tp_early(model, tp_size, attention)
    validate_dump_after(dump_after, attention)
    package.check_output_dir(output, EXPORT_CONFIG)      # before any expensive work
    times = StageTimes()
    export_worker.start()           # the export's process imports torch while the model loads
    try:
        return _export_model(model, output, dtype, max_seq_len, dump_after, quant, attention, kv_block_size, tp_size,
                             times)
    finally:
        export_worker.release()


def _export_model(model: str | None, output: Path, dtype: str, max_seq_len: int | None, dump_after: tuple[str, ...],
                  quant: QuantConfig | None, attention: str, kv_block_size: int | None, tp_size: int,
                  times: StageTimes) -> tuple[Path, StageTimes]:
    with stage("load", times, model or DEFAULT_MODEL):
        loaded = load_model(model)
    if quant is not None and quant.enabled:
        quant = resolve_for_model(quant, loaded.spec)   # bad group size: fail before exporting
    check_tp(loaded.spec, tp_size, *_quant_blocks(quant), attention)   # before exporting
    cfg = _export_config(loaded, dtype, max_seq_len, attention, kv_block_size)
    check_quant_dtype(quant, cfg.dtype)
    with package.atomic_dir(output, EXPORT_CONFIG) as tmp:
        graphs = export_rank_graphs(loaded, cfg, tmp, times, dump_after, output.parent / (output.name + ".dump"))
        if quant is not None and quant.enabled:
            graphs = quantize_graphs(graphs, quant, tmp, times)
        stamp = export_fingerprint(graphs, tp_size)
        if tp_size > 1:
            graphs = shard_graphs(graphs, tp_size, tmp, times, stamp)
        else:
            stamp_file(tmp / graphs.graphs[0].file, stamp, 0, 1)
        with stage("package", times):
            write_export_dir(graphs, tmp, loaded.hf_dir)
    return output, times


def _export_reusing(inp: _BuildInput, work: Path, times: StageTimes, dump_after: tuple[str, ...],
                    dump_dir: Path, cache) -> RankGraphs:
    """The float rank graphs after the passes: from the engine cache's export entries when an
    identical export was made before (builds of one model in several quant modes or for several
    targets share it), else exported and stored there."""
    assert inp.loaded is not None
    if cache is None or dump_after:
        return export_rank_graphs(inp.loaded, inp.ecfg, work, times, dump_after, dump_dir)
    key = fingerprint_of({"trtc": __version__, "format": art.FORMAT_VERSION, "spec": inp.spec.to_dict(),
                          "weights": inp.source.weights_sha256, "files": inp.source.files_sha256,
                          "export": dataclasses.asdict(inp.ecfg)})
    d = work / "export"
    with cache.lock(f"export-{key}"):
        with stage("cache", times, f"export {key}"):
            hit = cache.fetch_export(key, d)
        if hit:
            return load_export_dir(d)
        graphs = export_rank_graphs(inp.loaded, inp.ecfg, d, times, dump_after, dump_dir)
        write_export_dir(graphs, d, inp.loaded.hf_dir)
        cache.store_export(key, d)
    return graphs


def _default_seq_len(requested: int | None, spec: ModelSpec) -> int:
    if requested is None:
        return min(2048, spec.max_position_embeddings)
    if requested > spec.max_position_embeddings:
        raise TrtcError(f"--max-seq-len {requested} exceeds the model's max_position_embeddings "
                        f"{spec.max_position_embeddings}; lower it")
    return requested


@dataclass(frozen=True)
class _BuildInput:
    """What a build starts from, loaded and checked, before any export work: a model, or the rank
    graphs of an export dir. Enough to compute the fingerprint (the cache key)."""

    spec: ModelSpec
    ecfg: ExportConfig
    source: Source
    quant: QuantConfig | None                 # resolved for the model; None: no (further) quantization
    loaded: LoadedModel | None = None         # a model to export
    exported: RankGraphs | None = None        # an export dir's graphs
    tp: int = 1                               # tensor-parallel ranks to build


def _build_input(model: str | None, times: StageTimes, dtype: str, max_seq_len: int | None,
                 attention: str | None, kv_block_size: int | None, flavour: Flavour,
                 quant: QuantConfig | None, check_limits, tp_size: int | None = None) -> _BuildInput:
    """Either kind of input (a model, or an export dir), loaded and checked against the options."""
    quant = quant if quant is not None and quant.enabled else None
    if is_export_dir(model):
        with stage("load", times, f"export dir {model}"):
            graphs = load_export_dir(Path(str(model)))
        check_against_export(graphs.config, dtype, max_seq_len)
        check_attention_against_export(graphs.config, attention, kv_block_size)
        check_plugin_flavour(graphs.config.attention, flavour)
        check_plugin_quant(graphs.config.attention, quant)
        check_limits(graphs.spec, graphs.config)
        if quant is not None:
            if graphs.quantization:
                raise TrtcError(f"{model} was quantized at export ({graphs.quantization['config']}); "
                                f"drop --quant/--kv-cache-dtype, or re-export without them")
            quant = resolve_for_model(quant, graphs.spec)
        tp = tp_for_export(graphs.mapping.tp_size, tp_size, model)
        record = (graphs.quantization or {}).get("config") or {}
        blocks = _quant_blocks(quant) if quant is not None else (record.get("algo", "none"), record.get("group_size", 0))
        check_tp(graphs.spec, tp, *blocks, graphs.config.attention)
        return _BuildInput(graphs.spec, graphs.config, graphs.source, quant, exported=graphs, tp=tp)
    export_worker.start()           # the export's process imports torch while the model loads (build_model releases it)
    with stage("load", times, model or DEFAULT_MODEL):
        loaded = load_model(model)
    ecfg = _export_config(loaded, dtype, max_seq_len, attention or "native", kv_block_size)
    check_limits(loaded.spec, ecfg)                 # before exporting
    if quant is not None:
        quant = resolve_for_model(quant, loaded.spec)   # bad group size: fail before exporting
    check_tp(loaded.spec, tp_size or 1, *_quant_blocks(quant), ecfg.attention)   # before exporting
    source = Source(model=loaded.source, weights_sha256=loaded.weights_sha256, files_sha256=loaded.files_sha256,
                    hf_dir=str(loaded.hf_dir))
    return _BuildInput(loaded.spec, ecfg, source, quant, loaded=loaded, tp=tp_size or 1)


def build_fingerprint(inp: _BuildInput, bcfg: BuildConfig, flavour: Flavour, version: str, keep_onnx: bool) -> str:
    """Of everything that changes the artifact: trtc, model spec and weights, export, quantization
    (config and calibration text), build limits and targets, TensorRT flavour and version, layout."""
    q = inp.quant.fingerprint() if inp.quant is not None else \
        (inp.exported.quantization or {}).get("fingerprint") if inp.exported else None
    return fingerprint_of({
        "trtc": __version__, "format": art.FORMAT_VERSION, "spec": inp.spec.to_dict(),
        "weights": inp.source.weights_sha256, "files": inp.source.files_sha256, "export": dataclasses.asdict(inp.ecfg),
        "build": dataclasses.asdict(bcfg), "tensorrt": [flavour.name, version],
        **({"quant": q} if q else {}), **({"keep_onnx": True} if keep_onnx else {}),
        **({"tp": inp.tp} if inp.tp > 1 else {})})


def request_key(model: str | None, flavour: Flavour, version: str, targets: tuple[str, ...],
                quant: QuantConfig | None, options: dict) -> str:
    """Fingerprint of a build request as given (files read, options, versions): cheap to compute
    (no model load). The cache maps it to the artifact's fingerprint."""
    from . import digests
    from .load import resolve_source

    if is_export_dir(model):
        src = {"export": art.sha256_file(Path(str(model)) / EXPORT_CONFIG)}
    else:
        src = {"dir": digests.dir_digest(resolve_source(model))}
    return fingerprint_of({"trtc": __version__, "format": art.FORMAT_VERSION, "source": src,
                           "tensorrt": [flavour.name, version], "targets": list(targets),
                           "quant": quant.fingerprint() if quant is not None and quant.enabled else None,
                           **options})


def build_model(model: str | None, output: Path, flavour: Flavour, targets: tuple[str, ...],
                dtype: str = "auto", max_batch_size: int = 8, max_input_len: int | None = None,
                max_seq_len: int | None = None, keep_onnx: bool = False,
                dump_after: tuple[str, ...] = (), quant: QuantConfig | None = None,
                attention: str | None = None, kv_block_size: int | None = None,
                engine_per_target: bool = False, cache=None, job: dict | None = None,
                tp_size: int | None = None) -> tuple[Path, StageTimes]:
    """Build an engine dir from a model or an export dir.

    attention/kv_block_size None: native, or the export dir's. cache: a compiler.cache.EngineCache
    (None: always build). job: what to record as the job in the provenance statement.
    tp_size: tensor-parallel ranks (None: 1, or the export dir's)."""
    from .build import check_plugin_kernels

    if not is_export_dir(model):
        attention, kv_block_size = resolve_attention(attention, kv_block_size)
        check_plugin_flavour(attention, flavour)       # before anything is loaded or written
        check_plugin_quant(attention, quant)
    if quant is not None and quant.enabled:
        check_targets(quant, flavour, targets)          # fp8 needs sm_89+, ...: the API keeps the CLI's policy
    check_tp_early(model, tp_size, attention)
    validate_dump_after(dump_after, attention or "native")
    package.check_output_dir(output, ENGINE_CONFIG)      # before any expensive work
    engine_per_target = engine_per_target or not flavour.multi_target

    def build_config(ecfg: ExportConfig) -> BuildConfig:
        return BuildConfig(max_batch_size=max_batch_size,
                           max_input_len=max_input_len or min(1024, ecfg.max_seq_len),
                           max_seq_len=ecfg.max_seq_len, targets=targets, engine_per_target=engine_per_target)

    def check_limits(spec: ModelSpec, ecfg: ExportConfig) -> None:
        check_plugin_kernels(spec, ecfg)                # full TensorRT: the kernels' dtypes/head sizes
        build_config(ecfg)

    times = StageTimes()
    version = trt_version(flavour)
    request = None
    if cache is not None and not dump_after:
        # Fast path: an identical request (same input files, options, trtc, TensorRT) seen before
        # names its fingerprint without loading the model; the entry is still verified before use.
        request = request_key(model, flavour, version, targets, quant, dict(
            dtype=dtype, max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
            keep_onnx=keep_onnx, attention=attention, kv_block_size=kv_block_size,
            engine_per_target=engine_per_target, **({"tp_size": tp_size} if tp_size else {})))
        known = cache.recall(request)
        if known is not None:
            with cache.lock(known), stage("cache", times, f"lookup {known}"):
                if cache.fetch(known, output, lambda d: package.write_provenance(d, job)):
                    return output, times
    try:
        inp = _build_input(model, times, dtype, max_seq_len, attention, kv_block_size, flavour, quant, check_limits,
                           tp_size)
        check_quant_dtype(inp.quant, inp.ecfg.dtype)
        if inp.exported is not None and (inp.exported.quantization or {}).get("config"):
            # quantized at export: its mode must suit this build's targets too (fp8 needs sm_89+, ...)
            check_targets(QuantConfig(**inp.exported.quantization["config"]), flavour, targets)
        bcfg = build_config(inp.ecfg)
        fingerprint = build_fingerprint(inp, bcfg, flavour, version, keep_onnx)
        if cache is None or request is None:
            _build(inp, bcfg, flavour, version, fingerprint, keep_onnx, output, times, dump_after, job)
            return output, times
        cache.remember(request, fingerprint)
        with cache.lock(fingerprint):
            with stage("cache", times, f"lookup {fingerprint}"):
                hit = cache.fetch(fingerprint, output, lambda d: package.write_provenance(d, job))
            if not hit:
                _build(inp, bcfg, flavour, version, fingerprint, keep_onnx, output, times, dump_after, job, cache)
                with stage("cache", times, f"store {fingerprint}"):
                    cache.store(fingerprint, output)
        return output, times
    finally:
        export_worker.release()        # started before the load (_build_input); gone before the caller goes on


def check_reproducible_build(model: str | None, output: Path, flavour: Flavour, targets: tuple[str, ...],
                             **kw) -> tuple[Path, StageTimes]:
    """Build twice without the cache (output, then a sibling dir) and compare every file's sha256;
    TrtcError naming the files that differ. Keeps `output`; the second build is removed."""
    kw.pop("cache", None)
    out, times = build_model(model, output, flavour, targets, **kw)
    second = Path(tempfile.mkdtemp(prefix=f".{output.name}.repro-", dir=output.resolve().parent))
    try:
        build_model(model, second, flavour, targets, **kw)
        a, b = (sorted((p.name, art.sha256_file(p)) for p in d.iterdir() if p.is_file()) for d in (output, second))
        differ = sorted({n for n, _ in set(a) ^ set(b)})
    finally:
        shutil.rmtree(second, ignore_errors=True)
    if differ:
        raise TrtcError(f"two builds of {model or DEFAULT_MODEL} differ in {', '.join(differ)} "
                        f"({flavour.name} builds are {'' if flavour.reproducible else 'not '}expected to be "
                        f"reproducible); {output} holds the first build")
    info(f"[trtc] reproducible: two builds gave identical bytes for all {len(a)} files")
    return out, times


def _weight_bytes(inp: _BuildInput) -> int:
    """Bytes of the model's weights in the export dtype (0 for an export dir: nothing is traced)."""
    if inp.loaded is None:
        return 0
    from .load import weight_files

    src = sum(f.stat().st_size for f in weight_files(inp.loaded.hf_dir))
    src_bytes = 4 if inp.spec.source_dtype == "float32" else 2
    return src * (4 if inp.ecfg.dtype == "float32" else 2) // src_bytes


def _build(inp: _BuildInput, bcfg: BuildConfig, flavour: Flavour, version: str, fingerprint: str,
           keep_onnx: bool, output: Path, times: StageTimes, dump_after: tuple[str, ...], job: dict | None,
           cache=None) -> None:
    from .build import build_engine_isolated

    # scratch: traced + quantized graphs, each about the weights' size in the export dtype
    work = package.work_dir(output, need_bytes=2 * _weight_bytes(inp))
    try:
        graphs = inp.exported
        if graphs is None:
            graphs = _export_reusing(inp, work, times, dump_after, output.parent / (output.name + ".dump"), cache)
            export_worker.release()    # not beside the builder (an export reused from the cache never used it)
        if inp.quant is not None:
            graphs = quantize_graphs(graphs, inp.quant, work / "quant", times)
        if inp.tp > graphs.mapping.tp_size:
            graphs = shard_graphs(graphs, inp.tp, work / "shard", times, fingerprint)
        spec, ecfg = graphs.spec, graphs.config
        per_target = [[t] for t in bcfg.targets] if bcfg.engine_per_target else [list(bcfg.targets)]
        with package.atomic_dir(output, ENGINE_CONFIG) as tmp:
            engines, reproducible = [], True
            for g in graphs.graphs:
                for tg in per_target:
                    ef = art.EngineFile(rank=g.rank, targets=tg,
                                        file=art.rank_engine(g.rank, tg[0] if bcfg.engine_per_target else None))
                    with stage("build", times, f"{flavour.name} {version}, rank {g.rank}, targets {','.join(tg)}"):
                        profiles, repro = build_engine_isolated(
                            graphs.dir / g.file, art.rank_spec(spec, graphs.mapping.tp_size),
                            dataclasses.replace(bcfg, targets=tuple(tg)), flavour,
                            tmp / ef.file, kv_block_size=ecfg.kv_block_size)
                    engines.append(ef)
                    reproducible = reproducible and repro
            with stage("package", times):
                if graphs.tokenizer_files:   # an export dir: already saved by trtc
                    tok = package.copy_files(graphs.tokenizer_dir, tmp, graphs.tokenizer_files)
                else:
                    tok = save_tokenizer(graphs.tokenizer_dir, tmp)
                kept = list(graphs.graphs) if keep_onnx else []
                for g in kept:
                    for n in (g.file, g.data):
                        shutil.copy2(graphs.dir / n, tmp / n)
                    stamp_file(tmp / g.file, fingerprint, g.rank, graphs.mapping.world_size)
                art.write_config(tmp, art.EngineConfig(
                    format_version=art.FORMAT_VERSION, trtc_version=__version__, pretrained_config=spec,
                    export_config=ecfg, mapping=graphs.mapping, quantization=quantization_record(graphs),
                    io=graphs.io, onnx=kept, tokenizer_files=tok, source=graphs.source,
                    passes=graphs.pass_stats,
                    files=art.file_table(tmp, [e.file for e in engines] + tok + [n for g in kept
                                                                                  for n in (g.file, g.data)]),
                    fingerprint=fingerprint, build_config=bcfg, profiles=profiles,
                    tensorrt=art.TensorRTInfo(flavour=flavour.name, version=version, targets=list(bcfg.targets),
                                              reproducible=reproducible),
                    engines=engines))
                package.write_provenance(tmp, job)
    finally:
        shutil.rmtree(work, ignore_errors=True)
