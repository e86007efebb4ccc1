"""Calibration for `--quant`: run the float rank graph on ONNX Runtime over windows of the
calibration text one decoder layer at a time (calib_slices.py), with the activations the quantizer
needs exposed as outputs of each layer's slice, and keep their statistics.

Calibrating the rank graph itself (not the torch model) means no mapping of torch module names to
ONNX nodes, and the statistics are those of the exact graph TensorRT will compile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtc import artifact as art
from trtc.bundled import data_file
from trtc.errors import TrtcError, TrtcInternalError
from trtc.spec import ModelSpec

from .quant_config import QuantConfig
from .quant_recipes import RECIPES

AWQ_ROWS = 512                  # activation rows kept per AWQ group for the scale search
HESSIAN_ROWS = 2048             # activation rows per x^T x product (8 MB per 1024 channels)


def gram(x, block: int = 256):
    """x^T x [K, K] of x [R, K] (a float32 torch tensor), computed block by block over the upper
    triangle and mirrored: x^T x is symmetric, and torch has no syrk, so this does 52-67% of a full
    product's work for K of 576 to 5632."""
    import torch

    k = x.shape[1]
    if k <= block:
        return x.T @ x
    out = torch.empty((k, k), dtype=x.dtype)
    for i in range(0, k, block):
        xi = x[:, i:i + block]
        out[i:i + block, i:] = xi.T @ x[:, i:]
        out[i + block:, i:i + block] = out[i:i + block, i + block:].T
    return out


@dataclass
class ActStats:
    """Statistics of one activation x [.., K] over the calibration windows."""
    abs_sum: np.ndarray | None = None     # [K] sum of |x| over tokens
    count: int = 0
    rows: list = dataclasses.field(default_factory=list)   # sampled [r, K] float32 blocks
    xtx: np.ndarray | None = None          # [K, K] sum of x^T x (GPTQ's Hessian, up to 2/n)
    camax: np.ndarray | None = None        # [K] max |x| per input channel
    _pending: list = dataclasses.field(default_factory=list, repr=False)   # rows not yet in xtx

    @property
    def amax(self) -> float:
        return 0.0 if self.camax is None else float(self.camax.max())

    def channels(self, keep: np.ndarray) -> "ActStats":
        """These statistics restricted to the input channels `keep`."""
        self.flush()
        return ActStats(abs_sum=self.abs_sum[keep], count=self.count,
                        rows=[r[:, keep] for r in self.rows],
                        xtx=None if self.xtx is None else self.xtx[np.ix_(keep, keep)],
                        camax=self.camax[keep])

    @property
    def hessian(self) -> np.ndarray:
        self.flush()
        return self.xtx / max(self.count, 1)

    def flush(self) -> None:
        """Add the pending rows' x^T x to `xtx`: one [rows, K] product for many windows, in torch
        (numpy's OpenBLAS took 8 ms for one 128x576 window's x^T x on the 2-core VM, torch's MKL
        1 ms; per window it was most of the calibration time)."""
        if not self._pending:
            return
        import torch

        x = torch.from_numpy(np.concatenate(self._pending))
        self._pending.clear()
        xtx = gram(x).numpy()
        self.xtx = xtx if self.xtx is None else self.xtx + xtx

    def add(self, x: np.ndarray, keep_rows: int, hessian: bool = False) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        if hessian:
            self._pending.append(x)
            if sum(len(p) for p in self._pending) >= HESSIAN_ROWS:
                self.flush()
        ax = np.abs(x)
        c = ax.max(0)
        self.camax = c if self.camax is None else np.maximum(self.camax, c)
        s = ax.sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        if keep_rows:
            # a copy: a view would keep the whole window's activation alive (before the copy, the
            # rows of 128 windows x 120 tensors held SmolLM2's int4_awq calibration at 8 GiB)
            step = max(1, x.shape[0] // keep_rows)
            self.rows.append(x[::step][:keep_rows].copy())


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


def _session(model, graph_dir: Path):
    """ONNX Runtime session of a slice model whose weights are references into graph_dir's data file
    (saved next to it so the relative references resolve; removed once loaded)."""
    import onnx
    import onnxruntime as ort

    from .quant_algos import threads

    tmp = graph_dir / f".calib-{os.getpid()}.onnx"
    onnx.save_model(model, str(tmp))
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # the quantizer's thread count (quant_algos.threads()), threads that sleep when idle: ORT's
        # default (one spinning thread per core) lost time to spinning beside other jobs
        so.intra_op_num_threads = threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)


def _graph_feeds(names: list[str], w: np.ndarray, types: dict[str, int], spec: ModelSpec,
                 cache_len: int) -> dict[str, np.ndarray]:
    """Graph inputs of one window (batch 1): its tokens, positions 0..S-1, empty caches of
    `cache_len` positions."""
    from onnx import helper

    feeds = {}
    for n in names:
        if n == art.INPUT_IDS:
            feeds[n] = w[None]
        elif n == art.POSITION_IDS:
            feeds[n] = np.arange(len(w), dtype=np.int64)[None]
        elif art.is_cache_input(n):
            feeds[n] = np.zeros(art.cache_shape(1, spec.num_kv_heads, cache_len, spec.head_dim),
                                helper.tensor_dtype_to_np_dtype(types[n]))
        else:
            raise TrtcInternalError(f"calibration: no value for graph input {n}")
    return feeds


def _run(sess, outputs: list[str], cache_len: list[int], feeds) -> list[np.ndarray]:
    """sess.run with the caches of `feeds(cache_len[0])`. Empty caches as long as the window
    (not max_seq_len) give the same activations (the positions past the window are masked) at
    a fraction of the attention's cost: SmolLM2's calibration at max_seq_len 2048 took twice as
    long. A slice that refuses them (a graph whose shapes fix the cache length) runs with the
    full length, and so do the slice's later windows (cache_len is updated)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    while True:
        try:
            return sess.run(outputs, feeds(cache_len[0]))
        except (Fail, InvalidArgument, RuntimeException):   # a shape refused; nothing else is retried
            if len(cache_len) == 1:
                raise
            cache_len.pop(0)


def calibrate_by_unit(graph_path: Path, plan: CalibrationPlan, windows: list[np.ndarray], spec: ModelSpec,
                      max_seq_len: int, cache_len: int | None = None) -> Iterator[tuple[int, dict[str, ActStats], float]]:
    """Run the rank graph over the windows (batch 1, empty cache) one slice at a time
    (calib_slices.py); yields (unit, statistics of the tensors of `plan` that unit makes, seconds).
    Held at once: one slice's session and weights, the carried tensors of every window
    ([windows, S, hidden]-sized) and one unit's statistics. The empty KV caches have `cache_len`
    positions, default the window length (see `_run`)."""
    import onnx

    from .calib_slices import elem_types, slice_model, slices

    top = max(int(w.max()) for w in windows)
    if top >= spec.vocab_size:
        raise TrtcError(f"calibration: the tokenizer makes token id {top}, past this model's vocab size "
                        f"{spec.vocab_size}; the model dir's tokenizer is not the model's own: give it the "
                        f"model's tokenizer (or --calib-data text whose tokens are all under {spec.vocab_size})")
    model = onnx.load(str(graph_path), load_external_data=False)
    types = elem_types(model)
    parts = slices(model.graph, plan.names)
    last_read = {t: s.unit for s in parts for t in s.inputs}
    carried: dict[str, list[np.ndarray]] = {}
    keep = max(1, AWQ_ROWS // max(1, len(windows)))
    for s in parts:
        t0 = time.time()
        sess = _session(slice_model(model, s, types), graph_path.parent)
        stats = {n: ActStats() for n in s.observed}
        made: dict[str, list[np.ndarray]] = {t: [] for t in s.carried_out}
        graph_inputs = [t for t in s.inputs if t not in carried]
        lens = [cache_len or len(windows[0]), max_seq_len]
        for k, w in enumerate(windows):
            for n, x in zip(s.outputs, _run(sess, s.outputs, lens, lambda c: {
                    **_graph_feeds(graph_inputs, w, types, spec, c),
                    **{t: carried[t][k] for t in s.inputs if t in carried}})):
                if n in made:
                    made[n].append(x)
                if n in stats:
                    stats[n].add(x, keep if n in plan.rows else 0, n in plan.hessian)
        del sess
        carried.update(made)
        for t in [t for t in carried if last_read.get(t, -2) <= s.unit]:
            del carried[t]
        yield s.unit, stats, time.time() - t0
