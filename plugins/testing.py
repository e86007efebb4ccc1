"""Random cases for the attention plugins, shared by tests/plugins and bench/.

A case is one attention step of a batch: sequence b already has ctx_lens[b] tokens in the pool and
brings new_lens[b] new tokens. Blocks are handed out in a random order, unused block-table entries
are -1 and every pool slot that no sequence owns is NaN, so a kernel that reads outside its
sequence's blocks shows it.
"""
from __future__ import annotations

import dataclasses

import torch

from .reference import quantize_fp8, rope_tables


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32 (after append)
    kv_scales: torch.Tensor  # [2] float32
    kv_pool: torch.Tensor  # [num_blocks, 2, Hkv, bs, D]
    attrs: dict
    ctx_k: list  # per sequence: dequantized float32 [ctx, Hkv, D] as stored (already rotated)
    ctx_v: list

    @property
    def append_args(self):
        return (self.q, self.k, self.v, self.rope_cos, self.rope_sin, self.block_tables, self.cu_seqlens_q,
                self.seq_lens, self.kv_scales, self.kv_pool)

    def attention_args(self, q_rot):
        return (q_rot, self.kv_pool, self.block_tables, self.cu_seqlens_q, self.seq_lens, self.kv_scales)

    @property
    def append_attrs(self):
        return {k: v for k, v in self.attrs.items() if k != "softmax_scale"}


def nan_of(dtype: torch.dtype):
    return torch.tensor(float("nan")).to(dtype)


def make_case(ctx_lens, new_lens, num_q_heads, num_kv_heads, head_size, block_size=16,
              dtype=torch.float16, kv_cache_dtype="auto", device="cpu", seed=0, spare_blocks=3,
              keep_context=True) -> Case:
    """Tensors are drawn on `device` directly (big cases stay fast); keep_context=False leaves
    ctx_k/ctx_v empty (they are only needed by naive_attention_f64)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)  # small host-side choices
    gd = torch.Generator(device=dev).manual_seed(seed)  # tensor data
    B = len(ctx_lens)
    total = [c + n for c, n in zip(ctx_lens, new_lens)]
    nblk = [-(-t // block_size) for t in total]
    max_blocks = max(nblk) + 1
    num_blocks = sum(nblk) + spare_blocks
    pool_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8_e4m3" else dtype
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    at = 0
    for b in range(B):
        block_tables[b, :nblk[b]] = perm[at:at + nblk[b]].int()
        at += nblk[b]
    pool = torch.full((num_blocks, 2, num_kv_heads, block_size, head_size), float("nan"), dtype=dtype,
                      device=dev).to(pool_dtype)
    bt_dev = block_tables.to(dev)
    if kv_cache_dtype == "fp8_e4m3":
        kv_scales = (0.015 + 0.015 * torch.rand(2, generator=g)).float()
    else:
        kv_scales = torch.ones(2, dtype=torch.float32)
    ctx_k, ctx_v = [], []
    for b in range(B):
        c = ctx_lens[b]
        kc = torch.randn(c, num_kv_heads, head_size, generator=gd, device=dev)
        vc = torch.randn(c, num_kv_heads, head_size, generator=gd, device=dev)
        if kv_cache_dtype == "fp8_e4m3":
            ks, vs = quantize_fp8(kc, kv_scales[0].item()), quantize_fp8(vc, kv_scales[1].item())
            if keep_context:
                ctx_k.append(ks.float().cpu() * kv_scales[0]), ctx_v.append(vs.float().cpu() * kv_scales[1])
        else:
            ks, vs = kc.to(pool_dtype), vc.to(pool_dtype)
            if keep_context:
                ctx_k.append(ks.float().cpu()), ctx_v.append(vs.float().cpu())
        pos = torch.arange(c, device=dev)
        blk = bt_dev[b].long()[pos // block_size]
        pool[blk, 0, :, pos % block_size, :] = ks
        pool[blk, 1, :, pos % block_size, :] = vs
    T = sum(new_lens)
    q = torch.randn(T, num_q_heads, head_size, generator=gd, device=dev).to(dtype)
    k = torch.randn(T, num_kv_heads, head_size, generator=gd, device=dev).to(dtype)
    v = torch.randn(T, num_kv_heads, head_size, generator=gd, device=dev).to(dtype)
    cos, sin = rope_tables(max(total) + 1, head_size)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(new_lens), 0).int()
    attrs = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size,
                 kv_cache_dtype=kv_cache_dtype, softmax_scale=0.0)
    return Case(q, k, v, cos.to(dev), sin.to(dev), bt_dev, cu.to(dev),
                torch.tensor(total, dtype=torch.int32, device=dev), kv_scales.to(dev), pool, attrs, ctx_k, ctx_v)


def naive_attention_f64(case: Case) -> torch.Tensor:
    """Float64 attention of the case's new tokens over a CONTIGUOUS KV (context as stored + new
    tokens rotated in float64), written without blocks: the independent check of the reference."""
    a = case.attrs
    group = a["num_q_heads"] // a["num_kv_heads"]
    scale = a["softmax_scale"] or a["head_size"] ** -0.5
    cu = case.cu_seqlens_q.cpu().long().tolist()
    lens = case.seq_lens.cpu().long().tolist()
    cos, sin = rope_tables(max(lens) + 1, a["head_size"])
    cos64, sin64 = cos.double(), sin.double()
    out = torch.empty(case.q.shape, dtype=torch.float64)
    for b in range(len(lens)):
        n, L = cu[b + 1] - cu[b], lens[b]
        pos = torch.arange(L - n, L)
        c, s = cos64[pos][:, None], sin64[pos][:, None]

        def rot(x):
            h = x.shape[-1] // 2
            return torch.cat([x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s], -1)

        q = rot(case.q[cu[b]:cu[b + 1]].cpu().double())
        k = torch.cat([case.ctx_k[b].double(), rot(case.k[cu[b]:cu[b + 1]].cpu().double())])
        v = torch.cat([case.ctx_v[b].double(), case.v[cu[b]:cu[b + 1]].cpu().double()])
        for h in range(a["num_q_heads"]):
            sc = q[:, h] @ k[:, h // group].T * scale  # [n, L]
            mask = torch.arange(L)[None, :] > (L - n + torch.arange(n))[:, None]
            p = sc.masked_fill(mask, float("-inf")).softmax(-1)
            out[cu[b]:cu[b + 1], h] = p @ v[:, h // group]
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    x, ref = x.double().cpu(), ref.double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm())


def append_matches(q_rot, q_ref, pool, pool_ref) -> tuple[bool, str]:
    """Kernel RopeKvAppend vs reference. Every pool slot NaN (unwritten) in both or in neither; V
    slots bit-identical (V is only cast, or divided by its scale for FP8: one correctly rounded
    operation on both sides); q_rot and K slots within one rounding step of their dtype, not
    bit-exact: the GPU contracts the rotation into FMAs, so a value within an fp32 ulp of a rounding
    boundary may round the other way (measured on an H200: up to 1e-4 of q_rot, 7e-5 of K slots)."""
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float8_e4m3fn: 2.0 ** -3}
    dq = (q_rot.float() - q_ref.float()).abs()
    if not (dq <= eps[q_rot.dtype] * q_ref.float().abs() + 1e-6).all():
        return False, f"q_rot max abs diff {dq.max().item():.3g}"
    a, b = pool.float(), pool_ref.float()  # [num_blocks, 2 (K, V), Hkv, bs, D]
    if not torch.equal(a.isnan(), b.isnan()):
        return False, f"{(a.isnan() != b.isnan()).sum().item()} pool slots written in one but not the other"
    ok = ~b.isnan()
    v_diff = int((a[:, 1][ok[:, 1]] != b[:, 1][ok[:, 1]]).sum())
    if v_diff:
        return False, f"{v_diff} V slots differ from the reference (V must be bit-identical)"
    k_ok = ok[:, 0]
    dk = (a[:, 0][k_ok] - b[:, 0][k_ok]).abs()
    tiny = 2.0 ** -9 if pool.dtype == torch.float8_e4m3fn else 1e-6  # smallest e4m3 subnormal step
    if not (dk <= eps[pool.dtype] * b[:, 0][k_ok].abs() + tiny).all():
        return False, f"K pool max abs diff {dk.max().item():.3g}"
    return True, ""


# ||out - ref|| / ||ref|| allowed for a kernel step (append + attention) against the float32
# reference, per activation dtype: about twice the largest of 36 random cases on an H200 (fp16
# 2.3-2.8e-4, bf16 1.9-2.3e-3, of which rounding the output to its dtype alone is 2.1e-4 / 1.6e-3).
TOLERANCE = {torch.float16: 5e-4, torch.bfloat16: 4.5e-3}
