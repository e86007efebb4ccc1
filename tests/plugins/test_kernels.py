"""Triton kernels vs the torch reference (float32) on the GPU; skipped without CUDA."""
import pytest
import torch

from trtc.plugins import reference as ref
from trtc.plugins.testing import TOLERANCE as TOL, append_matches, make_case, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (the Triton kernels "
                                                                "need one; plugins.reference is checked on the CPU)")
kernels = pytest.importorskip("trtc.plugins.kernels", reason="triton not installed") if torch.cuda.is_available() \
    else None


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


@cuda
def test_seed_44629_mixed_fp8_case():
    """`bench_paged_attention.py --cases 12 --seed 44629`, case 30 (mixed prefill + decode, B 33, max_len 934,
    8/8 heads, head 64, block 32, fp16, FP8 KV): Triton's approximate fp32 division in RopeKvAppend
    stored 982 of its 733184 V values one e4m3 step off (V scale 0.02525...), error 2.03e-3 (other
    fp16 cases 2.3-2.8e-4). The shape and seed are exactly the sweep's."""
    ctx = [379, 577, 22, 600, 637, 155, 230, 671, 546, 554, 464, 578, 647, 464, 345, 893, 235, 701, 309, 771, 25, 50,
           357, 9, 258, 114, 141, 720, 122, 478, 524, 876, 374]
    new = [1, 95, 1, 1, 1, 77, 1, 50, 101, 1, 56, 119, 1, 16, 1, 39, 126, 1, 112, 1, 147, 133, 1, 28, 45, 1, 70, 23, 1,
           1, 1, 58, 122]
    case = make_case(ctx, new, 8, 8, 64, 32, dtype=torch.float16, kv_cache_dtype="fp8_e4m3", device="cuda",
                     seed=44629030, keep_context=False)
    assert abs(case.kv_scales[1].item() - 0.02525111474096775) < 1e-9  # the same draw as the sweep's
    check_step(case, TOL[torch.float16])


@cuda
@pytest.mark.parametrize("v_scale", [0.02525111474096775, 0.029034804552793503])
def test_fp8_append_is_correctly_rounded(v_scale):
    """Stored V = e4m3(v / scale) rounded once, for a scale where an approximate division (x * 1/s)
    rounds ~0.13% of fp16 inputs the other way (0.02525...) and one where it does not."""
    case = make_case([0], [4096], 8, 8, 64, 16, kv_cache_dtype="fp8_e4m3", device="cuda", seed=1)
    case.kv_scales[1] = v_scale
    pool_ref = case.kv_pool.clone()
    ref.rope_kv_append(*case.append_args[:-1], pool_ref, **case.append_attrs)
    kernels.rope_kv_append(*case.append_args, **case.append_attrs)
    v, v_ref = case.kv_pool[:, 1].float(), pool_ref[:, 1].float()
    written = ~v_ref.isnan()
    assert int(written.sum()) == 4096 * 8 * 64
    assert int((v[written] != v_ref[written]).sum()) == 0
