"""ModelSpec: the one normalized description of a model that every stage reads.

Family adapters (compiler/families.py) turn a Hugging Face config into a ModelSpec; nothing
after loading looks at the Hugging Face config again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    family: str                    # registered family adapter name, e.g. "llama"
    architecture: str              # HF architecture class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int                 # query heads
    num_kv_heads: int              # key/value heads (GQA when < num_heads)
    head_dim: int                  # per head; Qwen3 has head_dim != hidden/heads
    max_position_embeddings: int
    rope_type: str                 # "default", "linear", "llama3", "yarn"
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None     # tokens a query sees (itself included); None = full causal
    source_dtype: str              # dtype recorded in the HF config ("float32", "bfloat16", ...)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
        return cls(**kw)


def fingerprint_of(obj: Any) -> str:
    """sha256 of the canonical JSON form of a dict/dataclass tree (first 16 hex digits)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
