"""The torch quantization algorithms (compiler/quant_algos.py) give the numpy versions' results
(quant_algos_numpy.py, the code before the port) on random matrices: the same grids, the same
rounded values, the same searched ratios and alphas; float64 steps agree to float64 precision."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trtc.compiler import quant_algos as qa
from trtc.compiler.quant_recipes import grid_of

_spec = importlib.util.spec_from_file_location("quant_algos_numpy", Path(__file__).with_name("quant_algos_numpy.py"))
ref = importlib.util.module_from_spec(_spec)
sys.modules["quant_algos_numpy"] = ref            # dataclasses look their module up there
_spec.loader.exec_module(ref)

CPU = torch.device("cpu")
GRIDS = {"int8": grid_of("int8_wo", 0), "int4": grid_of("int4_awq", 32), "fp8": grid_of("fp8", 0)}


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(CPU)


def _ref_grid(g: qa.Grid):
    return ref.Grid(g.kind, g.qmin, g.qmax, g.group)


def _data(seed: int, k: int = 128, n: int = 48, rows: int = 512):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 8)) @ rng.standard_normal((8, k)) + 0.1 * rng.standard_normal((rows, k)))
    x[:, :4] *= 20.0                              # salient channels, as in real LLMs
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[3, 5] = 9.0                                 # an outlier weight: clipping has work to do
    return x.astype(np.float32), w


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_rtn_and_clip_search_equal_numpy(kind, seed):
    x, w = _data(seed)
    g = GRIDS[kind]
    q, s, lo = qa.rtn(_t(w), g)
    rq, rs, rlo = ref.rtn(w, _ref_grid(g))
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy(), rs)
    np.testing.assert_array_equal(qa.dequantize(q, g, s, lo).numpy(), ref.dequantize(rq, _ref_grid(g), rs, rlo))
    if g.group:
        clip = qa.clip_search(_t(w), _t(x), g)
        rclip = ref.clip_search(w, x, _ref_grid(g))
        np.testing.assert_array_equal(clip.numpy(), rclip)
        assert (clip < 1).any()                  # the comparison covers real clipping
        np.testing.assert_array_equal(qa.rtn(_t(w), g, clip)[0].numpy(), ref.rtn(w, _ref_grid(g), rclip)[0])


@pytest.mark.parametrize("kind", GRIDS)
def test_gptq_equals_numpy(kind):
    """Same rounded values up to float64 ties: at most 0.2% of the entries differ, by one step."""
    x, w = _data(2)
    H = x.T @ x / len(x)
    g = GRIDS[kind]
    q, s, lo = qa.gptq(_t(w), _t(H), g)
    rq, rs, rlo = ref.gptq(w, H, _ref_grid(g))
    np.testing.assert_array_equal(s.numpy(), rs)
    diff = q.numpy() != rq
    assert diff.mean() <= 0.002, diff.mean()
    wq, rwq = qa.dequantize(q, g, s, lo).numpy(), ref.dequantize(rq, _ref_grid(g), rs, rlo)
    assert np.linalg.norm(x @ (wq - rwq)) <= 0.01 * np.linalg.norm(x @ (rwq - w))


def test_awq_scales_equal_numpy():
    x, w = _data(3)
    ws = [w, np.roll(w, 1, axis=1)]
    g = GRIDS["int4"]

    def qdq(t):
        q, s, lo = qa.rtn(t, g)
        return qa.dequantize(q, g, s, lo)

    def rqdq(a):
        q, s, lo = ref.rtn(a, _ref_grid(g))
        return ref.dequantize(q, _ref_grid(g), s, lo)

    mean_abs = np.abs(x).mean(0)
    s, alpha, ratio = qa.awq_scales(_t(x), _t(mean_abs), [_t(a) for a in ws], qdq)
    rs, ralpha, rratio = ref.awq_scales(x, mean_abs, ws, rqdq)
    assert alpha == ralpha and alpha > 0
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-6)
    assert abs(ratio - rratio) <= 1e-6 * rratio


def test_low_rank_equals_numpy():
    """The factors may differ in sign (eigen/singular vectors); their product may not."""
    x, w = _data(4)
    H = x.T @ x / len(x)
    q, s, lo = ref.gptq(w, H, _ref_grid(GRIDS["int4"]))
    e = w - ref.dequantize(q, _ref_grid(GRIDS["int4"]), s, lo)
    a, b = qa.low_rank(_t(e), _t(H), 16)
    ra, rb = ref.low_rank(e, H, 16)
    np.testing.assert_allclose((a @ b).numpy(), ra @ rb, atol=1e-5 * np.abs(ra @ rb).max())


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_top_svd_equals_full_svd(shape):
    """The Gram-matrix route gives the full SVD's leading triplets; a rank-deficient M gives zero
    triplets past its rank (not noise) and its product is M itself."""
    rng = np.random.default_rng(6)
    m = torch.from_numpy(rng.standard_normal(shape))
    u, s, vt = qa.top_svd(m, 8)
    ru, rs, rvt = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s, rs[:8], rtol=1e-10, atol=0)
    torch.testing.assert_close(u * s @ vt, ru[:, :8] * rs[:8] @ rvt[:8], rtol=0, atol=1e-10)
    low = torch.from_numpy(rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1])))
    u, s, vt = qa.top_svd(low, 8)
    assert (s[3:] == 0).all() and s[2] > 0
    torch.testing.assert_close(u * s @ vt, low, rtol=0, atol=1e-10)


def test_shared_factors_give_the_same_results():
    """A GptqFactor / HessianRoot made once per activation gives what each linear's own did."""
    x, w = _data(7)
    H = _t(x.T @ x / len(x)).double()
    g = GRIDS["int4"]
    f = qa.GptqFactor(H)
    for a, b in zip(qa.gptq(_t(w), H, g), qa.gptq(_t(w), f, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    root = qa.HessianRoot(H)
    for a, b in zip(qa.low_rank(_t(w), H, 8), qa.low_rank(_t(w), root, 8)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("latent,noise", [(8, 0.3), (64, 1.0), (16, 0.3)])
def test_randomized_svd_leaves_the_exact_residual(latent, noise):
    """The implicit randomized route of `low_rank` (large linears) leaves the exact truncation's
    residual within 0.5% (measured 0.02-0.2% on these spectra); and
    low_rank takes it only above LOW_RANK_EXACT_MAX rows and columns."""
    rng = np.random.default_rng(11)
    k, n = 640, 900
    x = rng.standard_normal((2048, latent)) @ rng.standard_normal((latent, k)) + noise * rng.standard_normal((2048, k))
    x[:, :8] *= 20.0
    H = _t(x.T @ x / len(x))
    g = GRIDS["int4"]
    w = _t((rng.standard_normal((k, n)) * 0.05).astype(np.float32))
    q, s, lo = qa.rtn(w, g)
    e = (w - qa.dequantize(q, g, s, lo)).double()
    root = qa.HessianRoot(H)
    m = root.rt(e)
    full = float((m * m).sum())
    _, se, _ = qa.top_svd(m, 32)
    exact = full - float((se ** 2).sum())
    u, sr, vt = qa.randomized_svd(lambda y: root.rt(e @ y), lambda z: e.T @ root.r(z), e.shape, 32, e.device)
    got = float(((m - (u * sr) @ vt) ** 2).sum())
    tol = 5e-3
    assert exact * (1 - 1e-9) <= got <= exact * (1 + tol)
    torch.testing.assert_close(u.T @ u, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-10)
    a1, b1 = qa.low_rank(e, root, 32)
    saved = qa.LOW_RANK_EXACT_MAX
    try:
        qa.LOW_RANK_EXACT_MAX = 500                   # force the randomized route on this 640 x 900
        a2, b2 = qa.low_rank(e, root, 32)
    finally:
        qa.LOW_RANK_EXACT_MAX = saved
    left = [float(((root.rt(e - (a @ b).double())) ** 2).sum()) for a, b in ((a1, b1), (a2, b2))]
    assert left[1] <= left[0] * (1 + tol) + 1e-12


def test_gptq_factor_is_the_cholesky_of_the_inverse():
    """GptqFactor's U (reversed Cholesky + blockwise triangular inverse) is chol(P^-1)^T of the
    damped, act-ordered P, with dead channels, for any block size."""
    x, _ = _data(3, k=200)
    x[:, 7] = 0.0
    H = _t(x.T @ x / len(x)).double()
    for block in (1024, 64, 7):
        f = qa.GptqFactor(H, block=block)
        P = H.index_select(0, f.perm).index_select(1, f.perm)
        P.diagonal()[f.dead[f.perm]] = 1.0
        P.diagonal().add_(0.01 * torch.mean(torch.diagonal(P)))
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(P)), upper=True)
        torch.testing.assert_close(f.U, U, rtol=0, atol=1e-12 * float(U.abs().max()))
        assert torch.equal(f.U, f.U.triu()) and bool(f.dead[7])
