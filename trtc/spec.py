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


LAYER_TYPES = ("full_attention", "sliding_attention")


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
    sliding_window: int | None     # tokens a query of a sliding layer sees (itself included); None = none slides
    source_dtype: str              # dtype recorded in the HF config ("float32", "bfloat16", ...)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Per-layer attention kinds, as HF names them: "sliding_attention" (sees `sliding_window`
    # tokens) or "full_attention". Empty: every layer alike (sliding when sliding_window is set).
    layer_types: tuple[str, ...] = ()
    attn_logit_softcapping: float | None = None    # scores -> c * tanh(scores / c), before the mask
    final_logit_softcapping: float | None = None   # logits -> c * tanh(logits / c)
    rope_local_theta: float | None = None          # rope base of the sliding layers; None: rope_theta
    nope_layers: tuple[int, ...] = ()              # layers without rotary embedding
    rotary_dim: int | None = None                  # leading dims of a head that rotate; None: head_dim
    # LongRoPE (Phi-3/Phi-4): the factor set the rotary cache uses at every position ("short" or
    # "long"), chosen at export from max_seq_len, and why; None: not LongRoPE / not exported yet.
    rope_factors: str | None = None
    rope_factors_reason: str | None = None
    original_max_position_embeddings: int | None = None   # LongRoPE: longest sequence of the short factors
    fused_projections: bool = False                # q/k/v and gate/up are one weight each (qkv_proj, gate_up_proj)
    # Mixture of experts (0 experts: dense MLP): each token's MLP is the routing-weighted sum of
    # its top `experts_per_token` experts (softmax over num_experts router logits).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int | None = None       # per expert; None: intermediate_size
    norm_topk_prob: bool = False                   # top-k weights renormalized to sum to 1
    experts_compute: str | None = None             # how the graph computes experts ("dense"), set at export

    def __post_init__(self) -> None:
        from trtc.errors import TrtcError

        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or set(self.layer_types) - set(LAYER_TYPES)):
            raise TrtcError(f"layer_types {list(self.layer_types)} must name one of {', '.join(LAYER_TYPES)} "
                            f"for each of the {self.num_layers} layers")
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise TrtcError(f"nope_layers {list(self.nope_layers)} must be layer indices below {self.num_layers}")

    def window(self, layer: int) -> int | None:
        """Tokens a query of `layer` attends to (itself included); None: full causal."""
        if not self.sliding_window or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("eos_token_ids", "layer_types", "nope_layers"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("eos_token_ids", "layer_types", "nope_layers"):
            kw[k] = tuple(kw.get(k) or ())
        return cls(**kw)


def fingerprint_of(obj: Any) -> str:
    """sha256 of the canonical JSON form of a dict/dataclass tree (first 16 hex digits)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
