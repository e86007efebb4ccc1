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


def threads() -> int:
    """CPU threads for the quantizer (torch) and its calibration (ONNX Runtime):
    TRTC_QUANT_THREADS, default 1, for reproducible bytes: the low-rank factors' last bits depend on
    the thread count (the int4 values and AWQ scales do not), so more threads by default would make
    the engine depend on the runner's cores. bench/RESULTS-quant.md: 2 threads 1.5-1.6x faster on an
    idle machine; OpenMP threads that spin-wait lose when other jobs hold a core
    (OMP_WAIT_POLICY=PASSIVE)."""
    return max(1, int(os.environ.get("TRTC_QUANT_THREADS") or 1))


@contextlib.contextmanager
def cpu_threads():
    """torch's CPU threads set to `threads()` for the quantizer, restored afterwards (the export
    uses torch too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads())
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


def _grouped(w: torch.Tensor, group: int):
    """w [K, N] as [G, group, N] (a view) when groups split it evenly, else None: per-group
    scales then broadcast over each group's rows instead of being repeated to [K, N] (the same
    elementwise arithmetic, without the copies)."""
    k = w.shape[0]
    return w.reshape(k // group, group, w.shape[1]) if group and k % group == 0 else None


def quantize(w: torch.Tensor, grid: Grid, s: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    """Stored values (a float tensor holding the integers / fp8-rounded values) of `w`."""
    k = w.shape[0]
    wg = _grouped(w, grid.group)
    if wg is not None and grid.kind != "fp8":
        if lo is not None:
            wg = wg - lo[:, None]
        return torch.round(wg / s[:, None]).clamp_(grid.qmin, grid.qmax).reshape(w.shape)
    se = _expand(s, k, grid.group)
    if grid.kind == "fp8":
        return (w / se).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(F32)
    if lo is not None:
        w = w - _expand(lo, k, grid.group)
    return torch.round(w / se).clamp(grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, grid: Grid, s: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    k = q.shape[0]
    qg = _grouped(q, grid.group)
    if qg is not None:
        w = qg * s[:, None]
        if lo is not None:
            w = w + lo[:, None]
        return w.reshape(q.shape).to(F32)
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
    Returns clip [G, N] float32 (1.0 = no clipping).
    The error is computed as sum(e_g * (x_g^T x_g) e_g) with each group's [g, g] Gram matrix
    (float64): g/R of the work of x_g @ e_g (1/8 for SmolLM2's 64 of 512 rows)."""
    k, n = w.shape
    g = grid.group or k
    ng = k // g
    xg = x.to(F64).reshape(x.shape[0], ng, g).transpose(0, 1)      # [G, R, g]
    gram = xg.transpose(1, 2) @ xg                                  # [G, g, g]
    best = torch.full((ng, n), float("inf"), dtype=F64, device=w.device)
    clip = torch.ones((ng, n), dtype=F32, device=w.device)
    for r in ratios:
        q, s, z = rtn(w, grid, torch.tensor(float(r), dtype=F64, device=w.device))
        e = (w - dequantize(q, grid, s, z)).to(F64).reshape(ng, g, n)   # [G, g, N]
        err = (e * (gram @ e)).sum(1)                               # [G, N]
        better = err < best
        best[better] = err[better]
        clip[better] = float(r)
    return clip


class GptqFactor:
    """What GPTQ needs from a Hessian H [K, K], shared by the linears reading one activation:
    the act-order permutation, the upper Cholesky factor U of the damped, permuted H^-1, and the
    input channels the calibration never excited (`dead`, zero diagonal)."""

    def __init__(self, H: torch.Tensor, damp: float = 0.01, act_order: bool = True, block: int = 1024) -> None:
        # H is not modified. At most two [K, K] float64 matrices besides it are alive at a time
        # (K = 14336: 1.6 GB each), each dropped as soon as the next step has what it needs.
        H = H.to(F64)
        k = H.shape[0]
        self.dead = torch.diagonal(H) == 0
        diag = torch.where(self.dead, 1.0, torch.diagonal(H))     # dead channels count as 1
        self.perm = torch.argsort(-diag, stable=True) if act_order else torch.arange(k, device=H.device)
        # U without inverting P = H[perm][:, perm] whole: with J the order reversal and
        # J P J = L L^T (Cholesky of P in reversed order), P^-1 = (J L^-1 J)^T (J L^-1 J) and
        # J L^-1 J is upper triangular, so it is U. One Cholesky and one triangular inverse:
        # half the work of Cholesky + cholesky_inverse + Cholesky (the same U to ~1e-12).
        rev = self.perm.flip(0)
        L = H.index_select(0, rev).index_select(1, rev)
        L.diagonal()[self.dead[rev]] = 1.0
        L.diagonal().add_(damp * torch.mean(torch.diagonal(L)))
        L = torch.linalg.cholesky(L)
        self.U = _flipped_tril_inverse(L, block)


def _flipped_tril_inverse(L: torch.Tensor, block: int) -> torch.Tensor:
    """J L^-1 J for a lower triangular L [K, K] (J: reversal), one block of L^-1's columns at a
    time by blocked forward substitution: column block c is zero above its diagonal block, and its
    row block b below is -D_b^-1 (L[b, c:b] @ X[c:b]) with D_b^-1 the inverse of L's diagonal block.
    The products read L through views (a triangular solve on a trailing sub-matrix would copy it:
    1.6 GB at K = 14336), so it holds L, the result and one [K, block] panel."""
    k = L.shape[0]
    U = torch.zeros((k, k), dtype=L.dtype, device=L.device)    # row-major (GPTQ reads its rows): ~6% faster
    starts = list(range(0, k, block))
    dinv = []
    for b0 in starts:
        b1 = min(b0 + block, k)
        eye = torch.eye(b1 - b0, dtype=L.dtype, device=L.device)
        dinv.append(torch.linalg.solve_triangular(L[b0:b1, b0:b1].contiguous(), eye, upper=False))
    for ci, j0 in enumerate(starts):
        j1 = min(j0 + block, k)
        X = torch.empty((k - j0, j1 - j0), dtype=L.dtype, device=L.device)      # (L^-1)[j0:, j0:j1]
        X[: j1 - j0] = dinv[ci]
        for bi in range(ci + 1, len(starts)):
            b0, b1 = starts[bi], min(starts[bi] + block, k)
            X[b0 - j0: b1 - j0] = -(dinv[bi] @ (L[b0:b1, j0:b0] @ X[: b0 - j0]))
        U[: k - j0, k - j1: k - j0] = X.flip((0, 1))
    return U


def _round_rows(w: torch.Tensor, grid: Grid, s: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    """`quantize` of rows w [.., N] (float32) with their own scales s [.., N] (no groups)."""
    if grid.kind == "fp8":
        return (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(F32)
    if lo is not None:
        w = w - lo
    return torch.round(w / s).clamp(grid.qmin, grid.qmax)


def gptq(w: torch.Tensor, H: torch.Tensor | GptqFactor, grid: Grid, clip=None, damp: float = 0.01,
         block: int = 128, act_order: bool = True):
    """GPTQ rounding of w [K, N] with input Hessian H = E[x^T x] [K, K] (float64 inside; or its
    `GptqFactor`, made once for the linears sharing an input). Rows are rounded in order of
    decreasing H diagonal (act order: the most active input channels first, while the most rows
    are left to absorb their error). The grid (scales, zero points) is fixed up front from w, per
    column or per group of `grid.group` consecutive rows ("static groups"), so it stays the grid a
    blockwise DequantizeLinear can express. Returns (q, s, z) like `rtn`."""
    f = H if isinstance(H, GptqFactor) else GptqFactor(H, damp, act_order)
    w = w.to(F64).clone()
    k, n = w.shape
    w[f.dead] = 0.0
    S, Z = grid_params(w.to(F32), grid, 1.0 if clip is None else clip)
    perm, U = f.perm, f.U
    w = w[perm]
    # each row's scale (and offset) in rounding order [K, N]: the loop below is per-row op overhead
    gidx = perm // grid.group if grid.group else torch.zeros(k, dtype=torch.long, device=w.device)
    S_rows = S[gidx]
    Z_rows = None if Z is None else Z[gidx]
    Q = torch.zeros((k, n), dtype=F32, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = w[i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s_row = S_rows[i1 + i]
            z_row = None if Z_rows is None else Z_rows[i1 + i]
            q = _round_rows(W1[i].to(F32), grid, s_row, z_row)
            Q[i1 + i] = q
            deq = q * s_row if z_row is None else q * s_row + z_row
            err = (W1[i] - deq) / U1[i, i]
            W1[i + 1:].sub_(torch.outer(U1[i, i + 1:], err))
            E1[i] = err
        w[i2:] -= U[i1:i2, i2:].T @ E1
    out = torch.empty_like(Q)
    out[perm] = Q
    return out, S, Z


def awq_scales(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor], qdq,
               alphas=np.linspace(0.0, 1.0, 21)) -> tuple[torch.Tensor, float, float]:
    """Per-input-channel scales s [K] for the MatMuls sharing activation rows x [R, K]; `qdq`
    quantizes and dequantizes a [K, N] weight. s = mean|x|^alpha, alpha searched to minimise
    sum ||x W - (x/s) qdq(diag(s) W)||^2; alpha = 0 is plain rounding, so the search never does
    worse than it on the calibration rows. The scales are float64 (as numpy promoted them); the
    scaled weight is rounded in float32, as the graph's weight (`w * s` in float32) will be, and the
    [R, K] x [K, N] products are float32 like the reference x W (half the time of float64; the
    losses move by ~1e-6 relative, far below the steps between alphas).
    Returns (s float32, alpha, loss ratio vs alpha = 0)."""
    ref = [x @ w for w in weights]
    best = (None, 0.0, float("inf"))
    base_loss = None
    base = mean_abs.clamp_min(1e-8).to(F64)
    x64 = x.to(F64)
    for alpha in alphas:
        s = base ** float(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        xs = (x64 / s).to(F32)
        s32 = s.to(F32)[:, None]
        loss = 0.0
        for w, r in zip(weights, ref):
            d = (xs @ qdq(w * s32) - r).to(F64)
            loss += float((d * d).sum())
        if alpha == 0.0:
            base_loss = loss
        if loss < best[2]:
            best = (s.to(F32), float(alpha), loss)
    return best[0], best[1], best[2] / max(base_loss, 1e-30)


class HessianRoot:
    """A square root R of the damped input Hessian, H + d I = R R^T (d: GPTQ's damping, a fraction
    of the mean eigenvalue = the mean diagonal), so that directions the calibration never excited
    stay bounded. R is H's Cholesky factor (a tenth of the time of the eigen-decomposition the
    correction used before, and the same correction: any root gives the same best rank-r fix);
    the eigen-decomposition R = V diag(sqrt(l)) is the fallback where Cholesky fails (damp 0 on a
    singular H). Linears sharing an input share it."""

    def __init__(self, H: torch.Tensor, damp: float = 0.01) -> None:
        H = H.to(F64)
        d = damp * max(float(torch.diagonal(H).mean()), 1e-30)
        Hd = H.clone()              # H + d I, without a [K, K] identity and a second sum
        Hd.diagonal().add_(d)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        self.L, self.eig = (L, None) if int(info) == 0 else (None, _damped_eig(H, d))
        self.device = H.device

    def rt(self, e: torch.Tensor) -> torch.Tensor:
        """R^T e."""
        if self.L is not None:
            return self.L.T @ e
        lam, V = self.eig
        return torch.sqrt(lam)[:, None] * (V.T @ e)

    def r(self, z: torch.Tensor) -> torch.Tensor:
        """R z for a narrow z [K, l] (the randomized route). Written (z^T L^T)^T: for a
        Cholesky factor (column-major) times QR's column-major Q that is 8x faster on one CPU
        thread than L @ z (K = 8192, l = 80: 0.30 s vs 2.42 s)."""
        if self.L is not None:
            return (z.T @ self.L.T).T
        lam, V = self.eig
        return V @ (torch.sqrt(lam)[:, None] * z)

    def rt_narrow(self, z: torch.Tensor) -> torch.Tensor:
        """R^T z for a narrow z, as (z^T L)^T (2x faster than L^T z there; `rt` keeps the
        product it has for the exact route's wide e)."""
        if self.L is not None:
            return (z.T @ self.L).T
        return self.rt(z)

    def rt_solve(self, u: torch.Tensor) -> torch.Tensor:
        """R^-T u."""
        if self.L is not None:
            return torch.linalg.solve_triangular(self.L.T, u, upper=True)
        lam, V = self.eig
        return V @ (u / torch.sqrt(lam)[:, None])


def _damped_eig(H: torch.Tensor, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    lam, V = torch.linalg.eigh(H)
    return lam.clamp_min(0.0) + d, V


# Above this many rows and columns (both), `low_rank` takes the top singular triplets by randomized
# subspace iteration without ever forming R^T e (Halko, Martinsson, Tropp 2011, alg. 4.4): for an
# 8B down_proj (K = 14336, N = 4096) R^T e alone is a 0.8 TFLOP float64 product, then a [4096, 4096]
# Gram matrix and its eigh; the iteration needs [K, r + 16]-wide products only. At or below it
# (SmolLM2's 576 / 1536) the exact route stays: the same factors as before, bit for bit.
LOW_RANK_EXACT_MAX = 1024
LOW_RANK_OVERSAMPLE, LOW_RANK_POWER_ITERS = 16, 6


def low_rank(e: torch.Tensor, H: torch.Tensor | HessianRoot, r: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A [K, r], B [r, N] (float32) of the rank-r C minimising E_x ||x (e - C)||^2 =
    tr((e - C)^T H (e - C)) = ||R^T (e - C)||^2 for a weight error e [K, N] and input Hessian
    H = E[x^T x] = R R^T (damped, `HessianRoot`): C = R^-T trunc_r(R^T e). `H` may be a
    HessianRoot (linears sharing an input share it)."""
    root_h = H if isinstance(H, HessianRoot) else HessianRoot(H, damp)
    e = e.to(F64)
    if min(e.shape) > LOW_RANK_EXACT_MAX:
        U, S, Vt = randomized_svd(lambda y: root_h.rt_narrow((y.T @ e.T).T), lambda z: (root_h.r(z).T @ e).T,
                                   e.shape, r, e.device)        # narrow^T @ wide: 2-7x faster on CPU
    else:
        U, S, Vt = top_svd(root_h.rt(e), r)
    root = torch.sqrt(S)           # split evenly, so neither factor's values are extreme in fp16
    A = root_h.rt_solve(U * root)
    return A.to(F32), (root[:, None] * Vt).to(F32)


def randomized_svd(matmul, rmatmul, shape: tuple[int, int], r: int, dev: torch.device, oversample: int = LOW_RANK_OVERSAMPLE,
                   iters: int = LOW_RANK_POWER_ITERS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r leading singular triplets (U [K, r], S [r], Vt [r, N]) of an M [K, N] known only
    through `matmul(Y) = M @ Y` and `rmatmul(Z) = M^T @ Z` (float64): randomized subspace
    iteration with `iters` power steps, re-orthonormalised at each step. The test matrix comes
    from a fixed seed, so a build is reproducible. On int4 rounding errors in a Hessian's metric the
    squared residual ||M - U S Vt||^2 is within 0.02-0.2% of the exact truncation's
    (tests/compiler/test_quant_algos_torch.py), and equal to 1e-9 where the spectrum decays fast."""
    k, n = shape
    r = min(r, k, n)
    width = min(r + oversample, k, n)
    gen = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn((n, width), generator=gen, dtype=F64)
    Q = torch.linalg.qr(matmul(omega.to(dev))).Q
    for _ in range(iters):
        Z = torch.linalg.qr(rmatmul(Q)).Q
        Q = torch.linalg.qr(matmul(Z)).Q
    B = rmatmul(Q).T                                            # Q^T M [width, N]
    Ub, S, Vt = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub[:, :r], S[:r], Vt[:r]


def top_svd(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets (U [K, r], S [r], Vt [r, N]) of M [K, N] (float64), from
    the eigen-decomposition of the smaller Gram matrix (M M^T or M^T M): a third of the time of a
    full SVD for TinyLlama's 2048 x 5632 and the same triplets to ~1e-10 while sigma_1 / sigma_r
    stays under ~1e3 (the Gram matrix squares it). Singular values below that resolution (M of
    rank < r) give zero triplets, not noise."""
    k, n = M.shape
    r = min(r, k, n)
    wide = k <= n
    lam, W = torch.linalg.eigh(M @ M.T if wide else M.T @ M)        # ascending
    lam, W = lam.flip(0)[:r].clamp_min(0.0), W.flip(1)[:, :r]
    S = torch.sqrt(lam)
    live = S > S[0] * 1e-6 if r else S > 0
    inv = torch.where(live, 1.0 / torch.where(live, S, 1.0), 0.0)
    if wide:
        return W, S * live, (W.T @ M) * inv[:, None]
    return (M @ W) * inv, S * live, W.T
