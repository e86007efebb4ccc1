"""Calibration for `--quant`: run the float rank graph on ONNX Runtime over windows of the
calibration text, with the activations the quantizer needs exposed as extra graph outputs, and
keep their statistics.

Calibrating the rank graph itself (not the torch model) means no mapping of torch module names to
ONNX nodes, and the statistics are those of the exact graph TensorRT will compile.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtc import artifact as art
from trtc.bundled import data_file
from trtc.errors import TrtcError
from trtc.spec import ModelSpec

from .quant_config import QuantConfig
from .quant_recipes import RECIPES

AWQ_ROWS = 512                  # activation rows kept per AWQ group for the scale search


@dataclass
class ActStats:
    """Statistics of one activation x [.., K] over the calibration windows."""
    abs_sum: np.ndarray | None = None     # [K] sum of |x| over tokens
    count: int = 0
    rows: list = dataclasses.field(default_factory=list)   # sampled [r, K] float32 blocks
    xtx: np.ndarray | None = None          # [K, K] sum of x^T x (GPTQ's Hessian, up to 2/n)
    camax: np.ndarray | None = None        # [K] max |x| per input channel

    @property
    def amax(self) -> float:
        return 0.0 if self.camax is None else float(self.camax.max())

    def channels(self, keep: np.ndarray) -> "ActStats":
        """These statistics restricted to the input channels `keep`."""
        return ActStats(abs_sum=self.abs_sum[keep], count=self.count,
                        rows=[r[:, keep] for r in self.rows],
                        xtx=None if self.xtx is None else self.xtx[np.ix_(keep, keep)],
                        camax=self.camax[keep])

    @property
    def hessian(self) -> np.ndarray:
        return self.xtx / max(self.count, 1)

    def add(self, x: np.ndarray, keep_rows: int, hessian: bool = False) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        if hessian:
            xtx = x.T @ x
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        ax = np.abs(x)
        c = ax.max(0)
        self.camax = c if self.camax is None else np.maximum(self.camax, c)
        s = ax.sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        if keep_rows:
            step = max(1, x.shape[0] // keep_rows)
            self.rows.append(x[::step][:keep_rows])


@dataclass(frozen=True)
class CalibrationPlan:
    """Which tensors to observe, and how much of each to keep."""
    names: list[str]                       # tensor names, each once, in graph order
    rows: frozenset = frozenset()          # of those, the ones whose sampled rows are kept (AWQ, clipping)
    hessian: frozenset = frozenset()       # of those, the ones whose x^T x is summed (GPTQ, low rank)


def calibration_plan(q: QuantConfig, linear_inputs: list[str], kv_inputs: list[str]) -> CalibrationPlan:
    """The activations `q` calibrates: the inputs of the quantized linears (sampled rows for AWQ and
    clipping, x^T x for GPTQ and the low-rank correction) and the new K/V of each layer (amax)."""
    names: list[str] = []
    rows: set[str] = set()
    hess: set[str] = set()
    r = RECIPES.get(q.algo)
    if r is not None and (r.calibrated or q.low_rank):
        names += linear_inputs
        if r.awq or r.clip:
            rows = set(linear_inputs)
        if r.gptq or q.low_rank:
            hess = set(linear_inputs)
    if q.kv_cache_dtype != "auto":
        names += kv_inputs
    return CalibrationPlan(list(dict.fromkeys(names)), frozenset(rows), frozenset(hess))


def calibration_windows(tokenizer_dir: Path, q: QuantConfig, max_seq_len: int) -> list[np.ndarray]:
    """The calibration text as token windows [min(calib_seq_len, max_seq_len)], spread evenly over
    the text (fewer windows than calib_samples if the text is short; positions must stay inside
    the rotary cache)."""
    from transformers import AutoTokenizer

    text = (Path(q.calib_source) if not q.calib_source.startswith("bundled:")
            else data_file(q.calib_source.removeprefix("bundled:"))).read_text(encoding="utf-8")
    ids = np.array(AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"], dtype=np.int64)
    if len(ids) < 8:
        raise TrtcError(f"--calib-data {q.calib_source} has {len(ids)} tokens; give at least a few hundred")
    S = min(q.calib_seq_len, max_seq_len, len(ids))
    total = len(ids) // S
    n = min(q.calib_samples, total)
    starts = np.linspace(0, total - 1, n).round().astype(int) * S
    return [ids[i:i + S] for i in starts]


def _session_with_outputs(graph, graph_dir: Path, names: list[str]):
    """ONNX Runtime session of `graph` (onnx-graphsurgeon, weights in graph_dir) with `names` as
    extra outputs. Activations have the logits' dtype (the model dtype)."""
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    g = graph.copy()                       # tensors are copied, weight values shared
    tensors = g.tensors()
    dtype = tensors[art.LOGITS].dtype
    have = {t.name for t in g.outputs}
    for n in names:
        if n not in have:
            t = tensors[n]
            t.dtype, t.shape = dtype, None
            g.outputs.append(t)
    # In graph_dir: the large weights are references into its data file, relative to the graph.
    tmp = graph_dir / f".calib-{os.getpid()}.onnx"
    onnx.save_model(gs.export_onnx(g), str(tmp))
    del g, tensors
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)


def calibrate(graph, graph_dir: Path, plan: CalibrationPlan, windows: list[np.ndarray], spec: ModelSpec,
              max_seq_len: int) -> dict[str, ActStats]:
    """Run `graph` over the windows (batch 1, empty cache); statistics of each tensor in `plan`."""
    sess = _session_with_outputs(graph, graph_dir, plan.names)
    cache_dtype = {i.name: {"tensor(float)": np.float32, "tensor(float16)": np.float16}[i.type]
                   for i in sess.get_inputs() if art.is_cache_input(i.name)}
    zeros = {past: np.zeros(art.cache_shape(1, spec.num_kv_heads, max_seq_len, spec.head_dim), cache_dtype[past])
             for past, _ in art.cache_names(spec.num_layers)}
    stats = {n: ActStats() for n in plan.names}
    keep = max(1, AWQ_ROWS // max(1, len(windows)))
    for w in windows:
        feeds = {art.INPUT_IDS: w[None], art.POSITION_IDS: np.arange(len(w), dtype=np.int64)[None], **zeros}
        for n, x in zip(plan.names, sess.run(plan.names, feeds)):
            stats[n].add(x, keep if n in plan.rows else 0, n in plan.hessian)
    return stats
