"""Stage 3b, quantize: calibrate the rank graph on ONNX Runtime, store its weights in low precision.

Runs after the passes, on the rank ONNX graph (`rank0.onnx` + external data), so the same graph
feeds the TensorRT build and the reference backend: accuracy measured on ONNX Runtime is the
accuracy of the graph TensorRT compiled.

  quant_config.py    options, per-mode defaults, target policy, per-model adjustments
  calibrate.py       calibration windows, the float graph on ONNX Runtime, activation statistics
  quant_recipes.py   per-mode grids and rounding steps (algorithms: quant_algos.py)
  quant_rewrite.py   the quantized graph (onnx-graphsurgeon)
  quant_report.py    config.json `quantization`

Why not nvidia-modelopt: its quantized torch models export only through the legacy TorchScript
exporter, as custom ops ONNX Runtime cannot run (the reference backend could not check them) and
that bypass trtc's export and passes; its `[onnx]` extra pins onnx/onnxruntime/transformers
versions that conflict with trtc's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtc.errors import TrtcInternalError
from trtc.log import info
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
    """Quantize `src` (rank graph + external data) into `out` (+ its data file).
    `out` may equal `src`: everything is read before anything is written."""
    # onnx-graphsurgeon and ONNX Runtime load only when a graph is quantized (not for `trtc --help`)
    from .calibrate import calibrate, calibration_plan, calibration_windows
    from .onnx_io import load_graph
    from .quant_report import quant_report
    from .quant_rewrite import find_targets, rewrite, save

    q = resolve_for_model(q, spec)
    graph = load_graph(src)
    targets = find_targets(graph)
    if q.algo != "none" and not targets.matmuls:
        raise TrtcInternalError("quantize: no MatMul with a constant weight in the rank graph")
    stats = {}
    if q.needs_calibration:
        plan = calibration_plan(q, list(targets.groups), [n.inputs[1].name for n in targets.scatters])
        windows = calibration_windows(tokenizer_dir, q, max_seq_len)
        info(f"[trtc]   calibration: {len(windows)} windows of {len(windows[0])} tokens, "
             f"{len(plan.names)} tensors")
        stats = calibrate(graph, src.parent, plan, windows, spec, max_seq_len)
    log = rewrite(graph, targets, q, stats, src.parent)
    model = save(graph, src.parent, out)
    return QuantResult(onnx_path=out, model=model, report=quant_report(q, log))
