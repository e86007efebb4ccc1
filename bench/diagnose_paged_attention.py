"""Split the error of one case of bench_paged_attention.py's correctness sweep (needs a CUDA GPU).

    python bench/diagnose_paged_attention.py --seed 44629 --cases 12 --index 30   # one case, in detail
    python bench/diagnose_paged_attention.py --seed 44629 --cases 12             # every case, one line each

`index` counts the sweep's cases from 0 (prefill, then decode, then mixed). The sweep's metric
compares the kernels' append + attention with the reference's append + attention, so it mixes two
things; here they are apart:
- RopeKvAppend: the stored pool bytes and q_rot of the kernel and of the reference, each against a
  float64 rotation rounded once to the stored dtype ("exact");
- PagedAttention on the SAME inputs: kernel vs float32 reference vs float64 reference;
- what the append difference alone does to the attention output (float64 on both pools).
Per sequence and per (token, head) row, so a wrong block, scale or boundary shows where it is.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import bench_paged_attention as bp
from trtc.plugins import kernels, reference as ref
from trtc.plugins.testing import rel_err


def exact_append(case):
    """q_rot and pool of the new tokens rotated in float64 and rounded ONCE to their dtypes."""
    seq, pos = ref.token_layout(case.cu_seqlens_q, case.seq_lens)
    pos_d = pos.to(case.q.device)
    cos, sin = case.rope_cos[pos_d].double(), case.rope_sin[pos_d].double()
    q = ref.rotate(case.q.double(), cos, sin).to(case.q.dtype)
    k, v = ref.rotate(case.k.double(), cos, sin), case.v.double()
    pool = case.kv_pool.clone()
    if pool.dtype == torch.float8_e4m3fn:
        s = case.kv_scales.double()
        k = (k / s[0]).clamp(-ref.FP8_MAX, ref.FP8_MAX)
        v = (v / s[1]).clamp(-ref.FP8_MAX, ref.FP8_MAX)
    blocks, slots = new_slots(case, seq, pos)
    pool[blocks, 0, :, slots, :] = k.to(pool.dtype)
    pool[blocks, 1, :, slots, :] = v.to(pool.dtype)
    return q, pool


def new_slots(case, seq, pos):
    bs = case.kv_pool.shape[3]
    blocks = case.block_tables.long().cpu()[seq, pos // bs].to(case.kv_pool.device)
    return blocks, (pos % bs).to(case.kv_pool.device)


def stored_new(case, pool):
    """[T, 2, Hkv, D] float64 values of the new tokens as stored in `pool` (not dequantized)."""
    seq, pos = ref.token_layout(case.cu_seqlens_q, case.seq_lens)
    blocks, slots = new_slots(case, seq, pos)
    return pool[blocks, :, :, slots, :].double()


def append_diffs(case, q_k, pool_k, q_r, pool_r, q_x, pool_x) -> dict:
    sk, sr, sx = stored_new(case, pool_k), stored_new(case, pool_r), stored_new(case, pool_x)
    seq, _ = ref.token_layout(case.cu_seqlens_q, case.seq_lens)
    per_seq = torch.zeros(case.seq_lens.numel(), dtype=torch.long)
    per_seq.index_add_(0, seq, (sk != sr).flatten(1).sum(1).cpu())
    return dict(pool_elems=sk.numel(),
                pool_kernel_vs_ref=int((sk != sr).sum()), pool_kernel_vs_exact=int((sk != sx).sum()),
                pool_ref_vs_exact=int((sr != sx).sum()),
                k_kernel_vs_ref=int((sk[:, 0] != sr[:, 0]).sum()), v_kernel_vs_ref=int((sk[:, 1] != sr[:, 1]).sum()),
                max_rel_pool_diff=float(((sk - sr).abs() / sr.abs().clamp_min(1e-30)).max()),
                q_elems=q_k.numel(), q_kernel_vs_ref=int((q_k != q_r).sum()), q_kernel_vs_exact=int((q_k != q_x).sum()),
                q_ref_vs_exact=int((q_r != q_x).sum()), pool_diffs_per_seq=per_seq.tolist())


def per_sequence(case, out, want) -> list[dict]:
    cu = case.cu_seqlens_q.long().cpu().tolist()
    lens = case.seq_lens.long().cpu().tolist()
    e = (out.double().cpu() - want.double().cpu())
    total = float(e.norm() ** 2)
    rows = []
    for b in range(len(lens)):
        eb, rb = e[cu[b]:cu[b + 1]], want[cu[b]:cu[b + 1]].double().cpu()
        rows.append(dict(b=b, n=cu[b + 1] - cu[b], L=lens[b], rel=float(eb.norm() / rb.norm()),
                         share=float(eb.norm() ** 2) / total if total else 0.0))
    return rows


def worst_rows(case, out, want, k=8) -> list[dict]:
    seq, pos = ref.token_layout(case.cu_seqlens_q, case.seq_lens)
    e = (out.double().cpu() - want.double().cpu()).norm(dim=-1)  # [T, Hq]
    r = want.double().cpu().norm(dim=-1)
    top = torch.topk(e.flatten(), k).indices
    hq = e.shape[1]
    return [dict(token=int(i) // hq, head=int(i) % hq, b=int(seq[int(i) // hq]), pos=int(pos[int(i) // hq]),
                 L=int(case.seq_lens[seq[int(i) // hq]]), err=float(e.flatten()[i]), ref=float(r.flatten()[i]))
            for i in top]


def attention(case, q, pool, **kw):
    out = torch.full_like(q, float("nan"))
    kernels.paged_attention(q, pool, *case.attention_args(q)[2:], out=out, **case.attrs, **kw)
    torch.cuda.synchronize()
    return out


def analyse(case, detail: bool) -> dict:
    pool_r = case.kv_pool.clone()
    q_r = ref.rope_kv_append(*case.append_args[:-1], pool_r, **case.append_attrs)
    q_x, pool_x = exact_append(case)
    pool_k = case.kv_pool  # the kernel appends in place
    q_k = kernels.rope_kv_append(*case.append_args, **case.append_attrs)
    rest = case.attention_args(q_k)[2:]
    f32_r = ref.paged_attention_f32(q_r, pool_r, *rest, **case.attrs)
    f64 = {name: ref.paged_attention_f64(q, p, *rest, **case.attrs)
           for name, q, p in (("kernel", q_k, pool_k), ("ref", q_r, pool_r), ("exact", q_x, pool_x))}
    f32_k = ref.paged_attention_f32(q_k, pool_k, *rest, **case.attrs)
    out_k = attention(case, q_k, pool_k)
    out_r = attention(case, q_r, pool_r)
    res = dict(
        sweep_metric=rel_err(out_k, f32_r),  # what bench_paged_attention.py reports
        attn_kernel_inputs_vs_f64=rel_err(out_k, f64["kernel"]),
        attn_ref_inputs_vs_f64=rel_err(out_r, f64["ref"]),
        attn_kernel_inputs_vs_f32=rel_err(out_k, f32_k),
        f32_ref_vs_f64=rel_err(f32_r, f64["ref"]),
        out_rounding_floor=rel_err(f64["kernel"].to(case.q.dtype), f64["kernel"]),
        append_effect_f64_kernel_vs_ref=rel_err(f64["kernel"], f64["ref"]),
        append_effect_f64_kernel_vs_exact=rel_err(f64["kernel"], f64["exact"]),
        append_effect_f64_ref_vs_exact=rel_err(f64["ref"], f64["exact"]),
        append=append_diffs(case, q_k, pool_k, q_r, pool_r, q_x, pool_x),
        kv_scales=case.kv_scales.tolist())
    if detail:
        res["per_seq_sweep_metric"] = per_sequence(case, out_k, f32_r)
        res["per_seq_attn_kernel_inputs_vs_f64"] = per_sequence(case, out_k, f64["kernel"])
        res["per_seq_append_effect"] = per_sequence(case, f64["kernel"], f64["ref"])
        res["worst_rows_sweep_metric"] = worst_rows(case, out_k, f32_r)
        res["worst_rows_attn_vs_f64"] = worst_rows(case, out_k, f64["kernel"])
        cfgs = [kernels.ContextConfig(bm, bn, nw, ns) for bm, bn, nw, ns in
                ((128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2))]
        res["configs_vs_f64"] = {str(c): rel_err(attention(case, q_k, pool_k, context_cfg=c), f64["kernel"])
                                 for c in cfgs}
    return res


def print_detail(r: dict) -> None:
    for k, v in r.items():
        if isinstance(v, float):
            print(f"  {k:36} {v:.3e}")
    print("  append:", {k: v for k, v in r["append"].items() if k != "pool_diffs_per_seq"})
    print("  pool diffs (kernel vs ref) per sequence:", r["append"]["pool_diffs_per_seq"])
    for k in ("per_seq_sweep_metric", "per_seq_attn_kernel_inputs_vs_f64", "per_seq_append_effect"):
        top = sorted(r[k], key=lambda x: -x["share"])[:6]
        print(f"  {k} (largest shares of the error):")
        for x in top:
            print(f"    b {x['b']:2} n {x['n']:3} L {x['L']:4} rel {x['rel']:.2e} share {x['share']:.2f}")
    for k in ("worst_rows_sweep_metric", "worst_rows_attn_vs_f64"):
        print(f"  {k}:")
        for x in r[k][:6]:
            print(f"    tok {x['token']:4} head {x['head']:2} b {x['b']:2} pos {x['pos']:4} L {x['L']:4} "
                  f"err {x['err']:.2e} |ref| {x['ref']:.2e}")
    for c, e in r["configs_vs_f64"].items():
        print(f"  {c}: {e:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--cases", type=int, default=12, help="cases per phase of the sweep to replay")
    ap.add_argument("--index", type=int, nargs="*", default=None, help="cases to analyse in detail")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU on this machine")
    out = {}
    for i, (phase, case_seed, shape) in enumerate(bp.sweep_shapes(args.cases, args.seed)):
        detail = args.index is not None and i in args.index
        if args.index and not detail:
            continue
        r = analyse(bp.build_case(shape, case_seed), detail)
        r.update(phase=phase, case_seed=case_seed,
                 shape={k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in shape.items()})
        out[i] = r
        a = r["append"]
        print(f"{i:3} {phase:7} {r['shape']['dtype']:14} {r['shape']['kv_cache_dtype']:8} "
              f"B {len(shape['ctx_lens']):2} sweep {r['sweep_metric']:.2e} | attn vs f64 {r['attn_kernel_inputs_vs_f64']:.2e}"
              f" (floor {r['out_rounding_floor']:.2e}) | append effect {r['append_effect_f64_kernel_vs_ref']:.2e}"
              f" | pool diffs {a['pool_kernel_vs_ref']}/{a['pool_elems']} (kernel!=exact {a['pool_kernel_vs_exact']},"
              f" ref!=exact {a['pool_ref_vs_exact']})", flush=True)
        if detail:
            print_detail(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
