#!/usr/bin/env python3
"""Random-weight Hugging Face model dirs of real model shapes, written one tensor at a time.

    .venv/bin/python bench/make_models.py [--out DIR] [--dtype float16|bfloat16] tinyllama-1.1b llama-3.1-8b

Each dir holds config.json, model-0000N-of-0000M.safetensors shards (at most 2 GB each, HF's
sharding) with model.safetensors.index.json, and the bundled SmolLM2 tokenizer, cut to the model's
vocab where it has more ids (TinyLlama: 32000 of its 49152; `fit_tokenizer`), so that calibration
text tokenizes into ids the model has (`--quant` on these dirs).
Parameter names and shapes come from transformers' own LlamaForCausalLM built on the meta device,
so `AutoModelForCausalLM.from_pretrained` loads the dir with no missing or unexpected keys.

Memory: the model is never whole in memory, not even one shard. Each shard file is written
directly (the safetensors layout: 8-byte header length, JSON header, raw little-endian data) and
each tensor is generated in row blocks of at most 64 MiB (std-0.02 normal; norm weights 1), so
peak anonymous memory is a block plus the Python runtime. Idempotent: a complete dir is
skipped; an interrupted one resumes at the first shard not yet renamed into place.

Source dtype float16 (default): a float16 export then needs no dtype conversion, so the export
can use the weights as stored (reference or memory-map them) instead of writing a converted
copy; the real Llama-3.1-8B ships bfloat16, which a float16 build must convert: `--dtype bfloat16`
writes that variant for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

# Shapes as in the models' own config.json files (TinyLlama/TinyLlama-1.1B-Chat-v1.0,
# meta-llama/Llama-3.1-8B), untied embeddings. bos/eos are the bundled tokenizer's ids.
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192),
                  tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
MODELS = {"tinyllama-1.1b": TINYLLAMA, "llama-3.1-8b": LLAMA31_8B}

SHARD_BYTES = 2 * 10**9           # HF's "2GB" max_shard_size
BLOCK_BYTES = 64 * 2**20          # float32 generation block per write
MARGIN_BYTES = 2**30              # free space left on the disk after writing
DTYPES = {"float16": "F16", "bfloat16": "BF16"}
MARKER = ".trtc-bench-model.json"  # written last: the dir is complete


def config_dict(shape: dict, dtype: str) -> dict:
    return {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
            "dtype": dtype, **shape}


def parameter_shapes(model_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor LlamaForCausalLM's state_dict holds, in its order; built on
    the meta device from the written config.json (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in state_dict order, each shard at most SHARD_BYTES (a larger tensor alone)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def shard_header(tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str, itemsize: int) -> bytes:
    """The safetensors header: JSON of dtype/shape/data_offsets, space-padded to 8 bytes."""
    head: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        head[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def shard_size(tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str, itemsize: int) -> int:
    return 8 + len(shard_header(tensors, st_dtype, itemsize)) + sum(math.prod(s) * itemsize for _, s in tensors)


def write_tensor(f, name: str, shape: tuple[int, ...], dtype, seed: int) -> None:
    """Norm weights (1-D, '...norm.weight') are ones; everything else N(0, 0.02), written in row
    blocks of at most BLOCK_BYTES of float32 (the seed depends on the name: same bytes every run)."""
    import torch

    rows = shape[0]
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if name.endswith("norm.weight"):
        f.write(torch.ones(rows, dtype=dtype).view(torch.int16).numpy().tobytes())
        return
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    step = max(1, BLOCK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        block = torch.empty(min(step, rows - r), cols, dtype=torch.float32).normal_(0.0, 0.02, generator=g)
        f.write(block.to(dtype).view(torch.int16).numpy())


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int) -> None:
    """One shard file, written under a temporary name and renamed into place when complete."""
    import torch

    tdtype = getattr(torch, dtype)
    header = shard_header(tensors, DTYPES[dtype], tdtype.itemsize)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, shape in tensors:
            write_tensor(f, name, shape, tdtype, seed)
    tmp.rename(path)


def check_disk(dst: Path, need: int) -> None:
    free = shutil.disk_usage(dst).free
    if free < need + MARGIN_BYTES:
        raise SystemExit(f"make_models: {dst} needs {need / 2**30:.1f} GiB for the weights (+{MARGIN_BYTES / 2**30:.0f} GiB "
                         f"margin) and {free / 2**30:.1f} GiB is free; free space or pass --out on a larger disk")


def write_model(name: str, dst: Path, dtype: str = "float16", seed: int = 0) -> Path:
    """Write (or finish, or skip if complete) the random-weight model `name` into `dst`."""
    from trtc.compiler.load import DEFAULT_MODEL, resolve_source, save_tokenizer

    want = {"model": name, "config": config_dict(MODELS[name], dtype), "seed": seed}
    marker = dst / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == want:
            fit_tokenizer(dst, want["config"]["vocab_size"])      # dirs written before it cut the tokenizer
            return dst
        raise SystemExit(f"make_models: {dst} holds a different model ({marker}); remove the dir or pass another --out")
    started = dst / (MARKER + ".partial")       # what an interrupted run was writing
    if started.is_file() and json.loads(started.read_text()) != want:
        raise SystemExit(f"make_models: {dst} holds part of a different model ({started}); remove the dir or pass another --out")
    dst.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(want, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(want["config"], indent=2) + "\n")
    import torch

    itemsize = getattr(torch, dtype).itemsize
    shards = plan_shards(parameter_shapes(dst), itemsize)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    sizes = [shard_size(t, DTYPES[dtype], itemsize) for t in shards]
    todo = [i for i, fn in enumerate(files) if not ((dst / fn).is_file() and (dst / fn).stat().st_size == sizes[i])]
    check_disk(dst, sum(sizes[i] for i in todo))
    for i in todo:
        print(f"make_models: {name} {files[i]} ({sizes[i] / 2**30:.2f} GiB, {len(shards[i])} tensors)",
              file=sys.stderr, flush=True)
        write_shard(dst / files[i], shards[i], dtype, seed)
    index = {"metadata": {"total_size": sum(math.prod(s) * itemsize for t in shards for _, s in t)},
             "weight_map": {n: files[i] for i, t in enumerate(shards) for n, _ in t}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_tokenizer(resolve_source(DEFAULT_MODEL), dst)
    fit_tokenizer(dst, want["config"]["vocab_size"])
    started.rename(marker)
    return dst


def fit_tokenizer(dst: Path, vocab_size: int) -> None:
    """Cut the byte-level BPE tokenizer in dst to ids < vocab_size: drop the tokens past it and
    the merges that make or use them (merges are ranked, so the rest still tokenize any text, only
    into more pieces). A no-op when every id already fits."""
    path = dst / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    if max(vocab.values()) < vocab_size and all(a["id"] < vocab_size for a in tok.get("added_tokens", [])):
        return
    if any(a["id"] >= vocab_size for a in tok.get("added_tokens", [])):
        raise SystemExit(f"make_models: the tokenizer's special tokens do not fit a vocab of {vocab_size}")
    kept = {t: i for t, i in vocab.items() if i < vocab_size}
    merges = [m for m in tok["model"]["merges"]
              if all(t in kept for t in (*(m if isinstance(m, list) else m.split(" ")), "".join(m if isinstance(m, list) else m.split(" "))))]
    tok["model"]["vocab"], tok["model"]["merges"] = kept, merges
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tok, ensure_ascii=False))
    tmp.rename(path)


def default_root() -> Path:
    return Path(os.environ.get("TRTC_BENCH_DIR") or Path.home() / ".cache" / "trtc-bench")


def model_dir(name: str, root: Path, dtype: str) -> Path:
    return root / f"{name}-{dtype}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, default=default_root(), help="parent dir (default $TRTC_BENCH_DIR or "
                    "~/.cache/trtc-bench); each model goes to OUT/<model>-<dtype>")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in args.models:
        print(write_model(name, model_dir(name, args.out, args.dtype), args.dtype, args.seed))


if __name__ == "__main__":
    main()
