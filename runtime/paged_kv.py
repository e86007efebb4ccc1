"""Paged KV cache, host side: one block pool per layer and a block table per sequence.

The plugin form's graph (compiler/passes/plugin_attention.py) reads and writes the KV cache only
through `past_kv_pool.i` [num_blocks, 2, Hkv, block_size, D] and `block_tables` [B, max_blocks]
int32. This manager owns both: blocks are handed out from a free list when a sequence's length
crosses a block boundary (so the blocks in use follow the tokens in the cache, and a sequence's
blocks are generally not contiguous: prefill takes blocks for all sequences, then decode steps take
them in turn), and `block_tables()` writes each sequence's block ids in order, -1 past its last
block (never read: the plugins read blocks [0, ceil(seq_len / block_size)) only).

The pool itself is sized at `allocate` for the worst case of the batch (every sequence reaching
max_seq_len) unless a smaller `num_blocks` is given; running out is a TrtcError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trtc import artifact as art
from trtc.errors import TrtcError


@dataclass
class PagedKVCache:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    max_seq_len: int
    dtype: type = np.float32
    pools: list[np.ndarray] = field(default_factory=list)   # per layer [num_blocks, 2, Hkv, bs, D]
    tables: list[list[int]] = field(default_factory=list)   # per sequence: block ids in order
    free: list[int] = field(default_factory=list)           # unused block ids (popped from the end)

    @property
    def max_blocks(self) -> int:
        """Block-table width: blocks of a sequence of max_seq_len tokens."""
        return art.max_blocks(self.max_seq_len, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.pools[0].shape[0] if self.pools else 0

    def allocate(self, batch: int, num_blocks: int | None = None) -> None:
        """Fresh zeroed pools and empty tables for `batch` sequences."""
        n = batch * self.max_blocks if num_blocks is None else num_blocks
        shape = art.pool_shape(n, self.num_kv_heads, self.block_size, self.head_dim)
        self.pools = [np.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.tables = [[] for _ in range(batch)]
        self.free = list(range(n - 1, -1, -1))   # hand out 0, 1, 2, ... in the order they are needed

    def reserve(self, lengths) -> None:
        """Make sequence b hold blocks for lengths[b] tokens (the cache length after the next step)."""
        for b, length in enumerate(np.asarray(lengths).tolist()):
            if length > self.max_seq_len:
                raise TrtcError(f"sequence {b} needs {length} cache slots, more than max-seq-len "
                                f"{self.max_seq_len}; re-export with a larger --max-seq-len")
            need = art.blocks_for(length, self.block_size)
            while len(self.tables[b]) < need:
                if not self.free:
                    raise TrtcError(f"KV block pool exhausted ({self.num_blocks} blocks of {self.block_size} "
                                    f"tokens); allocate more blocks or run fewer sequences at once")
                self.tables[b].append(self.free.pop())

    def release(self, b: int) -> None:
        """Return sequence b's blocks to the free list (its table becomes empty)."""
        self.free.extend(reversed(self.tables[b]))
        self.tables[b] = []

    def keep(self, rows: list[int]) -> None:
        """Keep only these sequences (in this order); the others' blocks return to the free list."""
        for b in sorted(set(range(len(self.tables))) - set(rows)):
            self.release(b)
        self.tables = [self.tables[b] for b in rows]

    def block_tables(self) -> np.ndarray:
        out = np.full((len(self.tables), self.max_blocks), -1, dtype=np.int32)
        for b, t in enumerate(self.tables):
            out[b, :len(t)] = t
        return out
