"""Stage 3b, quantize: calibrate the rank graph on ONNX Runtime, store its weights in low precision,
one decoder layer at a time (memory grows with one layer, not the model).

Runs after the passes, on the rank ONNX graph (`rank0.onnx` + external data), so the same graph
feeds the TensorRT build and the reference backend: accuracy measured on ONNX Runtime is the
accuracy of the graph TensorRT compiled.

  quant_config.py    options, per-mode defaults, target policy, per-model adjustments
  calib_slices.py    the rank graph cut into one slice per decoder layer
  calibrate.py       calibration windows, the slices on ONNX Runtime, activation statistics
  quant_recipes.py   per-mode grids and rounding steps (algorithms: quant_algos.py)
  quant_rewrite.py   the quantized graph (onnx-graphsurgeon)
  quant_store.py     its data file, written as the quantized tensors are made
  quant_report.py    config.json `quantization`

Why not nvidia-modelopt: its quantized torch models export only through the legacy TorchScript
exporter, as custom ops ONNX Runtime cannot run (the reference backend could not check them) and
that bypass trtc's export and passes; its `[onnx]` extra pins onnx/onnxruntime/transformers
versions that conflict with trtc's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trtc.errors import TrtcInternalError
from trtc.log import info, peak_rss_mb
from trtc.spec import ModelSpec

from .quant_config import (ALGOS, KV_CACHE_DTYPES, QuantConfig, check_targets, default_targets,  # noqa: F401
                           make_quant_config, resolve_for_model)
from .quant_recipes import grid_of, qdq, quant_nvfp4  # noqa: F401


@dataclass(frozen=True)
class QuantResult:
    onnx_path: Path
    model: object          # ModelProto without weights, for the io table
    report: dict           # config.json "quantization"


def quantize_rank_graph(src: Path, out: Path, spec: ModelSpec, q: QuantConfig, tokenizer_dir: Path,
                        max_seq_len: int) -> QuantResult:
    """Quantize `src` (rank graph + external data) into `out` (+ its data file), one decoder layer
    at a time: calibrate the layer's slice of the graph, quantize its linears, write their tensors.
    `out` may equal `src`: the data file is written under a temporary name and renamed last."""
    # onnx-graphsurgeon and ONNX Runtime load only when a graph is quantized (not for `trtc --help`)
    from .onnx_io import load_graph
    from .quant_report import quant_report
    from .quant_algos import cpu_threads
    from .quant_rewrite import find_targets
    from .quant_store import DataWriter

    q = resolve_for_model(q, spec)
    graph = load_graph(src)
    targets = find_targets(graph)
    if q.algo != "none" and not targets.matmuls:
        raise TrtcInternalError("quantize: no MatMul with a constant weight in the rank graph")
    writer = DataWriter(out)
    try:
        with cpu_threads():
            model, log = _quantize_layers(src, out, q, graph, targets, writer, spec, tokenizer_dir, max_seq_len)
    except BaseException:
        writer.abort()
        raise
    return QuantResult(onnx_path=out, model=model, report=quant_report(q, log))


def _quantize_layers(src: Path, out: Path, q: QuantConfig, graph, targets, writer, spec: ModelSpec,
                     tokenizer_dir: Path, max_seq_len: int):
    """Per slice of the graph (calib_slices.py): its statistics, then its linears quantized and
    written; one progress line each. Returns (model proto without weights, QuantLog)."""
    from .quant_rewrite import Rewriter

    rw = Rewriter(graph, targets, q, src.parent, writer)
    layers = (_calibrated_layers(src, q, targets, spec, tokenizer_dir, max_seq_len) if q.needs_calibration
              else _layers(src, list(targets.groups)))
    for unit, stats, secs in layers:
        t0 = time.time()
        n = rw.quantize(list(stats), stats)
        if n or q.kv_cache_dtype != "auto":
            calib = f"calibrated in {secs:.1f} s, " if q.needs_calibration else ""
            info(f"[trtc]   {_unit_name(unit, spec)}: {n} linears, {calib}quantized in {time.time() - t0:.1f} s "
                 f"(peak RSS {peak_rss_mb():.0f} MiB)")
    return rw.finish(out)


def _unit_name(unit: int, spec: ModelSpec) -> str:
    """Unit i of the slices spans layer i's attention to layer i+1's projections (calib_slices.py)."""
    return "layer 0 inputs" if unit < 0 else f"layer {unit + 1}/{spec.num_layers}"


def _calibrated_layers(src: Path, q: QuantConfig, targets, spec: ModelSpec, tokenizer_dir: Path,
                       max_seq_len: int) -> Iterator[tuple[int, dict, float]]:
    from .calibrate import calibrate_by_unit, calibration_plan, calibration_windows

    plan = calibration_plan(q, list(targets.groups), [n.inputs[1].name for n in targets.scatters])
    windows = calibration_windows(tokenizer_dir, q, max_seq_len)
    info(f"[trtc]   calibration: {len(windows)} windows of {len(windows[0])} tokens, "
         f"{len(plan.names)} tensors, one decoder layer at a time")
    yield from calibrate_by_unit(src, plan, windows, spec, max_seq_len)


def _layers(src: Path, names: list[str]) -> Iterator[tuple[int, dict, float]]:
    """Without calibration: the linear groups bucketed by unit, as `_calibrated_layers` yields them."""
    import onnx

    from .calib_slices import node_units

    unit = node_units(onnx.load(str(src), load_external_data=False).graph)
    for u in sorted({unit[x] for x in names}):
        yield u, {x: None for x in names if unit[x] == u}, 0.0
