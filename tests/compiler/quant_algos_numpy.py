"""The numpy quantization algorithms as they were before the torch port (compiler/quant_algos.py),
kept verbatim as the reference the torch versions are compared with (test_quant_algos_torch.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP8_MAX, INT8_MAX = 448.0, 127.0


@dataclass(frozen=True)
class Grid:
    """Quantization grid for rows [k, N]: one scale (and offset) per column over `group`
    consecutive rows (group 0: over all rows).
      kind 'int', qmin < 0: symmetric integers qmin..qmax, w ~ s * q.
      kind 'int', qmin == 0: affine, w ~ s * u + lo with u in 0..qmax; `lo` (the group minimum) is
                             a float, not an integer zero point (TensorRT rejects non-zero zero
                             points), so the graph adds it back as a separate small MatMul.
      kind 'fp8': e4m3 values, w ~ s * e4m3."""
    kind: str
    qmin: int
    qmax: int
    group: int

    @property
    def affine(self) -> bool:
        return self.kind == "int" and self.qmin == 0


def _expand(a: np.ndarray, k: int, group: int) -> np.ndarray:
    return a if group == 0 else np.repeat(a, group, axis=0)[:k]


def grid_params(w: np.ndarray, grid: Grid, clip: np.ndarray | float = 1.0):
    """(scale [G, N], lo [G, N] for affine grids else None) of `w` [k, N]; `clip` shrinks the
    range (1.0 = the full min/max or absmax)."""
    k, n = w.shape
    g = grid.group or k
    wb = w.reshape(k // g, g, n)
    if grid.affine:
        lo = wb.min(1) * clip
        hi = wb.max(1) * clip
        s = np.maximum(hi - lo, 1e-8) / grid.qmax
        return s.astype(np.float32), lo.astype(np.float32)
    amax = np.maximum(np.abs(wb).max(1) * clip, 1e-8)
    top = FP8_MAX if grid.kind == "fp8" else grid.qmax
    return (amax / top).astype(np.float32), None


def quantize(w: np.ndarray, grid: Grid, s: np.ndarray, lo: np.ndarray | None):
    """Stored values (a float array holding the integers / fp8-rounded values) of `w`."""
    k = w.shape[0]
    se = _expand(s, k, grid.group)
    if grid.kind == "fp8":
        import ml_dtypes
        return np.clip(w / se, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if lo is not None:
        w = w - _expand(lo, k, grid.group)
    return np.clip(np.round(w / se), grid.qmin, grid.qmax)


def dequantize(q: np.ndarray, grid: Grid, s: np.ndarray, lo: np.ndarray | None) -> np.ndarray:
    k = q.shape[0]
    w = q * _expand(s, k, grid.group)
    if lo is not None:
        w = w + _expand(lo, k, grid.group)
    return w.astype(np.float32)


def rtn(w: np.ndarray, grid: Grid, clip=1.0):
    s, z = grid_params(w, grid, clip)
    return quantize(w, grid, s, z), s, z


def clip_search(w: np.ndarray, x: np.ndarray, grid: Grid, ratios=np.linspace(1.0, 0.5, 11)) -> np.ndarray:
    """Per group and column, the shrink ratio of the group's range that minimises the output
    error of that group's slice: ||x_g w_g - x_g Q(w_g)||^2 over calibration rows x [R, K].
    Returns clip [G, N] (1.0 = no clipping)."""
    k, n = w.shape
    g = grid.group or k
    best = np.full((k // g, n), np.inf)
    clip = np.ones((k // g, n), dtype=np.float32)
    for r in ratios:
        q, s, z = rtn(w, grid, r)
        e = w - dequantize(q, grid, s, z)                       # [K, N]
        err = np.empty((k // g, n))
        for j in range(k // g):
            d = x[:, j * g:(j + 1) * g] @ e[j * g:(j + 1) * g]   # [R, N]
            err[j] = (d * d).sum(0)
        better = err < best
        best[better] = err[better]
        clip[better] = r
    return clip


def gptq(w: np.ndarray, H: np.ndarray, grid: Grid, clip=None, damp: float = 0.01, block: int = 128,
         act_order: bool = True):
    """GPTQ rounding of w [K, N] with input Hessian H = E[x^T x] [K, K]. Rows are rounded in order
    of decreasing H diagonal (act order: the most active input channels first, while the most
    rows are left to absorb their error). The grid (scales, zero points) is fixed up front from
    w, per column or per group of `grid.group` consecutive rows ("static groups"), so it stays the
    grid a blockwise DequantizeLinear can express. Returns (q, s, z) like `rtn`."""
    w = w.astype(np.float64).copy()
    k, n = w.shape
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    w[dead] = 0.0
    S, Z = grid_params(w.astype(np.float32), grid, 1.0 if clip is None else clip)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    w = w[perm]
    H = H[perm][:, perm]
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T         # upper Cholesky factor of H^-1
    one = Grid(grid.kind, grid.qmin, grid.qmax, 0)
    gidx = (perm // grid.group) if grid.group else np.zeros(k, dtype=np.int64)
    Q = np.zeros((k, n), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = w[i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = gidx[i1 + i]
            s_row = S[j:j + 1]
            z_row = None if Z is None else Z[j:j + 1]
            q = quantize(W1[i:i + 1].astype(np.float32), one, s_row, z_row)
            Q[i1 + i] = q[0]
            err = (W1[i] - dequantize(q, one, s_row, z_row)[0]) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            E1[i] = err
        w[i2:] -= U[i1:i2, i2:].T @ E1
    out = np.empty_like(Q)
    out[perm] = Q
    return out, S, Z


def awq_scales(x: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray], qdq,
               alphas=np.linspace(0.0, 1.0, 21)) -> tuple[np.ndarray, float, float]:
    """Per-input-channel scales s [K] for the MatMuls sharing activation rows x [R, K]; `qdq`
    quantizes and dequantizes a [K, N] weight. s = mean|x|^alpha, alpha searched to minimise
    sum ||x W - (x/s) qdq(diag(s) W)||^2; alpha = 0 is plain rounding, so the search never does
    worse than it on the calibration rows. Returns (s, alpha, loss ratio vs alpha = 0)."""
    ref = [x @ w for w in weights]
    best = (None, 0.0, np.inf)
    base_loss = None
    base = np.maximum(mean_abs, 1e-8)
    for alpha in alphas:
        s = base ** alpha
        s = s / np.sqrt(s.max() * s.min())
        xs = x / s
        loss = 0.0
        for w, r in zip(weights, ref):
            loss += float(((xs @ qdq(w * s[:, None]) - r) ** 2).sum())
        if alpha == 0.0:
            base_loss = loss
        if loss < best[2]:
            best = (s.astype(np.float32), float(alpha), loss)
    return best[0], best[1], best[2] / max(base_loss, 1e-30)


def hessian_eig(H: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition (l, V) of H = E[x^T x] with GPTQ's damping added to the eigenvalues (a
    fraction of their mean), so that directions the calibration never excited stay bounded."""
    lam, V = np.linalg.eigh(H.astype(np.float64))
    return np.maximum(lam, 0.0) + damp * max(float(np.mean(lam)), 1e-30), V


def low_rank(e: np.ndarray, H: np.ndarray | tuple, r: int, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Factors A [K, r], B [r, N] of the rank-r C minimising E_x ||x (e - C)||^2 = tr((e - C)^T H
    (e - C)) for a weight error e [K, N] and input Hessian H = E[x^T x]: with H = V diag(l) V^T,
    C = H^-1/2 trunc_r(H^1/2 e), H damped as in `hessian_eig`. `H` may be that function's result
    (linears sharing an input share it)."""
    lam, V = H if isinstance(H, tuple) else hessian_eig(H, damp)
    U, S, Vt = np.linalg.svd((V * np.sqrt(lam)) @ (V.T @ e.astype(np.float64)), full_matrices=False)
    root = np.sqrt(S[:r])          # split evenly, so neither factor's values are extreme in fp16
    A = (V / np.sqrt(lam)) @ (V.T @ (U[:, :r] * root))
    return A.astype(np.float32), (root[:, None] * Vt[:r]).astype(np.float32)
