"""The typed hand-off between the compiler's stages, and the stages that make it: rank graphs on
disk (exported, loaded from an export dir, quantized, sharded) with what they are. The pipeline
(compiler/pipeline.py) strings these together; what the dirs hold is defined by trtc/artifact.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from trtc import __version__
from trtc import artifact as art
from trtc.artifact import EXPORT_CONFIG, IOTable, Mapping, RankGraph, Source, TensorInfo
from trtc.log import StageTimes, info, stage
from trtc.spec import ModelSpec, fingerprint_of

from .config import ExportConfig
from .graph_check import check_graph
from .load import LoadedModel, save_tokenizer
from .passes import PassContext, run_passes
from .quantize import QuantConfig, quantize_rank_graph


@dataclass(frozen=True)
class RankGraphs:
    """Typed hand-off from export+passes(+quantize) to build: the rank graphs on disk and what they are."""

    dir: Path
    graphs: tuple[RankGraph, ...]  # one per rank: rank0.onnx + rank0.onnx.data, ...
    spec: ModelSpec
    config: ExportConfig
    io: IOTable
    source: Source
    tokenizer_dir: Path
    pass_stats: dict[str, int]
    tokenizer_files: tuple[str, ...] = ()   # set when the tokenizer is already saved in `dir` (export dir)
    quantization: dict | None = None        # quantizer report, when the graphs are quantized
    mapping: Mapping = Mapping()

    @property
    def files(self) -> list[str]:
        return [f for g in self.graphs for f in (g.file, g.data)]


def io_table(model) -> IOTable:
    import onnx

    def rows(values) -> list[TensorInfo]:
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append(TensorInfo(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                                  [d.dim_param or d.dim_value for d in t.shape.dim]))
        return out

    return IOTable(rows(model.graph.input), rows(model.graph.output))


def export_rank_graphs(loaded: LoadedModel, cfg: ExportConfig, work: Path, times: StageTimes,
                        dump_after: tuple[str, ...], dump_dir: Path | None) -> RankGraphs:
    from .export import trace
    from .onnx_io import load_graph, save_graph

    with stage("export", times, f"torch.onnx dynamo, opset {cfg.opset}, {cfg.dtype}"):
        traced = trace(loaded, cfg, work / "traced")
    with stage("passes", times):
        graph = load_graph(traced.onnx_path)
        ctx = PassContext(spec=traced.spec, max_seq_len=cfg.max_seq_len, dump_after=dump_after,
                          dump_dir=dump_dir, check=check_graph if os.environ.get("TRTC_CHECK_PASSES") else None,
                          attention=cfg.attention, kv_block_size=cfg.kv_block_size)
        graph = run_passes(graph, ctx)
        check_graph(graph, after="all passes")
        info("[trtc]   " + ", ".join(f"{k}: {v}" for k, v in ctx.stats.items()))
        rg = RankGraph(0, art.rank_onnx(0), art.onnx_data(art.rank_onnx(0)))
        model = save_graph(graph, traced.onnx_path.parent / (traced.onnx_path.name + ".data"), work / rg.file)
        io = io_table(model)
        del model, graph
        shutil.rmtree(work / "traced", ignore_errors=True)
    return RankGraphs(dir=work, graphs=(rg,), spec=traced.spec, config=cfg, io=io,
                      source=Source(model=loaded.source, weights_sha256=loaded.weights_sha256,
                                    files_sha256=loaded.files_sha256, hf_dir=str(loaded.hf_dir)),
                      tokenizer_dir=loaded.hf_dir, pass_stats=dict(ctx.stats))


def load_export_dir(d: Path) -> RankGraphs:
    cfg = art.read_export_config(d)
    if cfg.mapping.world_size > 1:      # rank graphs of another export are named as such, before the checksums
        art.check_rank_stamps(d, cfg, "re-run trtc export")
    art.verify_files(d, cfg.files, rebuild_hint="re-run trtc export", config_name=EXPORT_CONFIG)
    return RankGraphs(dir=d, graphs=tuple(cfg.onnx), spec=cfg.pretrained_config, config=cfg.export_config,
                      io=cfg.io, source=cfg.source, tokenizer_dir=d, pass_stats=cfg.passes,
                      tokenizer_files=tuple(cfg.tokenizer_files), mapping=cfg.mapping,
                      quantization=cfg.quantization if cfg.quantization.get("config") else None)


def quantize_graphs(graphs: RankGraphs, q: QuantConfig, out_dir: Path, times: StageTimes) -> RankGraphs:
    """Quantize rank 0's graph into out_dir (may be graphs.dir); see compiler/quantize.py."""
    src = graphs.graphs[0]
    rg = RankGraph(0, art.rank_onnx(0), art.onnx_data(art.rank_onnx(0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    with stage("quantize", times, f"{q.algo}, kv cache {q.kv_cache_dtype}"):
        res = quantize_rank_graph(graphs.dir / src.file, out_dir / rg.file, graphs.spec, q,
                                  graphs.tokenizer_dir, graphs.config.max_seq_len)
    return dataclasses.replace(graphs, dir=out_dir, graphs=(rg,), io=io_table(res.model), quantization=res.report)


def shard_graphs(graphs: RankGraphs, tp: int, out_dir: Path, times: StageTimes, fingerprint: str) -> RankGraphs:
    """Split rank 0's graph into tp rank graphs in out_dir (may be graphs.dir: the source is then
    replaced); see compiler/shard.py."""
    from .shard import shard_rank_graphs

    staging = out_dir / ".shard"
    with stage("shard", times, f"tp {tp}: column/row-parallel linears, all-reduce"):
        ranks, rank0 = shard_rank_graphs(graphs.dir, graphs.graphs[0], staging, graphs.spec, tp, fingerprint)
        if out_dir.resolve() == graphs.dir.resolve():
            for n in graphs.files:
                (graphs.dir / n).unlink()
        for g in ranks:
            for n in (g.file, g.data):
                os.replace(staging / n, out_dir / n)
        staging.rmdir()
    return dataclasses.replace(graphs, dir=out_dir, graphs=tuple(ranks), io=io_table(rank0),
                               mapping=Mapping(world_size=tp, tp_size=tp))


def export_fingerprint(graphs: RankGraphs, tp: int) -> str:
    """What an export dir's rank graphs are stamped with (it has no build fingerprint): everything
    that shapes them."""
    return fingerprint_of({"trtc": __version__, "format": art.FORMAT_VERSION, "spec": graphs.spec.to_dict(),
                           "weights": graphs.source.weights_sha256, "files": graphs.source.files_sha256,
                           "export": dataclasses.asdict(graphs.config), "tp": tp,
                           "quant": (graphs.quantization or {}).get("fingerprint")})


def quantization_record(graphs: RankGraphs) -> dict:
    return graphs.quantization or {"quant_algo": None, "kv_cache_quant_algo": None}


def write_export_dir(graphs: RankGraphs, d: Path, hf_dir: Path) -> None:
    """Tokenizer files and trtc_export.json next to the rank graphs already in `d`."""
    tok = save_tokenizer(hf_dir, d)
    art.write_config(d, art.ExportDirConfig(
        format_version=art.FORMAT_VERSION, trtc_version=__version__, pretrained_config=graphs.spec,
        export_config=graphs.config, mapping=graphs.mapping, quantization=quantization_record(graphs),
        io=graphs.io, onnx=list(graphs.graphs), tokenizer_files=tok, source=graphs.source,
        passes=graphs.pass_stats, files=art.file_table(d, graphs.files + tok)))
