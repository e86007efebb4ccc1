"""Weight quantizers and the calibration-based algorithms behind `--quant`, in torch, so the same
code runs on a GPU when the build machine has one (`device()`); the results are the numpy
versions' (tests/compiler/quant_algos_numpy.py: same grids, rounding and float64 steps).

All weights are in the ONNX MatMul layout [K, N] (K input channels = rows), float32 tensors on one
device. A *grid* is a frozen set of scales (and zero points) that rounds a [k, N] slab of rows; the
algorithms decide the grid and the rounding:
  rtn    round every weight to the nearest grid point.
  gptq   round rows one at a time and spread each row's rounding error over the rows not yet
         rounded, weighted by the inverse Hessian of the layer's calibration inputs
         (Frantar et al., GPTQ, 2022).
  awq    activation-aware per-input-channel scaling before rounding (Lin et al., AWQ, 2023):
         see `awq_scales`; with `clip_search` the group maxima are shrunk where that lowers the
         layer's output error on calibration rows (AWQ's auto-clip).
  low_rank  a rank-r float correction (x @ A) @ B of the rounding error, the best rank-r one for
         the layer's calibration inputs: SVD of the error in the metric of E[x^T x] (EoRA, Liu et
         al. 2024; ZeroQuant-V2's LoRC without the activation weighting).
"""

from __future__ import annotations

import contextlib
import os
import numpy as np
import torch

from .quant_grid import FP8_MAX, INT8_MAX, Grid  # noqa: F401  (re-exported)

F32, F64 = torch.float32, torch.float64


def device() -> torch.device:
    """Where the algorithms run: TRTC_QUANT_DEVICE (e.g. cpu, cuda:1), else the first CUDA GPU if
    torch sees one, else the CPU. The device changes the speed, not the result (up to float
    summation order)."""
    name = os.environ.get("TRTC_QUANT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def cpu_threads():
    """torch's CPU threads for the quantizer: TRTC_QUANT_THREADS, default 1. Measured on the
    project's 2-core machine beside other jobs: 2 OpenMP threads ran GPTQ of a 1536x576 weight in
    7.2 s and its Hessian's eigh in 16.2 s, 1 thread in 1.8 s and 2.5 s (threads spin-wait while
    another process holds a core; bench/RESULTS-quant.md). Restored afterwards: the export uses
    torch too."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TRTC_QUANT_THREADS") or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor(a, dev: torch.device | None = None, dtype: torch.dtype = F32) -> torch.Tensor:
    """A numpy array (or tensor) as a `dtype` tensor on `dev` (default: `device()`)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=dev or device(), dtype=dtype)


def numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _expand(a: torch.Tensor, k: int, group: int) -> torch.Tensor:
    return a if group == 0 else a.repeat_interleave(group, dim=0)[:k]


def grid_params(w: torch.Tensor, grid: Grid, clip: torch.Tensor | float = 1.0):
    """(scale [G, N], lo [G, N] for affine grids else None) of `w` [k, N], float32; `clip` shrinks
    the range (1.0 = the full min/max or absmax). A float64 `clip` computes the range in float64
    before rounding the scales to float32 (as numpy does with a float64 ratio)."""
    k, n = w.shape
    g = grid.group or k
    if isinstance(clip, torch.Tensor) and clip.dtype == F64:
        w = w.to(F64)
    wb = w.reshape(k // g, g, n)
    if grid.affine:
        lo = wb.amin(1) * clip
        hi = wb.amax(1) * clip
        s = (hi - lo).clamp_min(1e-8) / grid.qmax
        return s.to(F32), lo.to(F32)
    amax = (wb.abs().amax(1) * clip).clamp_min(1e-8)
    top = FP8_MAX if grid.kind == "fp8" else grid.qmax
    return (amax / top).to(F32), None


def quantize(w: torch.Tensor, grid: Grid, s: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    """Stored values (a float tensor holding the integers / fp8-rounded values) of `w`."""
    k = w.shape[0]
    se = _expand(s, k, grid.group)
    if grid.kind == "fp8":
        return (w / se).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(F32)
    if lo is not None:
        w = w - _expand(lo, k, grid.group)
    return torch.round(w / se).clamp(grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, grid: Grid, s: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    k = q.shape[0]
    w = q * _expand(s, k, grid.group)
    if lo is not None:
        w = w + _expand(lo, k, grid.group)
    return w.to(F32)


def rtn(w: torch.Tensor, grid: Grid, clip=1.0):
    s, z = grid_params(w, grid, clip)
    return quantize(w, grid, s, z), s, z


def clip_search(w: torch.Tensor, x: torch.Tensor, grid: Grid, ratios=np.linspace(1.0, 0.5, 11)) -> torch.Tensor:
    """Per group and column, the shrink ratio of the group's range that minimises the output
    error of that group's slice: ||x_g w_g - x_g Q(w_g)||^2 over calibration rows x [R, K].
    Returns clip [G, N] float32 (1.0 = no clipping)."""
    k, n = w.shape
    g = grid.group or k
    best = torch.full((k // g, n), float("inf"), dtype=F64, device=w.device)
    clip = torch.ones((k // g, n), dtype=F32, device=w.device)
    for r in ratios:
        q, s, z = rtn(w, grid, torch.tensor(float(r), dtype=F64, device=w.device))
        e = w - dequantize(q, grid, s, z)                       # [K, N]
        err = torch.empty((k // g, n), dtype=F64, device=w.device)
        for j in range(k // g):
            d = x[:, j * g:(j + 1) * g] @ e[j * g:(j + 1) * g]   # [R, N]
            err[j] = (d * d).sum(0)
        better = err < best
        best[better] = err[better]
        clip[better] = float(r)
    return clip


def gptq(w: torch.Tensor, H: torch.Tensor, grid: Grid, clip=None, damp: float = 0.01, block: int = 128,
         act_order: bool = True):
    """GPTQ rounding of w [K, N] with input Hessian H = E[x^T x] [K, K] (float64 inside). Rows are
    rounded in order of decreasing H diagonal (act order: the most active input channels first,
    while the most rows are left to absorb their error). The grid (scales, zero points) is fixed
    up front from w, per column or per group of `grid.group` consecutive rows ("static groups"),
    so it stays the grid a blockwise DequantizeLinear can express. Returns (q, s, z) like `rtn`."""
    w = w.to(F64).clone()
    k, n = w.shape
    H = H.to(F64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    w[dead] = 0.0
    S, Z = grid_params(w.to(F32), grid, 1.0 if clip is None else clip)
    diag = torch.diagonal(H)
    perm = torch.argsort(-diag, stable=True) if act_order else torch.arange(k, device=w.device)
    w = w[perm]
    H = H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diagonal(H)))
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T         # upper Cholesky factor of H^-1
    one = Grid(grid.kind, grid.qmin, grid.qmax, 0)
    gidx = (perm // grid.group if grid.group else torch.zeros(k, dtype=torch.long, device=w.device)).tolist()
    Q = torch.zeros((k, n), dtype=F32, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = w[i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = gidx[i1 + i]
            s_row = S[j:j + 1]
            z_row = None if Z is None else Z[j:j + 1]
            q = quantize(W1[i:i + 1].to(F32), one, s_row, z_row)
            Q[i1 + i] = q[0]
            err = (W1[i] - dequantize(q, one, s_row, z_row)[0]) / U1[i, i]
            W1[i:] -= torch.outer(U1[i, i:], err)
            E1[i] = err
        w[i2:] -= U[i1:i2, i2:].T @ E1
    out = torch.empty_like(Q)
    out[perm] = Q
    return out, S, Z


def awq_scales(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor], qdq,
               alphas=np.linspace(0.0, 1.0, 21)) -> tuple[torch.Tensor, float, float]:
    """Per-input-channel scales s [K] for the MatMuls sharing activation rows x [R, K]; `qdq`
    quantizes and dequantizes a [K, N] weight. s = mean|x|^alpha, alpha searched to minimise
    sum ||x W - (x/s) qdq(diag(s) W)||^2 (float64, as numpy promoted it); alpha = 0 is plain
    rounding, so the search never does worse than it on the calibration rows.
    Returns (s float32, alpha, loss ratio vs alpha = 0)."""
    ref = [x @ w for w in weights]
    best = (None, 0.0, float("inf"))
    base_loss = None
    base = mean_abs.clamp_min(1e-8).to(F64)
    x64 = x.to(F64)
    for alpha in alphas:
        s = base ** float(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        xs = x64 / s
        loss = 0.0
        for w, r in zip(weights, ref):
            loss += float(((xs @ qdq(w.to(F64) * s[:, None]).to(F64) - r) ** 2).sum())
        if alpha == 0.0:
            base_loss = loss
        if loss < best[2]:
            best = (s.to(F32), float(alpha), loss)
    return best[0], best[1], best[2] / max(base_loss, 1e-30)


def hessian_eig(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition (l, V) of H = E[x^T x] (float64) with GPTQ's damping added to the
    eigenvalues (a fraction of their mean), so that directions the calibration never excited stay
    bounded."""
    lam, V = torch.linalg.eigh(H.to(F64))
    return lam.clamp_min(0.0) + damp * max(float(lam.mean()), 1e-30), V


def low_rank(e: torch.Tensor, H: torch.Tensor | tuple, r: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A [K, r], B [r, N] (float32) of the rank-r C minimising E_x ||x (e - C)||^2 =
    tr((e - C)^T H (e - C)) for a weight error e [K, N] and input Hessian H = E[x^T x]: with
    H = V diag(l) V^T, C = H^-1/2 trunc_r(H^1/2 e), H damped as in `hessian_eig`. `H` may be that
    function's result (linears sharing an input share it)."""
    lam, V = H if isinstance(H, tuple) else hessian_eig(H, damp)
    U, S, Vt = torch.linalg.svd((V * torch.sqrt(lam)) @ (V.T @ e.to(F64)), full_matrices=False)
    root = torch.sqrt(S[:r])       # split evenly, so neither factor's values are extreme in fp16
    A = (V / torch.sqrt(lam)) @ (V.T @ (U[:, :r] * root))
    return A.to(F32), (root[:, None] * Vt[:r]).to(F32)
