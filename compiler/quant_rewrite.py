"""The quantized rank graph, written with onnx-graphsurgeon like the passes.

Targets (`find_targets`): each MatMul with a constant [K, N] weight except the lm_head (the MatMul
behind `logits`), grouped by activation x (q/k/v share one, gate/up another); the TensorScatter
nodes (KV-cache writes). Before a group's first MatMul, x may get AWQ's x * (1/s), a Gather of its
outlier channels [.., n], an FP8 Q/DQ, and int4's per-group sums x @ E [.., K/G]. Each MatMul's W
becomes DequantizeLinear(stored, scales), and y = x_in @ W_q + terms: the outlier rows (float),
the low-rank correction (x_lr @ A) @ B, and int4's offset (x @ E) @ (lo + 8s) (TensorRT rejects
non-zero zero points, so int4 stores u - 8). Before each TensorScatter, a Q/DQ of the new K/V: the
cache holds 8-bit values in the model dtype (TensorRT-RTX 1.7 rejects 8-bit caches).

New nodes sit right before (or after) the node they serve, in the order they are made here, so the
graph needs no re-sort.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from trtc import artifact as art
from trtc.errors import TrtcInternalError

from . import quant_algos as qa
from .calibrate import ActStats
from .onnx_io import inline_external
from .quant_algos import FP8_MAX, INT8_MAX
from .quant_config import QuantConfig
from .quant_recipes import (NVFP4_BLOCK, RECIPES, awq_scales, dequantize, error_ratio, grid_of, hessian_root, int8_columns,
                            low_rank, quant_nvfp4, quantize_weight)
from .quant_report import QuantLog


# --- targets ------------------------------------------------------------------------------------

@dataclass
class Targets:
    matmuls: list            # MatMul nodes with a constant [K, N] weight, in graph order
    groups: dict             # activation name -> its MatMul nodes
    lm_head: object | None   # the MatMul producing the logits
    scatters: list           # TensorScatter nodes (KV cache writes)


def _lm_head(graph):
    """The MatMul behind `logits`: logits <- (Cast | Reshape | Identity)* <- MatMul."""
    t = next((o for o in graph.outputs if o.name == art.LOGITS), None)
    for _ in range(4):
        if t is None or len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if node.op == "MatMul":
            return node
        t = node.inputs[0]
    return None


def _is_weight_matmul(node) -> bool:
    w = node.inputs[1] if node.op == "MatMul" else None
    return isinstance(w, gs.Constant) and len(w.shape) == 2


def find_targets(graph) -> Targets:
    lm_head = _lm_head(graph)
    matmuls = [n for n in graph.nodes if n is not lm_head and _is_weight_matmul(n)]
    groups: dict[str, list] = {}
    for n in matmuls:
        groups.setdefault(n.inputs[0].name, []).append(n)
    return Targets(matmuls, groups, lm_head, [n for n in graph.nodes if n.op == "TensorScatter"])


# --- graph building blocks ----------------------------------------------------------------------

def _proto_const(t: TensorProto) -> gs.Constant:
    # The TensorProto itself as the values: gs exports it as is, so the bytes are held once and
    # FP8/INT4/FP4 keep their ONNX type (gs warns that numpy has no FP8 type: that is the point).
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        return gs.Constant(t.name, LazyValues(t))


def _const(c: "_Ctx", name: str, arr) -> gs.Constant:
    """A new constant; a large one goes straight to the output data file (quant_store.py)."""
    return _proto_const(c.writer.put(numpy_helper.from_array(np.asarray(arr), name)))


def _node(op: str, name: str, inputs: list, output: str | gs.Variable, **attrs) -> gs.Variable:
    """A new node; returns its output tensor."""
    out = output if isinstance(output, gs.Variable) else gs.Variable(output)
    gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=[out])
    return out


def _float_weight(w: gs.Constant, weights_dir: Path) -> np.ndarray:
    """w as float32. An external weight is read through a copy of its TensorProto, so the imported
    model never holds the float weights (one group's are in memory at a time). gs has no public
    accessor for a constant's proto; its exporter reads `_values.tensor` the same way."""
    if not isinstance(w._values, LazyValues):
        return np.asarray(w.values).astype(np.float32)
    t = TensorProto()
    t.CopyFrom(w._values.tensor)
    if uses_external_data(t):
        inline_external(t, weights_dir)
    return numpy_helper.to_array(t).astype(np.float32)


def _model_dtype(targets: Targets) -> np.dtype:
    """The weights' stored dtype (float32/float16/bfloat16): new float constants get it."""
    if not targets.matmuls:
        return np.dtype(np.float32)
    w = targets.matmuls[0].inputs[1]
    if isinstance(w._values, LazyValues):
        return helper.tensor_dtype_to_np_dtype(w._values.tensor.data_type)
    return w.values.dtype


class _Edits:
    """New nodes to place right before / after existing ones, applied to the graph at once."""

    def __init__(self) -> None:
        self._before: dict[int, list] = {}
        self._after: dict[int, list] = {}

    def before(self, anchor, *outputs: gs.Variable) -> None:
        self._before.setdefault(id(anchor), []).extend(t.inputs[0] for t in outputs)

    def after(self, anchor, *outputs: gs.Variable) -> None:
        self._after.setdefault(id(anchor), []).extend(t.inputs[0] for t in outputs)

    def apply(self, graph) -> None:
        nodes = []
        for n in graph.nodes:
            nodes += self._before.get(id(n), []) + [n] + self._after.get(id(n), [])
        graph.nodes = nodes


@dataclass
class _Ctx:
    q: QuantConfig
    edits: _Edits
    weights_dir: Path
    np_f: np.dtype          # model dtype: float constants added to the graph
    log: QuantLog
    writer: object          # quant_store.DataWriter: large new constants go to the data file at once


# --- per activation -----------------------------------------------------------------------------

@dataclass
class _Input:
    """One linear group's activation, as its quantized MatMuls see it."""
    x: gs.Variable                 # graph tensor feeding the group
    x_in: gs.Variable              # what the quantized MatMuls read (after AWQ / fp8 Q/DQ)
    x_lr: gs.Variable              # the low-rank correction's input (after AWQ)
    st: ActStats | None            # statistics of the channels left in the GEMM
    s: np.ndarray | None = None    # AWQ scales of those channels
    H: np.ndarray | None = None    # low rank: x_lr's Hessian [K, K] and its root (HessianRoot)
    root: object | None = None
    outliers: np.ndarray | None = None   # outlier channel indices, sorted
    keep: np.ndarray | None = None       # the other channels
    x_outliers: gs.Variable | None = None    # [.., n]
    group_sum: gs.Variable | None = None     # int4: x_in summed per group [.., K/G], made once
    shared: dict = field(default_factory=dict)   # quantize_weight's per-activation values


def _awq(c: _Ctx, first, inp: _Input, ws: list[np.ndarray]) -> list[np.ndarray]:
    """x_awq = x * (1/s); returns the group's weights with row k multiplied by s_k."""
    x = inp.x.name
    s, alpha, ratio = awq_scales(np.concatenate(inp.st.rows), inp.st.abs_sum / inp.st.count, ws,
                                 c.q.algo, c.q.group_size)
    c.log.awq.append((alpha, ratio))
    inp.x_in = _node("Mul", f"{x}_awq_mul", [inp.x, _const(c, f"{x}_awq_inv_scale", (1.0 / s).astype(c.np_f))],
                     f"{x}_awq")
    c.edits.before(first, inp.x_in)
    inp.s = s
    return [w * s[:, None] for w in ws]


def _split_outliers(c: _Ctx, first, inp: _Input) -> None:
    """Outlier decomposition (LLM.int8()-style): the input channels with the largest calibration
    amax (of the activation the MatMuls see) bypass the low-precision GEMM: their weight rows are
    exact zeros there and multiply those channels, in the model dtype, in a small
    [.., n] @ [n, N] MatMul added to the GEMM's output."""
    x, st, s = inp.x.name, inp.st, inp.s
    cam = st.camax if s is None else st.camax / s
    inp.outliers = np.sort(np.argsort(cam)[-c.q.outlier_channels:])
    inp.keep = np.setdiff1d(np.arange(len(cam)), inp.outliers)
    inp.x_outliers = _node("Gather", f"{x}_outlier_gather",
                           [inp.x_in, _const(c, f"{x}_outlier_idx", inp.outliers.astype(np.int64))],
                           f"{x}_outliers", axis=-1)
    c.edits.before(first, inp.x_outliers)
    c.log.outliers.append(float(cam.max() / max(cam[inp.keep].max(), 1e-8)))
    inp.st = st.channels(inp.keep)
    inp.s = None if s is None else s[inp.keep]


def _fp8_activation(c: _Ctx, first, inp: _Input) -> None:
    """x_in = DQ(Q(x)) in FP8 e4m3, per-tensor scale from the calibration amax; outlier channels
    are zeroed before the quantizer, so they do not set its scale."""
    x, x_q = inp.x.name, inp.x
    if inp.outliers is not None:
        mask = np.ones(len(inp.outliers) + len(inp.keep), c.np_f)
        mask[inp.outliers] = 0
        x_q = _node("Mul", f"{x}_inlier_mul", [inp.x, _const(c, f"{x}_inlier_mask", mask)], f"{x}_fp8_inliers")
        c.edits.before(first, x_q)
    sc = _const(c, f"{x}_fp8_scale", np.array(max(inp.st.amax, 1e-8) / FP8_MAX, dtype=c.np_f))
    zp = _proto_const(helper.make_tensor(f"{x}_fp8_zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    q8 = _node("QuantizeLinear", f"{x}_fp8_q", [x_q, sc, zp], f"{x}_fp8")
    inp.x_in = _node("DequantizeLinear", f"{x}_fp8_dq", [q8, sc], f"{x}_fp8_dq")
    c.edits.before(first, q8, inp.x_in)


def _group_input(c: _Ctx, first, st: ActStats | None, ws: list[np.ndarray]) -> tuple[_Input, list[np.ndarray]]:
    """The steps on the group's activation, placed before its first MatMul; returns the input and
    the weights the quantized GEMMs approximate (AWQ-scaled)."""
    x = first.inputs[0]
    inp = _Input(x=x, x_in=x, x_lr=x, st=st)
    if c.q.algo in RECIPES and RECIPES[c.q.algo].awq:
        ws = _awq(c, first, inp, ws)
    inp.x_lr = inp.x_in
    if c.q.low_rank:
        inp.H = st.hessian if inp.s is None else st.hessian / np.outer(inp.s, inp.s)
        inp.root = hessian_root(inp.H)
    if c.q.outlier_channels:
        _split_outliers(c, first, inp)
    elif inp.H is not None:
        # GPTQ needs this same matrix (st.hessian / outer(s, s)); one copy of a [K, K] float64
        # (1.6 GB at K = 14336) instead of two. With outlier channels GPTQ sees a subset.
        inp.shared["hessian"] = inp.H
    if c.q.algo == "fp8":
        _fp8_activation(c, first, inp)
    return inp, ws


# --- per linear: each builder places its own nodes ----------------------------------------------

def _round(c: _Ctx, n, w: np.ndarray, grid: qa.Grid, inp: _Input, base: str, terms: list):
    """(stored values [K, N], scales, offsets or None, the weight the graph applies, as float).
    Outlier rows are exact zeros in the stored values and go to a float MatMul term."""
    if inp.outliers is None:
        qv, sc, lo = quantize_weight(w, c.q.algo, grid, inp.st, inp.s, inp.shared)
        return qv, sc, lo, dequantize(qv, grid, sc, lo)
    qk, sc, lo = quantize_weight(w[inp.keep], c.q.algo, grid, inp.st, inp.s, inp.shared)
    qv = np.zeros_like(w)
    qv[inp.keep] = qk
    t = _node("MatMul", f"{base}_outlier_mm",
              [inp.x_outliers, _const(c, base + "_outlier_rows", w[inp.outliers].astype(c.np_f))], f"{base}_outl")
    c.edits.after(n, t)
    terms.append(t)
    eff = w.copy()
    eff[inp.keep] = dequantize(qk, grid, sc, lo)
    return qv, sc, lo, eff


def _low_rank_term(c: _Ctx, n, err: np.ndarray, inp: _Input, base: str) -> gs.Variable:
    """(x_lr @ A) @ B ~ x_lr @ err, A [K, r] and B [r, N] stored as int8 with a scale per column."""
    fac = [int8_columns(f) for f in low_rank(err, inp.root, c.q.low_rank)]
    (aq, asc), (bq, bsc) = fac
    c.log.low_rank.append(error_ratio(err, aq * asc, bq * bsc, inp.H))
    t = inp.x_lr
    for which, (fq, fs), out in (("a", fac[0], f"{base}_lr_a"), ("b", fac[1], f"{base}_lr")):
        qname = f"{base}_lowrank_{which}"
        f = _node("DequantizeLinear", f"{qname}_dq", [_const(c, qname, fq), _const(c, f"{qname}_s", fs.astype(c.np_f))],
                  f"{qname}_w", axis=1)
        t = _node("MatMul", f"{qname}_mm", [t, f], out)
        c.edits.after(n, f, t)
    return t


def _stored(c: "_Ctx", qv: np.ndarray, grid: qa.Grid, name: str) -> gs.Constant:
    import ml_dtypes

    if grid.kind == "fp8":
        return _const(c, name, qv.astype(ml_dtypes.float8_e4m3fn))
    if grid.group == 0:
        return _const(c, name, qv.astype(np.int8))
    return _const(c, name, (qv - 8).astype(ml_dtypes.int4))       # u - 8: -8..7


def _int4_offset_term(c: _Ctx, n, first, inp: _Input, grid: qa.Grid, off: np.ndarray, base: str) -> gs.Variable:
    """x_groupsum @ off [K/G, N]; x_groupsum = x_in @ E, E [K, K/G] the group indicator, is made
    once per group, before its first MatMul."""
    if inp.group_sum is None:
        ind = np.kron(np.eye(off.shape[0], dtype=c.np_f), np.ones((grid.group, 1), dtype=c.np_f))
        x_in = inp.x_in.name
        inp.group_sum = _node("MatMul", f"{x_in}_groupsum", [inp.x_in, _const(c, f"{x_in}_group_ind", ind)],
                              f"{x_in}_groupsum")
        c.edits.before(first, inp.group_sum)
    t = _node("MatMul", f"{base}_offset_mm", [inp.group_sum, _const(c, base + "_offset", off.astype(c.np_f))],
              f"{base}_off")
    c.edits.after(n, t)
    return t


def _grid_weight(c: _Ctx, n, first, w: np.ndarray, grid: qa.Grid, inp: _Input, terms: list) -> gs.Variable:
    """W_q = DequantizeLinear(stored, scales) on the mode's grid; correction terms go to `terms`."""
    base = f"{n.inputs[1].name}_{c.q.algo}"
    qv, sc, lo, eff = _round(c, n, w, grid, inp, base, terms)
    if c.q.low_rank:
        terms.append(_low_rank_term(c, n, w - eff, inp, base))
    scales = (sc if grid.group else sc.reshape(-1)).astype(c.np_f)      # [K/G, N] per block, else [N]
    blocks = {"axis": 0, "block_size": grid.group} if grid.group else {"axis": 1}
    w_q = _node("DequantizeLinear", base + "_dq", [_stored(c, qv, grid, base + "_q"), _const(c, base + "_s", scales)],
                base + "_w", **blocks)
    if lo is not None:
        # w = s*u + lo = s*(u-8) + (lo + 8s):  x @ w = x @ DQ(u-8) + (x @ E) @ (lo + 8s)
        terms.append(_int4_offset_term(c, n, first, inp, grid, lo + 8.0 * sc, base))
    c.edits.before(n, w_q)
    return w_q


def _nvfp4_weight(c: _Ctx, n, w: np.ndarray) -> gs.Variable:
    """W_q = DQ(fp4 values, DQ(fp8 block scales, fp32 global scale)), blocks of 16 rows."""
    base = f"{n.inputs[1].name}_{c.q.algo}"
    qv, s8, g = quant_nvfp4(w)
    scales = _node("DequantizeLinear", base + "_sdq",
                   [_const(c, base + "_s8", s8), _const(c, base + "_gs", np.array(g, dtype=c.np_f))], base + "_s")
    w_q = _node("DequantizeLinear", base + "_dq", [_const(c, base + "_q", qv), scales], base + "_w",
                axis=0, block_size=NVFP4_BLOCK)
    c.edits.before(n, scales, w_q)
    return w_q


def _add_terms(c: _Ctx, n, terms: list[gs.Variable]) -> None:
    """y = (x @ W_q) + each term: the MatMul writes a new tensor, the last Add its old output."""
    if not terms:
        return
    y = n.outputs[0]
    acc = gs.Variable(f"{y.name}_{c.q.algo}_main")
    n.outputs[0] = acc
    for i, t in enumerate(terms):
        acc = _node("Add", f"{t.name}_add", [acc, t], y if i == len(terms) - 1 else f"{y.name}_{c.q.algo}_acc{i}")
        c.edits.after(n, acc)


def _rewrite_group(c: _Ctx, nodes: list, st: ActStats | None, grid: qa.Grid | None) -> None:
    """Quantize the MatMuls reading one activation."""
    first = nodes[0]
    ws = [_float_weight(n.inputs[1], c.weights_dir) for n in nodes]
    inp, ws = _group_input(c, first, st, ws)
    for n, w in zip(nodes, ws):
        terms: list[gs.Variable] = []
        if grid is not None:
            w_q = _grid_weight(c, n, first, w, grid, inp, terms)
        elif c.q.algo == "nvfp4":
            w_q = _nvfp4_weight(c, n, w)
        else:
            raise TrtcInternalError(f"quantize: no weight rule for {c.q.algo}")
        _add_terms(c, n, terms)
        n.inputs[1] = w_q
        n.inputs[0] = inp.x_in


# --- KV cache -----------------------------------------------------------------------------------

def _kv_quantizer(c: _Ctx, scatter, st: ActStats) -> None:
    """Q/DQ of the new K or V [B, Hkv, S, D] with one calibrated scale, before the cache write."""
    kv = c.q.kv_cache_dtype
    qmax, qtype = (FP8_MAX, TensorProto.FLOAT8E4M3FN) if kv == "fp8" else (INT8_MAX, TensorProto.INT8)
    cache = scatter.outputs[0].name
    sv = max(st.amax, 1e-8) / qmax
    c.log.kv_scales[cache] = sv
    base = f"{cache}_kv{kv}"
    sc = _const(c, base + "_s", np.array(sv, dtype=c.np_f))
    zp = _proto_const(helper.make_tensor(base + "_zp", qtype, [], [0]))
    q8 = _node("QuantizeLinear", base + "_q", [scatter.inputs[1], sc, zp], base + "_q")
    dq = _node("DequantizeLinear", base + "_dq", [q8, sc], base + "_dq")
    c.edits.before(scatter, q8, dq)
    scatter.inputs[1] = dq


# --- the whole graph ----------------------------------------------------------------------------

class Rewriter:
    """Quantizes `graph` in place a few groups at a time (a decoder layer's, as their statistics
    come in), each new constant written to `writer` as it is made; `finish` places the new nodes
    and writes the graph."""

    def __init__(self, graph, targets: Targets, q: QuantConfig, weights_dir: Path, writer) -> None:
        np_f = _model_dtype(targets)
        self.graph, self.targets = graph, targets
        self.c = _Ctx(q, _Edits(), weights_dir, np_f, QuantLog(linears=len(targets.matmuls),
                                                               storage_dtype=np_f.name), writer)
        self.grid = grid_of(q.algo, q.group_size) if q.algo in RECIPES else None
        self.scatters = {n.inputs[1].name: n for n in targets.scatters}
        self.done: set[str] = set()

    def quantize(self, names, stats: dict[str, ActStats]) -> int:
        """Quantize the linear groups reading the activations `names` and the KV writes of the
        K/V tensors among them (`stats` of each, where calibrated); returns the MatMuls done."""
        c, done = self.c, 0
        for x in names:
            if c.q.algo != "none" and x in self.targets.groups and x not in self.done:
                self.done.add(x)
                _rewrite_group(c, self.targets.groups[x], stats.get(x), self.grid)
                done += len(self.targets.groups[x])
            if c.q.kv_cache_dtype != "auto" and x in self.scatters:
                _kv_quantizer(c, self.scatters[x], stats[x])
        return done

    def finish(self, out: Path) -> tuple[onnx.ModelProto, QuantLog]:
        """Place the new nodes, write `out` + its data file (quant_store.py); the model proto
        without weights and what the rewrite measured. Groups no calibration observed (int4_rtn
        with a calibrated KV cache) are quantized here."""
        self.quantize(list(self.targets.groups), {})
        self.c.edits.apply(self.graph)
        model = gs.export_onnx(self.graph)
        del self.graph
        self.c.writer.finish(model, self.c.weights_dir)
        return model, self.c.log
