"""The artifact contract: everything trtc writes into an engine dir or an export dir and reads back.

This module is the only place where config.json / trtc_export.json fields, rank file names, graph
I/O names, the KV block arithmetic and the file checksums are spelled. The compiler writes through
it, the runtime and `trtc inspect` read through it; neither imports the other's internals.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from trtc.errors import TrtcError

# --- file names ---------------------------------------------------------------------------------

ENGINE_CONFIG = "config.json"          # engine dir (trtc build)
EXPORT_CONFIG = "trtc_export.json"     # export dir (trtc export)
FORMAT_VERSION = 2                     # of both configs; 1: trtc 0.1 before the typed contract


def rank_engine(rank: int, target: str | None = None) -> str:
    """Engine file of one rank; `target` names a per-target engine where one engine cannot serve
    all targets of an artifact (full TensorRT: one compute capability per engine)."""
    return f"rank{rank}.engine" if target is None else f"rank{rank}.{target}.engine"


def rank_onnx(rank: int) -> str:
    return f"rank{rank}.onnx"


def onnx_data(onnx_file: str) -> str:
    """External-data file of a rank graph (its weights)."""
    return onnx_file + ".data"


def is_rank_file(name: str) -> bool:
    return name.startswith("rank")


# --- graph I/O names ----------------------------------------------------------------------------
# Native form: input_ids, position_ids int64 [batch, seq]; one cache per layer and K/V,
# [batch, kv_heads, max_seq_len, head_dim], as `past_key_values.{i}.{key,value}` in and
# `present.{i}.{key,value}` out (the same buffer: the KV-cache update writes in place).
# Plugin form: `past_kv_pool.{i}` [num_blocks, 2, kv_heads, block_size, head_dim] in,
# `present_kv_pool.{i}` out (aliased), and `block_tables` int32 [batch, max_blocks].

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"      # exported by HF's forward, removed by the cleanup pass
LOGITS = "logits"
BLOCK_TABLES = "block_tables"
PAST_PREFIX = "past_key_values."
POOL_PREFIX = "past_kv_pool."
TOKEN_INPUTS = (INPUT_IDS, POSITION_IDS)


def past_name(layer: int, kv: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kv}"


def present_name(layer: int, kv: str) -> str:
    return f"present.{layer}.{kv}"


def cache_names(num_layers: int) -> list[tuple[str, str]]:
    """(graph input, graph output) name pairs of the native KV cache, in layer order, key first."""
    return [(past_name(i, kv), present_name(i, kv)) for i in range(num_layers) for kv in ("key", "value")]


def pool_names(num_layers: int) -> list[tuple[str, str]]:
    """(graph input, graph output) name pairs of the plugin form's per-layer block pools."""
    return [(f"{POOL_PREFIX}{i}", f"present_kv_pool.{i}") for i in range(num_layers)]


def is_cache_input(name: str) -> bool:
    return name.startswith(PAST_PREFIX) or name.startswith(POOL_PREFIX)


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, numpy dtype name, shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class IOTable:
    """The rank graph's inputs and outputs, as the engine was built from it."""

    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        return next((t for t in self.outputs if t.name == name), None)


# --- KV cache arithmetic ------------------------------------------------------------------------

DEFAULT_KV_BLOCK_SIZE = 16             # tokens per KV block of the paged (plugin) cache


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-int(tokens) // block_size)


def max_blocks(max_seq_len: int, block_size: int) -> int:
    """Block-table width: blocks of one sequence of max_seq_len tokens."""
    return blocks_for(max_seq_len, block_size)


def cache_shape(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int) -> tuple[int, int, int, int]:
    """Native per-layer K or V cache: [batch, kv_heads, max_seq_len, head_dim]."""
    return (batch, num_kv_heads, max_seq_len, head_dim)


def pool_shape(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int) -> tuple[int, ...]:
    """Plugin-form per-layer block pool: [num_blocks, 2 (K, V), kv_heads, block_size, head_dim]."""
    return (num_blocks, 2, num_kv_heads, block_size, head_dim)


# --- checksums ----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(d: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"sha256", "size"}} of files in d, sorted by name."""
    return {n: {"sha256": sha256_file(d / n), "size": (d / n).stat().st_size} for n in sorted(names)}


def verify_files(d: Path, table: dict[str, dict], names: list[str] | None = None,
                 rebuild_hint: str = "rebuild it", config_name: str = ENGINE_CONFIG) -> None:
    """Check size and sha256 of `names` (default: all) against `table`; TrtcError naming the file."""
    for n in names if names is not None else list(table):
        entry = table.get(n)
        if entry is None:
            raise TrtcError(f"{d / config_name} lists no checksum for {n}; {rebuild_hint}")
        p = d / n
        if not p.is_file():
            raise TrtcError(f"{p} is missing; {rebuild_hint}")
        size = p.stat().st_size
        if size != entry["size"]:
            raise TrtcError(f"{p} is {size} bytes, expected {entry['size']} (truncated or replaced); {rebuild_hint}")
        if sha256_file(p) != entry["sha256"]:
            raise TrtcError(f"{p} does not match its sha256 in {config_name} (corrupted); {rebuild_hint}")
