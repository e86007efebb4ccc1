"""What trtc's dense experts cost: one MoE layer's experts, dense (trtc's graph) vs top-k only.

trtc traces transformers' MoE blocks with every expert on every token (compiler/moe.py): two
batched GEMMs over all E experts, [E, T, H] x [E, H, 2I] and [E, T, I] x [E, I, H], then a
routing-weighted sum. Only k of E experts per token contribute, so the GEMMs do E/k times the
useful work. This times, on one layer of a real model's shape (random weights, transformers'
own router on random hidden states):

  dense      trtc.compiler.moe.dense_experts_forward (the formulation in trtc's graph)
  grouped    transformers' `grouped_mm` experts: tokens sorted by expert, one grouped GEMM over
             the chosen (token, expert) pairs only: the top-k work, no waste
  eager      transformers' default loop over the experts hit (what generate() runs)

and prints, per token count T, the milliseconds of each (CUDA events, median of --iters after
warm-up), dense / grouped, the FLOP ratio E/k, and how many experts the routing hit (decode with
few tokens reads only those experts' weights; dense reads all E).

    python bench/bench_moe.py [--device cuda] [--dtype bfloat16] [--tokens 1,8,64,512,4096]
    python bench/bench_moe.py --device cpu --dtype float32 --shrink 16 --tokens 1,64   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

# Layer shapes of released models (their config.json): hidden H, expert size I, experts E, top k.
MODELS = {
    "Mixtral-8x7B": dict(family="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                         num_experts_per_tok=2),
    "Qwen3-30B-A3B": dict(family="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True),
}


def _block(name: str, shrink: int, dtype, device):
    """transformers' sparse MoE block of one layer of `name`, random weights (std 0.02)."""
    import torch
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    kw = {k: (v // shrink if k in ("hidden_size", "intermediate_size", "moe_intermediate_size") else v)
          for k, v in MODELS[name].items() if k != "family"}
    family = MODELS[name]["family"]
    cfg = (MixtralConfig if family == "mixtral" else Qwen3MoeConfig)(num_attention_heads=8, **kw)
    block = (MixtralSparseMoeBlock if family == "mixtral" else Qwen3MoeSparseMoeBlock)(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block.to(device=device, dtype=dtype).eval(), cfg


def _time_ms(fn, iters: int, device: str) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(name: str, tokens: list[int], dtype_name: str, device: str, shrink: int, iters: int) -> list[dict]:
    import torch
    from transformers.integrations.moe import grouped_mm_experts_forward

    from trtc.compiler.moe import dense_experts_forward

    dtype = getattr(torch, dtype_name)
    block, cfg = _block(name, shrink, dtype, device)
    experts, e, k = block.experts, block.experts.down_proj.shape[0], cfg.num_experts_per_tok
    eager = type(experts).forward.__wrapped__ if hasattr(type(experts).forward, "__wrapped__") else None
    rows = []
    for t in tokens:
        g = torch.Generator(device=device).manual_seed(t)
        x = torch.randn(t, experts.down_proj.shape[1], generator=g, device=device, dtype=dtype)
        with torch.no_grad():
            _, w, idx = block.gate(x)
            variants = {"dense": lambda: dense_experts_forward(experts, x, idx, w),
                        "grouped": lambda: grouped_mm_experts_forward(experts, x, idx, w)}
            if eager is not None:
                variants["eager"] = lambda: eager(experts, x, idx, w)
            ref = variants["grouped"]().float()
            err = (variants["dense"]().float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            ms = {v: _time_ms(f, iters, device) for v, f in variants.items()}
        rows.append(dict(model=name, tokens=t, experts_hit=int(idx.unique().numel()), experts=e, top_k=k,
                         ms=ms, dense_over_grouped=ms["dense"] / ms["grouped"], flop_ratio=e / k, rel_diff=err))
    del block, experts
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shrink", type=int, default=1, help="divide H and I by this (a quick CPU run)")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    import torch

    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"# MoE experts of one layer, {a.dtype}, {where}, torch {torch.__version__}"
          f"{f', H and I / {a.shrink}' if a.shrink > 1 else ''}")
    print("| model | T tokens | experts hit / E | dense ms | grouped (top-k) ms | eager ms | dense / grouped "
          "| dense FLOPs / top-k FLOPs | max rel diff dense vs grouped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.models.split(","):
        for r in run(name, [int(t) for t in a.tokens.split(",")], a.dtype, a.device, a.shrink, a.iters):
            ms = r["ms"]
            print(f"| {r['model']} | {r['tokens']} | {r['experts_hit']} / {r['experts']} | {ms['dense']:.3f} | "
                  f"{ms['grouped']:.3f} | {ms.get('eager', float('nan')):.3f} | {r['dense_over_grouped']:.2f} | "
                  f"{r['flop_ratio']:.0f} | {r['rel_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
