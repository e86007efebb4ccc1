"""Mixture-of-experts blocks for export: every expert on every token, weighted by the routing.

transformers' experts forward (Mixtral, Qwen3-MoE: `@use_experts_implementation` classes with
grouped weights gate_up_proj [E, 2I, H] and down_proj [E, H, I]) loops over the experts that
some token chose and indexes the tokens of each: shapes that depend on the data, which an
ahead-of-time graph cannot hold. At trace time each experts module gets this forward instead,
with T tokens, E experts, k chosen per token:

    w    [T, E]    routing weight of expert e for token t, 0 where e is not among its top k
    h    [E, T, 2I] = x [T, H] @ gate_up_proj^T      (one batched GEMM over all experts)
    a    [E, T, I]  = act(gate) * up
    y    [E, T, H]  = a @ down_proj^T                 (one batched GEMM)
    out  [T, H]     = sum_e where(chosen, (y * w) cast to the model dtype, 0)

It equals transformers exactly: per token it adds the same k products, in the model dtype, with
zeros for the others (x + 0 == x), and `where` (not a multiply by 0) keeps an unchosen expert's
inf/NaN out. The router (softmax, top-k, renormalization) is transformers' own, traced as is.
Cost: the expert GEMMs do E/k times the work of the chosen experts (Mixtral 8/2: 4x; Qwen3-MoE
128/8: 16x); bench/bench_moe.py measures it.
"""

from __future__ import annotations

import types
from typing import Any

from trtc.errors import TrtcError, TrtcInternalError
from trtc.spec import ModelSpec

EXPERTS_COMPUTE = "dense"


def _linear(x, w, bias, transposed: bool):
    """x [T, in] with grouped weights w [E, out, in] (or [E, in, out] when transposed) -> [E, T, out]."""
    import torch

    y = torch.matmul(x, w if transposed else w.transpose(1, 2))
    return y if bias is None else y + bias[:, None, :]


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H] (transformers' contract)."""
    import torch

    num_experts = self.down_proj.shape[0]
    # chosen [T, k, E]: one-hot of each pick (top-k indices are distinct, so a sum keeps each weight exact)
    chosen = top_k_index[..., None] == torch.arange(num_experts, device=top_k_index.device)
    weights = (chosen * top_k_weights[..., None]).sum(dim=1).transpose(0, 1)[..., None]   # [E, T, 1]
    picked = chosen.any(dim=1).transpose(0, 1)[..., None]                                  # [E, T, 1]
    bias = getattr(self, "gate_up_proj_bias", None) if self.has_bias else None
    if self.has_gate:
        h = self._apply_gate(_linear(hidden_states, self.gate_up_proj, bias, self.is_transposed))
    else:
        h = self.act_fn(_linear(hidden_states, self.up_proj, bias, self.is_transposed))
    down_bias = getattr(self, "down_proj_bias", None) if self.has_bias else None
    y = _linear(h, self.down_proj, down_bias, self.is_transposed)                         # [E, T, H]
    # As transformers: the product in the promoted dtype (float32 routing weights with Mixtral),
    # then cast to the model dtype before the sum over experts.
    contrib = (y * weights).to(hidden_states.dtype)
    return torch.where(picked, contrib, torch.zeros_like(contrib)).sum(dim=0)


def _experts_modules(model: Any) -> list:
    """transformers' grouped-weight experts modules (the ones `@use_experts_implementation` wraps)."""
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")
            and getattr(m.down_proj, "ndim", 0) == 3]


def use_dense_experts(model: Any, spec: ModelSpec) -> None:
    """Give every experts module of the torch model the dense forward above (before tracing)."""
    mods = _experts_modules(model)
    if not mods:
        raise TrtcInternalError(f"{spec.family}: no grouped-weight experts module found in the torch model")
    for m in mods:
        if getattr(m, "has_post_expert_norm", False):
            raise TrtcError(f"{spec.family}: experts with a norm after each expert (has_post_expert_norm) are not "
                            f"supported by trtc yet")
        if m.down_proj.shape[0] != spec.num_experts:
            raise TrtcInternalError(f"experts module has {m.down_proj.shape[0]} experts, spec {spec.num_experts}")
        m.forward = types.MethodType(dense_experts_forward, m)
