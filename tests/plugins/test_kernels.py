"""Triton kernels vs the torch reference (float32) on the GPU; skipped without CUDA."""
import pytest
import torch

from trtc.plugins import reference as ref
from trtc.plugins.testing import append_matches, make_case, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
kernels = pytest.importorskip("trtc.plugins.kernels", reason="triton not installed") if torch.cuda.is_available() \
    else None

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_step(case, tol, **kw):
    pool_ref = case.kv_pool.clone()
    q_ref = ref.rope_kv_append(*case.append_args[:-1], pool_ref, **case.append_attrs)
    want = ref.paged_attention_f32(*case.attention_args(q_ref)[:1], pool_ref, *case.attention_args(q_ref)[2:],
                                   **case.attrs)
    q_rot = kernels.rope_kv_append(*case.append_args, **case.append_attrs)
    ok, why = append_matches(q_rot, q_ref, case.kv_pool, pool_ref)  # NaN elsewhere stays NaN in both
    assert ok, why
    out = torch.full_like(case.q, float("nan"))  # poisoned: unwritten elements show as NaN
    kernels.paged_attention(*case.attention_args(q_rot), out=out, **case.attrs, **kw)
    err = rel_err(out, want)
    assert err < tol, err


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("ctx,new,hq,hkv,d,bs", [
    ([0, 0, 0], [5, 17, 130], 4, 4, 64, 16),
    ([0, 0], [300, 3], 32, 8, 128, 16),
    ([0, 0], [31, 90], 8, 1, 64, 32),
    ([20, 0, 5], [9, 12, 1], 6, 2, 64, 16),
    ([700, 64, 1, 33], [1, 1, 1, 1], 32, 8, 128, 16),
    ([63, 2000], [1, 1], 8, 1, 128, 64),
    ([100, 1000, 5], [1, 1, 1], 9, 3, 64, 32),
])
def test_kernels_match_reference(ctx, new, hq, hkv, d, bs, dtype, kv):
    case = make_case(ctx, new, hq, hkv, d, bs, dtype=dtype, kv_cache_dtype=kv, device="cuda",
                     seed=sum(ctx) + sum(new) + hq)
    check_step(case, TOL[dtype])


@cuda
@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("block_n", [32, 128])
def test_decode_splits(splits, block_n, kv):
    case = make_case([1000, 17, 260, 0], [1, 1, 1, 1], 16, 4, 128, 16, kv_cache_dtype=kv, device="cuda", seed=splits)
    check_step(case, TOL[torch.float16], decode_cfg=kernels.DecodeConfig(num_splits=splits, block_n=block_n))
