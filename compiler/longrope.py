"""LongRoPE (Phi-3 / Phi-4): one of two rotary factor sets, fixed at export for the engine's length.

transformers picks the set per forward call: the short factors while the sequence (max position
+ 1) is at most `original_max_position_embeddings` (M), the long factors beyond it; the cos/sin
of both sets are also scaled by the same attention factor. An engine has one rotary cache
[max_seq_len, rotary_dim/2], so the set is chosen from the cache length N (--max-seq-len):

- N <= M: "short". No sequence the engine can hold exceeds M, so transformers uses the short
  factors for all of them too: the engine equals transformers for every input.
- N > M: "long". Equal to transformers once a sequence is longer than M tokens from its prompt
  on; a sequence that starts shorter gets long factors where transformers uses short ones (and
  transformers switches sets mid-generation, re-rotating nothing it cached).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trtc.errors import TrtcError, TrtcInternalError
from trtc.spec import ModelSpec

FACTOR_SETS = ("short", "long")


def check_factors(family: str, rope: dict[str, Any], rotary_dim: int) -> None:
    """Both factor lists present with one factor per rotated frequency (rotary_dim / 2)."""
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, (list, tuple)) or len(v) != rotary_dim // 2:
            raise TrtcError(f"{family}: rope_parameters.{key} must list {rotary_dim // 2} factors (rotary dims / 2) "
                            f"for longrope, found {v!r}; fix config.json")


def choose_factors(spec: ModelSpec, max_seq_len: int) -> ModelSpec:
    """The spec of an engine with a cache of `max_seq_len` tokens: which set, and why."""
    if spec.rope_type != "longrope":
        return spec
    m = spec.original_max_position_embeddings
    if m is None:
        raise TrtcInternalError("longrope spec without original_max_position_embeddings")
    if max_seq_len <= m:
        reason = (f"max_seq_len {max_seq_len} <= original_max_position_embeddings {m}: every sequence the engine "
                  f"holds is in the short-factor regime, as in transformers")
        return dataclasses.replace(spec, rope_factors="short", rope_factors_reason=reason)
    reason = (f"max_seq_len {max_seq_len} > original_max_position_embeddings {m}: long factors at every position; "
              f"equal to transformers for sequences longer than {m} tokens from the prompt on, while transformers "
              f"uses the short factors for shorter ones (build with --max-seq-len {m} for those)")
    return dataclasses.replace(spec, rope_factors="long", rope_factors_reason=reason)


def fix_factors(model: Any, spec: ModelSpec) -> None:
    """Set every LongRoPE rotary module of the torch model to the spec's factor set, and stop
    transformers' per-call switch (its `longrope` update), so the traced cos/sin depend on the
    positions alone (rotary_cache turns them into one cache)."""
    if spec.rope_type != "longrope":
        return
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    mods = [m for m in model.modules() if getattr(m, "rope_type", None) == "longrope" and hasattr(m, "inv_freq")]
    if not mods or spec.rope_factors not in FACTOR_SETS:
        raise TrtcInternalError(f"longrope: {len(mods)} rotary modules, factor set {spec.rope_factors!r}")
    m_len = spec.original_max_position_embeddings
    # transformers computes the long set as the init function at seq_len M + 1, the short one without.
    seq_len = None if spec.rope_factors == "short" else m_len + 1
    for m in mods:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](m.config, m.inv_freq.device, seq_len=seq_len)
        if abs(scaling - m.attention_scaling) > 0:
            raise TrtcInternalError(f"longrope attention scaling {scaling} != module's {m.attention_scaling}")
        m.inv_freq.copy_(inv_freq)     # as transformers' own update does: the buffer keeps its dtype
        m.rope_type = f"longrope-{spec.rope_factors}"   # not "longrope": its forward no longer switches
