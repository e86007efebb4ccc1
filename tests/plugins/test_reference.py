"""CPU checks of the torch reference against a float64 attention over a contiguous KV."""
import pytest
import torch

from trtc.plugins import reference as ref
from trtc.plugins.schema import PAGED_ATTENTION, ROPE_KV_APPEND, SchemaError, check_call
from trtc.plugins.testing import make_case, naive_attention_f64, rel_err


def run_step(case):
    q_rot = ref.rope_kv_append(*case.append_args, **case.append_attrs)
    return ref.paged_attention_f32(*case.attention_args(q_rot), **case.attrs)


# (ctx_lens, new_lens, Hq, Hkv, D, block_size): prefill varlen, decode, chunked/mixed step
CASES = [
    ([0, 0, 0], [5, 17, 33], 4, 4, 64, 16),  # prefill, MHA, lengths not multiples of the block
    ([0, 0], [40, 3], 8, 2, 128, 16),  # prefill, GQA 4
    ([0, 0], [31, 9], 8, 1, 64, 32),  # prefill, MQA
    ([7, 16, 45, 1], [1, 1, 1, 1], 8, 2, 64, 16),  # decode, GQA 4
    ([63, 64], [1, 1], 4, 1, 128, 64),  # decode, MQA, block 64 boundary
    ([20, 0, 5], [9, 12, 1], 6, 2, 64, 16),  # mixed: chunked prefill + prefill + decode, GQA 3
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ctx,new,hq,hkv,d,bs", CASES)
def test_reference_matches_contiguous_f64(ctx, new, hq, hkv, d, bs, dtype):
    case = make_case(ctx, new, hq, hkv, d, bs, dtype=dtype, seed=len(ctx) * 100 + hq + d)
    err = rel_err(run_step(case), naive_attention_f64(case))
    # inputs are the same rounded values; the remaining error is q/k rounding after rotation
    assert err < (3e-3 if dtype == torch.float16 else 2e-2), err


@pytest.mark.parametrize("ctx,new,hq,hkv,d,bs", [CASES[1], CASES[3], CASES[5]])
def test_reference_fp8_kv(ctx, new, hq, hkv, d, bs):
    case = make_case(ctx, new, hq, hkv, d, bs, kv_cache_dtype="fp8_e4m3", seed=7)
    err = rel_err(run_step(case), naive_attention_f64(case))
    assert err < 6e-2, err  # e4m3 keeps 3 mantissa bits: ~2-3% per element for the new tokens


def test_prefill_then_decode_steps():
    """Two decode steps after a varlen prefill, the pool carried along, each vs float64."""
    case = make_case([0, 0], [13, 20], 4, 2, 64, 16, seed=3)
    pool, bt = case.kv_pool, case.block_tables
    run_step(case)
    ctx_k = [None, None]
    for b, (lo, hi) in enumerate([(0, 13), (13, 33)]):
        k, v = ref.gather_kv(pool, bt, b, hi - lo, case.kv_scales)
        ctx_k[b] = (k, v)
    for step in range(2):
        lens = [13 + step, 20 + step]
        d = make_case(lens, [1, 1], 4, 2, 64, 16, seed=10 + step)
        d.kv_pool, d.block_tables = pool, bt  # same pool and tables (tables have a spare block)
        d.ctx_k, d.ctx_v = [c[0] for c in ctx_k], [c[1] for c in ctx_k]
        err = rel_err(run_step(d), naive_attention_f64(d))
        assert err < 3e-3, (step, err)
        ctx_k = [ref.gather_kv(pool, bt, b, lens[b] + 1, d.kv_scales) for b in range(2)]


def test_fp8_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3
    scale = torch.tensor(0.02)
    y = ref.quantize_fp8(x, scale).float() * scale
    # normal e4m3: half an ulp = 2^-4 relative; subnormals: half of 2^-9 absolute (times scale)
    bound = x.abs() * 2.0 ** -4 + scale * 2.0 ** -10
    inside = x.abs() <= 448 * scale
    assert inside.float().mean() > 0.99
    assert ((y - x).abs() <= bound + 1e-7)[inside].all()
    assert (y[~inside].abs() == 448 * scale).all()
    big = ref.quantize_fp8(torch.tensor([1e6, -1e6]), scale).float() * scale
    assert big.tolist() == pytest.approx([448 * 0.02, -448 * 0.02])  # saturates, never NaN


def test_schema_rejects_bad_inputs():
    case = make_case([0], [4], 4, 2, 64, 16)
    names = [t.name for t in PAGED_ATTENTION.inputs]
    tensors = dict(zip(names, case.attention_args(case.q)))
    dims = check_call(PAGED_ATTENTION, tensors, case.attrs)
    assert dims["T"] == 4 and dims["B"] == 1 and dims["num_blocks"] == case.kv_pool.shape[0]
    with pytest.raises(SchemaError, match="num_kv_heads"):
        check_call(PAGED_ATTENTION, tensors, {**case.attrs, "num_kv_heads": 4})
    with pytest.raises(SchemaError, match="dtype"):
        check_call(PAGED_ATTENTION, {**tensors, "seq_lens": case.seq_lens.long()}, case.attrs)
    with pytest.raises(SchemaError, match="kv_cache_dtype"):
        check_call(PAGED_ATTENTION, tensors, {**case.attrs, "kv_cache_dtype": "fp8_e4m3"})
    with pytest.raises(SchemaError, match="axis 0"):
        check_call(PAGED_ATTENTION, {**tensors, "cu_seqlens_q": case.cu_seqlens_q[:1]}, case.attrs)
    with pytest.raises(SchemaError, match="unknown"):
        check_call(ROPE_KV_APPEND, dict(zip([t.name for t in ROPE_KV_APPEND.inputs], case.append_args)),
                   case.attrs)  # softmax_scale is not an attribute of RopeKvAppend


def test_numpy_entry_matches_torch():
    import numpy as np
    case = make_case([3, 0], [1, 6], 4, 2, 64, 16, seed=5)
    pool_before = case.kv_pool.clone()
    args = [t.numpy() for t in (case.q, case.k, case.v, case.rope_cos, case.rope_sin, case.kv_pool,
                                case.block_tables, case.cu_seqlens_q, case.seq_lens, case.kv_scales)]
    out, pool = ref.attention_step_numpy(*args, **case.attrs)
    assert torch.equal(case.kv_pool.isnan(), pool_before.isnan())  # input pool untouched
    want = run_step(case).half().numpy()
    np.testing.assert_array_equal(out, want)
    assert pool.shape == case.kv_pool.shape
