"""The Session interface: run one rank's graph for one step, with a KV cache it owns.

The generator drives any Session the same way: `allocate(batch)` once per generation, then
`step(input_ids, position_ids)` for prefill (seq > 1) and decode (seq = 1). The KV cache is a
fixed [batch, kv_heads, max_seq_len, head_dim] buffer per layer and per key/value; a step writes
its new entries at each sequence's position_ids[:, 0] (TensorScatter / IKVCacheUpdateLayer) and
attends to slots <= each query's position. Plugin-form graphs (`--attention plugin`) keep a paged
cache behind the same interface instead (runtime/ort_plugin_session.py, runtime/paged_kv.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from trtc.artifact import cache_names  # noqa: F401  (re-exported: the KV cache's graph I/O name pairs)


class Session(Protocol):
    backend: str          # "onnxruntime" or "tensorrt"

    def allocate(self, batch: int) -> None:
        """Fresh (zeroed) KV cache for `batch` sequences of up to max_seq_len tokens."""

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray | None = None) -> np.ndarray:
        """input_ids, position_ids int64 [B, S] -> logits float32 [B, S, vocab].

        lengths [B]: real tokens per row (the rest is right-padding; default all S). Sessions of
        packed graphs compute only those; others compute the padding too (its cache slots are
        never read before being overwritten). Logits past a row's length are unspecified."""

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch (in this order): later steps have len(rows) rows."""

