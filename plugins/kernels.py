"""Triton kernels of the attention plugins (semantics: plugins/schema.py, reference: plugins/reference.py).

Three kernels and a combine step:
- `rope_kv_append_kernel`: one program per new token; rotates q and k, quantizes k/v for an FP8
  pool (correctly rounded x / scale), writes them into the token's block slot. Memory-bound, touches
  each byte once.
- `paged_attention_kernel` (context phase, varlen, any mix): FlashAttention-2 style. The M rows of a
  tile are (token, query head of the GQA group) pairs, so one K/V tile read from the pool serves all
  the group's heads. Programs = (cdiv(T, BLOCK_Q) + B) x Hkv: every sequence's q-blocks fit, the
  surplus programs exit at once (a grid that is a shape expression, as AOT TensorRT wants).
- `paged_decode_kernel` (generation phase, one token per sequence): flash-decoding. The context is
  split over NUM_SPLITS programs per (sequence, KV head) so that a small batch still fills the GPU;
  `combine_kernel` merges the splits with their log-sum-exps. NUM_SPLITS == 1 writes the output
  directly. FP8 pools are read as FP8 (half the bytes) and converted in registers; the K scale is
  folded into the softmax scale and the V scale into the final normalization.

Kernel signatures list input pointers, then int32 scalars, then output pointers: the calling
convention of TensorRT's AOT plugins (tensorrt_plugin.py compiles the same kernels to PTX). Every
other parameter is a constexpr.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from .schema import PAGED_ATTENTION, ROPE_KV_APPEND, SchemaError, check_call

LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(cu_ptr, idx, B, SEARCH: tl.constexpr):
    """Number of sequences b in [1, B) whose start cu[b] <= idx, i.e. the sequence holding token idx."""
    n = 0
    for i in range(0, B, SEARCH):
        offs = 1 + i + tl.arange(0, SEARCH)
        c = tl.load(cu_ptr + offs, mask=offs < B, other=2147483647)
        n += tl.sum((c <= idx).to(tl.int32), axis=0)
    return n


@triton.jit
def rope_kv_append_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, bt_ptr, cu_ptr, seq_lens_ptr, scales_ptr,
                          pool_in_ptr, B, max_blocks, q_rot_ptr, pool_ptr,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                          HQ_P: tl.constexpr, HKV_P: tl.constexpr, FP8: tl.constexpr, SEARCH: tl.constexpr):
    t = tl.program_id(0)
    b = _find_seq(cu_ptr, t, B, SEARCH)
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    pos = tl.load(seq_lens_ptr + b) - n + (t - start)
    blk = tl.load(bt_ptr + b * max_blocks + pos // BS).to(tl.int64)
    slot = pos % BS
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HALF + d)[None, :]
    s = tl.load(sin_ptr + pos * HALF + d)[None, :]

    hq = tl.arange(0, HQ_P)[:, None]
    mq = hq < HQ
    qp = q_ptr + t * HQ * D + hq * D + d[None, :]
    q1 = tl.load(qp, mask=mq).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=mq).to(tl.float32)
    op = q_rot_ptr + t * HQ * D + hq * D + d[None, :]
    tl.store(op, (q1 * c - q2 * s).to(q_rot_ptr.dtype.element_ty), mask=mq)
    tl.store(op + HALF, (q2 * c + q1 * s).to(q_rot_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, HKV_P)[:, None]
    mk = hk < HKV
    kp = k_ptr + t * HKV * D + hk * D + d[None, :]
    k1 = tl.load(kp, mask=mk).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=mk).to(tl.float32)
    v1 = tl.load(v_ptr + t * HKV * D + hk * D + d[None, :], mask=mk).to(tl.float32)
    v2 = tl.load(v_ptr + t * HKV * D + hk * D + HALF + d[None, :], mask=mk).to(tl.float32)
    r1 = k1 * c - k2 * s
    r2 = k2 * c + k1 * s
    if FP8:
        # x / scale correctly rounded (div_rn), as the schema and the reference define it. Triton's
        # `/` on fp32 is an approximate division: for some scales it moves ~0.1% of the stored
        # e4m3 values one step (seed 44629 in bench/RESULTS-paged-attention.md).
        ks = tl.load(scales_ptr) + tl.zeros_like(r1)
        vs = tl.load(scales_ptr + 1) + tl.zeros_like(v1)
        r1 = tl.clamp(tl.math.div_rn(r1, ks), -448.0, 448.0)
        r2 = tl.clamp(tl.math.div_rn(r2, ks), -448.0, 448.0)
        v1 = tl.clamp(tl.math.div_rn(v1, vs), -448.0, 448.0)
        v2 = tl.clamp(tl.math.div_rn(v2, vs), -448.0, 448.0)
    ty = pool_ptr.dtype.element_ty
    kdst = pool_ptr + blk * (2 * HKV * BS * D) + hk * (BS * D) + slot * D + d[None, :]
    vdst = kdst + HKV * BS * D
    tl.store(kdst, r1.to(ty), mask=mk)
    tl.store(kdst + HALF, r2.to(ty), mask=mk)
    tl.store(vdst, v1.to(ty), mask=mk)
    tl.store(vdst + HALF, v2.to(ty), mask=mk)


@triton.jit
def _attn_tile(q, acc, l_i, m_i, n0, kv_end, qpos, qk_scale, pool_kv, bt_row, d,
               HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """One K/V tile of BLOCK_N positions from n0, online softmax (base 2) update."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    if MASK:
        kin = kpos < kv_end
        blk = tl.load(bt_row + kpos // BS, mask=kin, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + kpos // BS).to(tl.int64)
    base = blk * (2 * HKV * BS * D) + (kpos % BS) * D
    if MASK:
        k = tl.load(pool_kv + base[:, None] + d[None, :], mask=kin[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(pool_kv + base[:, None] + d[None, :]).to(q.dtype)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK:
        s = tl.where((kpos[None, :] <= qpos[:, None]) & kin[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(pool_kv + HKV * BS * D + base[:, None] + d[None, :], mask=kin[:, None], other=0.0).to(q.dtype)
    else:
        v = tl.load(pool_kv + HKV * BS * D + base[:, None] + d[None, :]).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
    return acc, l_i, m_new


@triton.jit
def paged_attention_kernel(q_ptr, pool_ptr, bt_ptr, cu_ptr, seq_lens_ptr, scales_ptr, B, max_blocks, out_ptr,
                           HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                           SM_SCALE: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, SEARCH: tl.constexpr):
    G: tl.constexpr = HQ // HKV
    BLOCK_Q: tl.constexpr = BLOCK_M // G  # tokens per tile; rows are (token, head of the group)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # sequence b owns q-blocks [cu[b] // BLOCK_Q + b, cu[b+1] // BLOCK_Q + b + 1)
    b = 0
    for i in range(0, B, SEARCH):
        offs = 1 + i + tl.arange(0, SEARCH)
        c = tl.load(cu_ptr + offs, mask=offs < B, other=2147483647 - B)
        b += tl.sum(((c // BLOCK_Q + offs) <= pid).to(tl.int32), axis=0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    q0 = start + (pid - (start // BLOCK_Q + b)) * BLOCK_Q
    if q0 >= end:
        return
    L = tl.load(seq_lens_ptr + b)
    ctx = L - (end - start)  # tokens before the first new token

    r = tl.arange(0, BLOCK_M)
    tq = r // G
    tok = q0 + tq
    row_ok = (tq < BLOCK_Q) & (tok < end)
    head = kvh * G + r % G
    qpos = ctx + (tok - start)  # absolute position of each row's token
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (tok * HQ + head)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)

    qk_scale = SM_SCALE * 1.4426950408889634
    if FP8:
        qk_scale = qk_scale * tl.load(scales_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    first = ctx + (q0 - start)  # smallest position among the tile's tokens
    kv_end = tl.minimum(L, first + BLOCK_Q)
    full_end = (first + 1) // BLOCK_N * BLOCK_N  # tiles below need no causal mask
    pool_kv = pool_ptr + kvh * (BS * D)
    bt_row = bt_ptr + b * max_blocks
    # tiles entirely at or below the tile's first position need no causal mask
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(q, acc, l_i, m_i, n0, kv_end, qpos, qk_scale, pool_kv, bt_row, d,
                                   HKV, BS, D, BLOCK_N, False)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(q, acc, l_i, m_i, n0, kv_end, qpos, qk_scale, pool_kv, bt_row, d,
                                   HKV, BS, D, BLOCK_N, True)
    o = acc / l_i[:, None]
    if FP8:
        o = o * tl.load(scales_ptr + 1)
    tl.store(out_ptr + (tok * HQ + head)[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def paged_decode_kernel(q_ptr, pool_ptr, bt_ptr, cu_ptr, seq_lens_ptr, scales_ptr, max_blocks,
                        out_ptr, part_o_ptr, part_lse_ptr,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                        SM_SCALE: tl.constexpr, FP8: tl.constexpr, G_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        NUM_SPLITS: tl.constexpr):
    """Program (sequence, KV head, split): the group's G query heads (rows padded to G_P >= 16 for
    the MMA) against positions [split * per_split, ...) of the sequence, BLOCK_N per tile.
    Variants measured and dropped (RESULTS-paged-attention.md, git history): CUDA-core FMA instead
    of the MMA, register prefetch, K as the A operand, K loaded transposed, TMA page tiles."""
    G: tl.constexpr = HQ // HKV
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(cu_ptr + b)
    if tl.load(cu_ptr + b + 1) - tok != 1:
        return  # no token of this sequence in the step
    L = tl.load(seq_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, L)

    g = tl.arange(0, G_P)
    g_ok = g < G
    head = kvh * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (tok * HQ + head)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
    qk_scale = SM_SCALE * 1.4426950408889634
    if FP8:
        qk_scale = qk_scale * tl.load(scales_ptr)
    m_i = tl.full([G_P], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D], tl.float32)
    pool_kv = pool_ptr + kvh * (BS * D)
    bt_row = bt_ptr + b * max_blocks
    for n0 in range(lo, hi, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kin = kpos < hi
        blk = tl.load(bt_row + kpos // BS, mask=kin, other=0).to(tl.int64)
        base = blk * (2 * HKV * BS * D) + (kpos % BS) * D
        k = tl.load(pool_kv + base[:, None] + d[None, :], mask=kin[:, None], other=0.0).to(q.dtype)
        v = tl.load(pool_kv + HKV * BS * D + base[:, None] + d[None, :], mask=kin[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(kin[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    if FP8:
        acc = acc * tl.load(scales_ptr + 1)
    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + (tok * HQ + head)[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:
        # empty split (lo >= hi): l = 0, lse = -inf, o = 0; the combine gives it weight 0
        row = (tok * HQ + head) * NUM_SPLITS + split
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], o, mask=g_ok[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.math.log2(l_i), mask=g_ok)


@triton.jit
def combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, HQ: tl.constexpr, D: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, S_P: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, S_P)
    row = (t * HQ + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    d = tl.arange(0, D)
    o = tl.load(part_o_ptr + (row + sp)[:, None] * D + d[None, :], mask=(sp < NUM_SPLITS)[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + (t * HQ + h) * D + d, o.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# launchers

@dataclasses.dataclass(frozen=True)
class ContextConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    num_splits: int = 0  # 0: choose from the batch size and context length
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


SEARCH = 128
_last: dict = {}  # the last compiled kernel per launcher (register/spill reports in bench/)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _require_cuda(*ts: torch.Tensor) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (debugging)
    for t in ts:
        if not t.is_cuda and not interpret:
            raise SchemaError("Triton kernels need CUDA tensors; use plugins.reference on the CPU")
        if not t.is_contiguous():
            raise SchemaError("Triton kernels need contiguous tensors")


def context_config(head_size: int, group: int) -> ContextConfig:
    # tuned on an H200 (bench/RESULTS-paged-attention.md)
    if head_size <= 64:
        return ContextConfig(block_m=128, block_n=64, num_warps=4, num_stages=2)
    return ContextConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)


def decode_config(fp8: bool) -> DecodeConfig:
    """Tuned on an H200 at batch 64 x context 4096, 32/8 heads, head 128 (RESULTS-paged-attention.md).
    FP8 wants bigger tiles: its loads are upcast in registers before the MMA, so Triton keeps the
    pipelined tiles in registers (~250/thread, 2 programs per SM) instead of shared memory."""
    if fp8:
        return DecodeConfig(num_splits=0, block_n=128, num_warps=4, num_stages=2)
    return DecodeConfig(num_splits=0, block_n=64, num_warps=4, num_stages=3)


def decode_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int, fp8: bool = False) -> int:
    """Enough programs for about two waves of the SMs (at ~5 resident programs per SM for fp16,
    ~2 for fp8), each split still reading >= 256 tokens."""
    progs = batch * num_kv_heads
    target = (4 if fp8 else 2) * num_sms
    return max(1, min(-(-target // progs), max(1, max_len // 256), 32))


def rope_kv_append(q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales, kv_pool,
                   **attrs) -> torch.Tensor:
    """Triton RopeKvAppend: returns q_rot, writes kv_pool in place."""
    names = [t.name for t in ROPE_KV_APPEND.inputs]
    args = (q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales, kv_pool)
    check_call(ROPE_KV_APPEND, dict(zip(names, args)), attrs)
    _require_cuda(*args)
    a = ROPE_KV_APPEND.attr_values(**attrs)
    q_rot = torch.empty_like(q)
    T, B = q.shape[0], seq_lens.shape[0]
    if T == 0:
        return q_rot
    rope_kv_append_kernel[(T,)](
        q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales, kv_pool,
        B, block_tables.shape[1], q_rot, kv_pool,
        HQ=a["num_q_heads"], HKV=a["num_kv_heads"], D=a["head_size"], BS=a["block_size"],
        HQ_P=_pow2(a["num_q_heads"]), HKV_P=_pow2(a["num_kv_heads"]), FP8=kv_pool.dtype == torch.float8_e4m3fn,
        SEARCH=SEARCH, num_warps=4)
    return q_rot


def paged_attention(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, max_q_len: int | None = None,
                    max_seq_len: int | None = None, context_cfg: ContextConfig | None = None,
                    decode_cfg: DecodeConfig | None = None, out: torch.Tensor | None = None, varlen_only: bool = False,
                    **attrs) -> torch.Tensor:
    """Triton PagedAttention. max_q_len / max_seq_len are host-side hints (the scheduler knows them);
    when not given they are read from the device (one synchronization). max_q_len == 1 takes the
    generation-phase (split-K) kernel unless varlen_only (the single kernel TensorRT's AOT path uses)."""
    names = [t.name for t in PAGED_ATTENTION.inputs]
    args = (q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales)
    check_call(PAGED_ATTENTION, dict(zip(names, args)), attrs)
    _require_cuda(*args)
    a = PAGED_ATTENTION.attr_values(**attrs)
    hq, hkv, dh, bs = a["num_q_heads"], a["num_kv_heads"], a["head_size"], a["block_size"]
    sm_scale = a["softmax_scale"] or 1.0 / math.sqrt(dh)
    fp8 = kv_pool.dtype == torch.float8_e4m3fn
    T, B = q.shape[0], seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if T == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    group = hq // hkv
    if max_q_len == 1 and not varlen_only:
        cfg = decode_cfg or decode_config(fp8)
        splits = cfg.num_splits
        if splits == 0:
            if max_seq_len is None:
                max_seq_len = int(seq_lens.max())
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
            splits = decode_splits(B, hkv, max_seq_len, sms, fp8)
        if splits > 1:
            part_o = torch.empty((T, hq, splits, dh), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((T, hq, splits), dtype=torch.float32, device=q.device)
        else:
            part_o = part_lse = out  # unused
        k = paged_decode_kernel[(B, hkv, splits)](
            q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, block_tables.shape[1],
            out, part_o, part_lse,
            HQ=hq, HKV=hkv, D=dh, BS=bs, SM_SCALE=sm_scale, FP8=fp8, G_P=max(16, _pow2(group)),
            BLOCK_N=cfg.block_n, NUM_SPLITS=splits, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _last["decode"] = k
        if splits > 1:
            combine_kernel[(T, hq)](part_o, part_lse, out, HQ=hq, D=dh, NUM_SPLITS=splits, S_P=_pow2(splits),
                                    num_warps=4)
        return out
    cfg = context_cfg or context_config(dh, group)
    if group > cfg.block_m:
        raise SchemaError(f"GQA group {group} larger than block_m {cfg.block_m}")
    block_q = cfg.block_m // group
    grid = (triton.cdiv(T, block_q) + B, hkv)
    paged_attention_kernel[grid](
        q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, B, block_tables.shape[1], out,
        HQ=hq, HKV=hkv, D=dh, BS=bs, SM_SCALE=sm_scale, FP8=fp8, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SEARCH=SEARCH, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
