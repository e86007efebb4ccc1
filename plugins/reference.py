"""Plain torch reference of the plugins declared in plugins/schema.py (exactly their semantics).

Slow and simple on purpose: per-sequence loops, float32 arithmetic. It accepts any even head size
and float32 activations too (schema `reference=True`), beyond what the kernels support, so tiny
fp32 test models run plugin-form graphs on the CPU reference backend. The Triton kernels are
checked against it on the GPU; it is checked against a float64 attention over a contiguous KV on
the CPU (tests/plugins). `rope_kv_append_numpy` / `paged_attention_numpy` are the ONNX Runtime
custom ops' entries (runtime/ort_plugin_session.py); `attention_step_numpy` runs both.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .schema import PAGED_ATTENTION, ROPE_KV_APPEND, check_call

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def rope_tables(max_positions: int, head_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_size/2] float32 for plain (unscaled) rotary embedding. Scaled
    variants (llama3, yarn) only change these tables: build them elsewhere and pass them in."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def softmax_scale(attrs: dict[str, Any]) -> float:
    s = attrs.get("softmax_scale", 0.0)
    return s if s else 1.0 / math.sqrt(attrs["head_size"])


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """float -> float8_e4m3fn with a dequantization scale: saturate(x / scale), round to nearest even."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def token_layout(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq index [T], position [T]) of every packed token."""
    cu = cu_seqlens_q.long().cpu()
    q_lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
    first = seq_lens.long().cpu() - q_lens  # position of each sequence's first new token
    pos = first[seq] + (torch.arange(int(cu[-1])) - cu[:-1][seq])
    return seq, pos


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX/Llama) rotary on float32 x [T, H, D] with cos/sin [T, D/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_kv_append(q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales, kv_pool,
                   **attrs) -> torch.Tensor:
    """RopeKvAppend: returns q_rot; writes rotated k and v into kv_pool in place."""
    names = [t.name for t in ROPE_KV_APPEND.inputs]
    tensors = dict(zip(names, (q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales, kv_pool)))
    check_call(ROPE_KV_APPEND, tensors, attrs, reference=True)
    bs = kv_pool.shape[3]
    seq, pos = token_layout(cu_seqlens_q, seq_lens)
    pos_d = pos.to(q.device)
    cos, sin = rope_cos[pos_d].float(), rope_sin[pos_d].float()
    q_rot = rotate(q.float(), cos, sin).to(q.dtype)
    k_rot = rotate(k.float(), cos, sin)
    vf = v.float()
    if kv_pool.dtype == torch.float8_e4m3fn:
        k_st, v_st = quantize_fp8(k_rot, kv_scales[0]), quantize_fp8(vf, kv_scales[1])
    else:
        k_st, v_st = k_rot.to(kv_pool.dtype), vf.to(kv_pool.dtype)
    blocks = block_tables.long().cpu()[seq, pos // bs].to(kv_pool.device)
    slots = (pos % bs).to(kv_pool.device)
    kv_pool[blocks, 0, :, slots, :] = k_st
    kv_pool[blocks, 1, :, slots, :] = v_st
    return q_rot


def gather_kv(kv_pool, block_tables, b: int, length: int, kv_scales,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized k, v [length, Hkv, D] (float32 unless `dtype`) of sequence b, read through its block table."""
    bs = kv_pool.shape[3]
    nblk = -(-length // bs)
    blocks = kv_pool[block_tables[b, :nblk].long()]  # [nblk, 2, Hkv, bs, D]
    kv = blocks.to(dtype).permute(1, 0, 3, 2, 4).reshape(2, nblk * bs, kv_pool.shape[2], kv_pool.shape[4])[:, :length]
    if kv_pool.dtype == torch.float8_e4m3fn:
        return kv[0] * kv_scales[0].to(dtype), kv[1] * kv_scales[1].to(dtype)
    return kv[0], kv[1]


def paged_attention_f32(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs) -> torch.Tensor:
    """PagedAttention in float32 (the output before the final cast to q's dtype)."""
    return _paged_attention(torch.float32, q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs)


def paged_attention_f64(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs) -> torch.Tensor:
    """PagedAttention in float64: the yardstick that tells kernel error from float32 reference error."""
    return _paged_attention(torch.float64, q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs)


def _paged_attention(dtype, q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs) -> torch.Tensor:
    names = [t.name for t in PAGED_ATTENTION.inputs]
    check_call(PAGED_ATTENTION, dict(zip(names, (q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales))), attrs,
               reference=True)
    attrs = PAGED_ATTENTION.attr_values(reference=True, **attrs)
    scale = softmax_scale(attrs)
    group = attrs["num_q_heads"] // attrs["num_kv_heads"]
    cu = cu_seqlens_q.long().cpu().tolist()
    lens = seq_lens.long().cpu().tolist()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for b in range(len(lens)):
        n, length = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        k, v = gather_kv(kv_pool, block_tables, b, length, kv_scales, dtype)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, Hq, D]
        qb = q[cu[b]:cu[b + 1]].to(dtype)  # [n, Hq, D]
        s = torch.einsum("qhd,khd->hqk", qb, k) * scale
        qpos = torch.arange(length - n, length, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(length, device=q.device)[None, :] > qpos, float("-inf"))
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def paged_attention(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs) -> torch.Tensor:
    """PagedAttention: out [T, Hq, D] in q's dtype."""
    return paged_attention_f32(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs).to(q.dtype)


def _to_torch(a):
    """numpy -> torch, including ml_dtypes bfloat16 / float8_e4m3fn (reinterpreted, not converted)."""
    import numpy as np

    name = str(a.dtype)
    if name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    if name == "float8_e4m3fn":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.ascontiguousarray(a))


def _to_numpy(t: torch.Tensor, like):
    return t.view(torch.uint16 if t.dtype == torch.bfloat16 else torch.uint8).numpy().view(like.dtype) \
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn) else t.numpy()


def attention_step_numpy(q, k, v, rope_cos, rope_sin, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales,
                         **attrs):
    """One layer's attention step on numpy arrays (for a CPU custom op): RopeKvAppend then
    PagedAttention. Returns (out [T, Hq, D], updated kv_pool); the input kv_pool is not modified."""
    tq, tk, tv, tc, ts, tbt, tcu, tsl, tsc = (_to_torch(a) for a in
                                              (q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens,
                                               kv_scales))
    pool = _to_torch(kv_pool).clone()
    append_attrs = {a.name: attrs[a.name] for a in ROPE_KV_APPEND.attrs if a.name in attrs}
    q_rot = rope_kv_append(tq, tk, tv, tc, ts, tbt, tcu, tsl, tsc, pool, **append_attrs)
    out = paged_attention(q_rot, pool, tbt, tcu, tsl, tsc, **attrs)
    return _to_numpy(out, q), _to_numpy(pool, kv_pool)


def rope_kv_append_numpy(q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales, kv_pool,
                         **attrs):
    """RopeKvAppend on numpy arrays (the ONNX Runtime custom op, runtime/ort_plugin_session.py).
    Returns (q_rot, updated kv_pool); the input kv_pool is not modified."""
    args = [_to_torch(a) for a in (q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales)]
    pool = _to_torch(kv_pool).clone()
    q_rot = rope_kv_append(*args, pool, **attrs)
    return _to_numpy(q_rot, q), _to_numpy(pool, kv_pool)


def paged_attention_numpy(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales, **attrs):
    """PagedAttention on numpy arrays (the ONNX Runtime custom op). Returns out [T, Hq, D]."""
    args = [_to_torch(a) for a in (q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales)]
    return _to_numpy(paged_attention(*args, **attrs), q)
