"""Build-stage benchmark: wall time and peak RSS per stage (load, export, passes, build, package).

Models: the bundled SmolLM2-135M (real weights) and a TinyLlama-1.1B-shaped Llama with random
weights, both built in float16 with the real TensorRT-RTX builder. Each build runs in its own
process (`trtc build`), so peak RSS is that model's alone; the RSS column is the process's peak so
far after each stage (it only grows), so the stage where it jumps is the stage that needs it.

    .venv/bin/python bench/bench_build.py [--models smollm2,tinyllama-1.1b] [--dtype float16]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def make_tinyllama(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trtc.compiler.load import DEFAULT_MODEL, resolve_source
    from trtc.compiler.load import save_tokenizer

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**TINYLLAMA)
    cfg.dtype = "float16"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.float16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
    model.save_pretrained(out)
    save_tokenizer(resolve_source(DEFAULT_MODEL), out)   # any tokenizer: packaging only
    return out


def run_build(model: str, dtype: str, work: Path) -> tuple[list[tuple[str, float, float]], float, int]:
    out = work / "engine"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "trtc.cli", "build", "--model", model, "--dtype", dtype, "--output", str(out),
           "--target", "sm_89", "--max-batch-size", "8", "--max-input-len", "1024", "--max-seq-len", "2048"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"build failed for {model}:\n{res.stderr[-3000:]}")
    rows = [(m.group(1), float(m.group(2)), float(m.group(3))) for m in
            re.finditer(r"^\[trtc\] (\w+)\s+([\d.]+)\s+([\d.]+)$", res.stderr, re.M)]
    size = (out / "rank0.engine").stat().st_size
    return rows, wall, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,tinyllama-1.1b")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trtc-bench-"))
    print(f"# trtc build stages, {args.dtype}, target sm_89, batch 8, input 1024, seq 2048")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| model | stage | wall s | peak RSS MiB (process so far) |")
    print("|---|---|---:|---:|")
    try:
        for name in args.models.split(","):
            model = "smollm2-135m-instruct" if name == "smollm2" else str(make_tinyllama(work / "tinyllama"))
            rows, wall, size = run_build(model, args.dtype, work)
            for stage, dt, rss in rows:
                print(f"| {name} | {stage} | {dt:.1f} | {rss:.0f} |")
            print(f"| {name} | **total (process)** | {wall:.1f} | {max(r[2] for r in rows):.0f} |")
            print(f"| {name} | engine size | {size / 2**20:.0f} MiB | |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
