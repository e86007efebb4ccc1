"""Per-mode weight recipes: the grid each `--quant` mode stores and the calibration-based steps
that choose the grid and the rounding (the algorithms are in quant_algos.py).

Weights are in the ONNX MatMul layout [K, N] (K input channels = rows).
  int8_wo   int8 symmetric, one scale per output column; GPTQ rounding.
  int8_awq  int8_wo after AWQ input-channel scales.
  int4_rtn  int4 affine per group of `group_size` rows (w ~ s * u + lo, u in 0..15, Q4_1-style);
            round to nearest. TensorRT rejects non-zero zero points, so the graph stores u - 8 and
            adds the offset back in a separate MatMul (quant_rewrite.py).
  int4_awq  int4_rtn's grid after AWQ scales, AWQ's clipping search, GPTQ rounding.
  fp8       FP8 e4m3 per output column, GPTQ rounding (activations: per-tensor, see quant_rewrite.py).
  nvfp4     FP4 e2m1 in blocks of 16 rows, FP8 e4m3 block scales, one fp32 global scale; no
            calibration (`quant_nvfp4`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .quant_grid import FP8_MAX, INT8_MAX, Grid

if TYPE_CHECKING:
    from .calibrate import ActStats

def _qa():
    """The torch algorithms, imported when first used (torch takes seconds to import; option
    checks and `trtc --help` need none of it)."""
    from . import quant_algos
    return quant_algos


NVFP4_BLOCK = 16       # input rows per FP8 block scale
FP4_MAX = 6.0          # largest e2m1 magnitude


@dataclass(frozen=True)
class Recipe:
    grid: str              # int8 (symmetric, per output channel) | int4 (affine, per group) | fp8
    awq: bool = False      # activation-aware input-channel scales, alpha searched
    clip: bool = False     # per-group range clipping, ratio searched on calibration rows
    gptq: bool = False     # GPTQ rounding with the layer's input Hessian
    weights: str = ""      # config.json description

    @property
    def calibrated(self) -> bool:      # fp8 also calibrates its activation scales
        return self.awq or self.clip or self.gptq or self.grid == "fp8"


_INT4 = "int4 affine (scale and float offset per group of input rows): int4 values in a blockwise " \
        "DequantizeLinear, the offset added back as (x summed per group) @ offset"
RECIPES = {
    "int8_wo": Recipe("int8", gptq=True,
                      weights="int8 symmetric, per-output-channel scales, GPTQ rounding"),
    "int8_awq": Recipe("int8", awq=True, gptq=True,
                       weights="int8 symmetric, per-output-channel scales, activation-aware input "
                               "scaling (AWQ), GPTQ rounding"),
    "int4_rtn": Recipe("int4", weights=_INT4 + "; round to nearest"),
    "int4_awq": Recipe("int4", awq=True, clip=True, gptq=True,
                       weights=_INT4 + "; activation-aware input scaling (AWQ), clipping search, GPTQ rounding"),
    "fp8": Recipe("fp8", gptq=True, weights="fp8 e4m3, per-output-channel scales, GPTQ rounding"),
}


def grid_of(algo: str, group_size: int) -> Grid:
    kind = RECIPES[algo].grid
    if kind == "int8":
        return Grid("int", -int(INT8_MAX), int(INT8_MAX), 0)
    if kind == "int4":
        return Grid("int", 0, 15, group_size)
    return Grid("fp8", 0, 0, 0)


def quantize_weight(w: np.ndarray, algo: str, grid: Grid, st: ActStats | None,
                    s: np.ndarray | None = None, shared: dict | None = None):
    """(stored values, scales [G, N], offsets [G, N] or None), numpy, of w [K, N] (already
    multiplied by the AWQ scales `s`, whose inverse the activation gets); computed in torch on
    `qa.device()`. `shared` (one dict per activation) keeps what the linears reading the same
    activation share: the clipping search's rows and GPTQ's factor of the Hessian."""
    qa = _qa()
    r = RECIPES[algo]
    dev = qa.device()
    shared = {} if shared is None else shared
    wt = qa.tensor(w, dev)
    s = np.ones(w.shape[0], np.float32) if s is None else s
    clip = 1.0
    if r.clip:
        if "x" not in shared:
            shared["x"] = qa.tensor(np.concatenate(st.rows) / s, dev)
        clip = qa.clip_search(wt, shared["x"], grid)
    if r.gptq:
        if "gptq" not in shared:
            # the scaled Hessian the low-rank step already made (quant_rewrite puts it in `shared`:
            # the same expression, so the same values), else made here
            H = shared.get("hessian")
            H = st.hessian / np.outer(s, s) if H is None else H
            shared["gptq"] = qa.GptqFactor(qa.tensor(H, dev, qa.F64))
            del H
        out = qa.gptq(wt, shared["gptq"], grid, clip=None if not r.clip else clip)
    else:
        out = qa.rtn(wt, grid, clip)
    return tuple(None if t is None else qa.numpy(t) for t in out)


def dequantize(q: np.ndarray, grid: Grid, s: np.ndarray, lo: np.ndarray | None) -> np.ndarray:
    """The weight the graph applies (float32, numpy) for stored values q."""
    qa = _qa()
    t = qa.tensor
    return qa.numpy(qa.dequantize(t(q), grid, t(s), None if lo is None else t(lo)))


def awq_scales(x: np.ndarray, mean_abs: np.ndarray, ws: list[np.ndarray], algo: str, group_size: int):
    """qa.awq_scales on numpy inputs: (s [K] float32 numpy, alpha, loss ratio vs plain rounding)."""
    qa = _qa()
    dev = qa.device()
    s, alpha, ratio = qa.awq_scales(qa.tensor(x, dev), qa.tensor(mean_abs, dev), [qa.tensor(w, dev) for w in ws],
                                    qdq(algo, group_size))
    return qa.numpy(s), alpha, ratio


def hessian_root(H: np.ndarray):
    """qa.HessianRoot of a numpy Hessian; it stays on the device for `low_rank`."""
    qa = _qa()
    return qa.HessianRoot(qa.tensor(H, qa.device(), qa.F64))


def low_rank(err: np.ndarray, root, r: int) -> tuple[np.ndarray, np.ndarray]:
    """qa.low_rank factors (A [K, r], B [r, N], numpy float32) of a numpy weight error."""
    qa = _qa()
    A, B = qa.low_rank(qa.tensor(err, root.device, qa.F64), root, r)
    return qa.numpy(A), qa.numpy(B)


def qdq(algo: str, group_size: int):
    """[K, N] tensor -> the weight as the graph will see it after round-to-nearest (for searches)."""
    grid = grid_of(algo, group_size)

    def f(w):
        qa = _qa()
        q, sc, lo = qa.rtn(w, grid)
        return qa.dequantize(q, grid, sc, lo)
    return f


def quant_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """FP4 e2m1 values, FP8 e4m3 block scales [K/16, N], fp32 global scale (NVFP4 recipe)."""
    import ml_dtypes

    K, N = w.shape
    wb = w.reshape(K // NVFP4_BLOCK, NVFP4_BLOCK, N)
    block = np.maximum(np.abs(wb).max(1), 1e-12) / FP4_MAX                  # [K/16, N] float
    gscale = np.float32(max(float(block.max()), 1e-12) / FP8_MAX)
    s8 = (block / gscale).astype(ml_dtypes.float8_e4m3fn)
    s = np.maximum(s8.astype(np.float32) * gscale, 1e-12)
    q = (wb / s[:, None, :]).reshape(K, N).astype(ml_dtypes.float4_e2m1fn)
    return q, s8, gscale


def int8_columns(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per column: (values int8 [.., C], scales [C]) (low-rank factors)."""
    sc = np.maximum(np.abs(m).max(0), 1e-30) / INT8_MAX
    return np.clip(np.round(m / sc), -INT8_MAX, INT8_MAX).astype(np.int8), sc.astype(np.float32)


def error_ratio(e: np.ndarray, a: np.ndarray, b: np.ndarray, H: np.ndarray) -> float:
    """sqrt(tr((e-c)^T H (e-c)) / tr(e^T H e)) for c = a @ b [K, r] x [r, N]: output error left
    after correcting e by c (on `qa.device()`). A reported figure only (config.json, 4 digits), so
    float32: H (e - c) = H e - (H a) b, one [K, K] x [K, N] product."""
    qa = _qa()
    dev = qa.device()
    Ht, et, at, bt = (qa.tensor(m, dev) for m in (H, e, a, b))
    He = Ht @ et
    left = float(((et - at @ bt) * (He - (Ht @ at) @ bt)).sum(dtype=qa.F64))
    return float(np.sqrt(left / max(float((et * He).sum(dtype=qa.F64)), 1e-30)))
