"""Family adapters: per-architecture knowledge, registered by name.

Generic code never compares architecture names; it asks the registry for the adapter of a
config and reads the ModelSpec the adapter produces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from trtc.errors import TrtcError

from trtc.spec import ModelSpec

# Rope types whose cos/sin depend only on the position (not on the sequence length), so the
# rotary pass can precompute a [max_seq_len, head_dim/2] cache. "dynamic" and "longrope" change
# their frequencies with the sequence length and cannot be compiled ahead of time this way
# (a family may fix one at export: `export_rope_types`).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """A config's rope settings in either form: transformers 5's `rope_parameters`, or the older
    top-level `rope_theta` + `rope_scaling` (whose type key is `type` or `rope_type`)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if "rope_type" not in rope:
        rope["rope_type"] = rope.get("type", "default")
    rope.pop("type", None)
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope["rope_theta"] = cfg.rope_theta
    return rope


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    architectures: tuple[str, ...]      # HF `architectures` entries
    model_types: tuple[str, ...]        # HF `model_type` values
    gguf_architectures: tuple[str, ...]  # GGUF `general.architecture` values
    qkv_bias: Callable[[Any], bool]
    qk_norm: bool
    sliding_window: Callable[[Any], int | None]
    norm_eps: Callable[[Any], float] = lambda c: float(c.rms_norm_eps)
    # The family's own ModelSpec fields (per-layer attention, soft-capping, rotary variants) and
    # its refusals (TrtcError naming the feature and the config field), after the common fields.
    refine: Callable[[Any, ModelSpec], ModelSpec] = lambda c, spec: spec
    # Rope types beyond STATIC_ROPE_TYPES this family compiles by fixing at export what the
    # sequence length would change (LongRoPE: one factor set, chosen by `for_export`).
    export_rope_types: tuple[str, ...] = ()
    # Export: the spec of an engine whose cache holds `max_seq_len` tokens, and the change to the
    # torch module (loaded for tracing) that makes the traced graph compute exactly that spec.
    for_export: Callable[[ModelSpec, int], ModelSpec] = lambda spec, max_seq_len: spec
    prepare_trace: Callable[[Any, ModelSpec], None] = lambda model, spec: None

    def spec_from_config(self, cfg: Any) -> ModelSpec:
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        rope = rope_parameters(cfg)
        rope_type = rope["rope_type"]
        if rope_type not in STATIC_ROPE_TYPES + self.export_rope_types:
            raise TrtcError(
                f"rope type {rope_type!r} of this {self.name} model changes with the sequence "
                f"length and cannot be compiled ahead of time; supported rope types: "
                f"{', '.join(STATIC_ROPE_TYPES + self.export_rope_types)}"
            )
        eos = cfg.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
        archs = list(getattr(cfg, "architectures", None) or [self.architectures[0]])
        return self.refine(cfg, ModelSpec(
            family=self.name,
            architecture=archs[0],
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size),
            num_layers=int(cfg.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            max_position_embeddings=int(cfg.max_position_embeddings),
            rope_type=rope_type,
            rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
            rms_norm_eps=self.norm_eps(cfg),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias(cfg),
            qk_norm=self.qk_norm,
            sliding_window=self.sliding_window(cfg),
            source_dtype=str(dtype).replace("torch.", ""),
            bos_token_id=cfg.bos_token_id,
            eos_token_ids=eos_ids,
        ))


_REGISTRY: dict[str, FamilyAdapter] = {}


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    _REGISTRY[adapter.name] = adapter
    return adapter


def adapter_named(name: str) -> FamilyAdapter:
    """The registered adapter called `name` (a child process gets adapters by name: they hold functions)."""
    return _REGISTRY[name]


def supported_architectures() -> list[str]:
    return sorted(a for ad in _REGISTRY.values() for a in ad.architectures)


def adapter_for_config(cfg: Any) -> FamilyAdapter:
    archs = list(getattr(cfg, "architectures", None) or [])
    model_type = getattr(cfg, "model_type", None)
    for ad in _REGISTRY.values():
        if any(a in ad.architectures for a in archs) or (not archs and model_type in ad.model_types):
            return ad
    name = archs[0] if archs else model_type
    raise TrtcError(
        f"architecture {name!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


def adapter_for_gguf(arch: str) -> FamilyAdapter:
    for ad in _REGISTRY.values():
        if arch in ad.gguf_architectures:
            return ad
    raise TrtcError(
        f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
        f"{', '.join(sorted(a for ad in _REGISTRY.values() for a in ad.gguf_architectures))}"
    )


def _layer_types(cfg: Any, spec: ModelSpec) -> ModelSpec:
    """HF's per-layer kinds, kept when some layers slide and some do not (else every layer is alike)."""
    kinds = tuple(getattr(cfg, "layer_types", None) or ())
    if not spec.sliding_window or not kinds or len(set(kinds)) == 1:
        return dataclasses.replace(spec, layer_types=(), sliding_window=spec.sliding_window
                                   if not kinds or kinds[0] == "sliding_attention" else None)
    return dataclasses.replace(spec, layer_types=kinds)


def _window_if_enabled(cfg: Any) -> int | None:
    # Qwen2/Qwen3 carry a sliding_window value but only use it when use_sliding_window is set.
    return int(cfg.sliding_window) if getattr(cfg, "use_sliding_window", False) and cfg.sliding_window else None


register(FamilyAdapter(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    gguf_architectures=("llama",),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=False,
    sliding_window=lambda c: None,
))
register(FamilyAdapter(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    gguf_architectures=("mistral",),
    qkv_bias=lambda c: False,
    qk_norm=False,
    sliding_window=lambda c: int(c.sliding_window) if getattr(c, "sliding_window", None) else None,
))
register(FamilyAdapter(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    gguf_architectures=("qwen2",),
    qkv_bias=lambda c: True,
    qk_norm=False,
    sliding_window=_window_if_enabled,
    refine=_layer_types,   # layers below max_window_layers attend fully
))
register(FamilyAdapter(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    gguf_architectures=("qwen3",),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=True,
    sliding_window=_window_if_enabled,
    refine=_layer_types,   # layers below max_window_layers attend fully
))


# ---- per-layer attention, soft-capping, rotary variants (Gemma 2/3, OLMo 2, Granite, GPT-NeoX, SmolLM3) ----

F_ATT, S_ATT = "full_attention", "sliding_attention"     # HF's layer kinds (trtc.spec.LAYER_TYPES)


def _refuse_bidirectional(cfg: Any, family: str) -> None:
    if getattr(cfg, "use_bidirectional_attention", False):
        raise TrtcError(f"{family}: use_bidirectional_attention=True (attention without a causal mask) is not "
                        f"supported by trtc, which compiles causal decoders; set it to false in config.json")


def _softcaps(cfg: Any, spec: ModelSpec) -> ModelSpec:
    def cap(name: str) -> float | None:
        v = getattr(cfg, name, None)
        return float(v) if v else None

    return dataclasses.replace(spec, attn_logit_softcapping=cap("attn_logit_softcapping"),
                               final_logit_softcapping=cap("final_logit_softcapping"))


def _gemma2(cfg: Any, spec: ModelSpec) -> ModelSpec:
    _refuse_bidirectional(cfg, "gemma2")
    return _softcaps(cfg, _layer_types(cfg, spec))


def _gemma3(cfg: Any, spec: ModelSpec) -> ModelSpec:
    """Two rope bases: `rope_parameters` per layer kind ({"full_attention": {...}, "sliding_attention": {...}})."""
    _refuse_bidirectional(cfg, "gemma3")
    nested = dict(getattr(cfg, "rope_parameters", None) or {})
    if F_ATT in nested or S_ATT in nested:
        full, local = dict(nested.get(F_ATT) or {}), dict(nested.get(S_ATT) or {})
    else:   # the older form: rope_theta + rope_scaling for the global layers, rope_local_base_freq
        full = rope_parameters(cfg)
        local = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_local_base_freq", 10000.0)}
    for kind, r in ((F_ATT, full), (S_ATT, local)):
        rope_type = r.get("rope_type", r.get("type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            raise TrtcError(f"gemma3: rope_parameters.{kind}.rope_type {rope_type!r} changes with the sequence length "
                            f"and cannot be compiled ahead of time; supported: {', '.join(STATIC_ROPE_TYPES)}")
    spec = dataclasses.replace(
        spec, rope_type=full.get("rope_type", full.get("type", "default")),
        rope_theta=float(full.get("rope_theta", spec.rope_theta)),
        rope_local_theta=float(local["rope_theta"]) if "rope_theta" in local else None)
    return _softcaps(cfg, _layer_types(cfg, spec))


def _gpt_neox(cfg: Any, spec: ModelSpec) -> ModelSpec:
    rope = rope_parameters(cfg)
    rotary = int(spec.head_dim * float(rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0))))
    if rotary % 2:
        raise TrtcError(f"gpt_neox: rotary dims per head head_dim * partial_rotary_factor = {rotary} is odd; "
                        f"rotate-half rotary needs an even count")
    return dataclasses.replace(spec, rotary_dim=rotary if rotary < spec.head_dim else None)


def _smollm3(cfg: Any, spec: ModelSpec) -> ModelSpec:
    # no_rope_layers[i] is 1 where layer i applies rotary embedding, 0 where it does not (NoPE).
    flags = list(getattr(cfg, "no_rope_layers", None) or [1] * spec.num_layers)
    return _layer_types(cfg, dataclasses.replace(spec, nope_layers=tuple(i for i, f in enumerate(flags) if not f)))


register(FamilyAdapter(
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    model_types=("gemma2",),
    gguf_architectures=("gemma2",),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=False,
    sliding_window=lambda c: int(c.sliding_window) if getattr(c, "sliding_window", None) else None,
    refine=_gemma2,
))
register(FamilyAdapter(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    gguf_architectures=("gemma3",),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=True,
    sliding_window=lambda c: int(c.sliding_window) if getattr(c, "sliding_window", None) else None,
    refine=_gemma3,
))
register(FamilyAdapter(
    name="olmo2",
    architectures=("Olmo2ForCausalLM",),
    model_types=("olmo2",),
    gguf_architectures=(),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=True,
    sliding_window=lambda c: None,
))
register(FamilyAdapter(
    name="granite",
    architectures=("GraniteForCausalLM",),
    model_types=("granite",),
    gguf_architectures=(),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=False,
    sliding_window=lambda c: None,
))
register(FamilyAdapter(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    model_types=("gpt_neox",),
    gguf_architectures=(),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", True)),
    qk_norm=False,
    sliding_window=lambda c: None,
    norm_eps=lambda c: float(c.layer_norm_eps),
    refine=_gpt_neox,
))
register(FamilyAdapter(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    model_types=("smollm3",),
    gguf_architectures=(),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=False,
    sliding_window=_window_if_enabled,
    refine=_smollm3,
))


# ---- fused projections + LongRoPE (Phi-3/Phi-4), mixture of experts (Mixtral, Qwen3-MoE) ----

def _phi3(cfg: Any, spec: ModelSpec) -> ModelSpec:
    """Fused qkv_proj / gate_up_proj trace as one MatMul + slices (nothing to declare); partial
    rotary (Phi-4-mini: partial_rotary_factor 0.75) and LongRoPE's two factor sets are."""
    from . import longrope

    rope = rope_parameters(cfg)
    rotary = int(spec.head_dim * float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))))
    spec = dataclasses.replace(spec, rotary_dim=rotary if rotary < spec.head_dim else None, fused_projections=True)
    if spec.rope_type != "longrope":
        return spec
    longrope.check_factors("phi3", rope, rotary)
    # What transformers' rotary module reads: rope_parameters' value, which Phi3Config overwrites
    # with its top-level original_max_position_embeddings (Phi-3 configs keep it there).
    orig = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
    return dataclasses.replace(spec, original_max_position_embeddings=int(orig or spec.max_position_embeddings))


def _moe(num_experts: str, intermediate: str, norm_topk: Callable[[Any], bool]):
    """refine for a grouped-weight experts family: the config fields naming its expert count and size."""
    from .moe import EXPERTS_COMPUTE

    def refine(cfg: Any, spec: ModelSpec) -> ModelSpec:
        k, e = int(cfg.num_experts_per_tok), int(getattr(cfg, num_experts))
        if not 0 < k <= e:
            raise TrtcError(f"{spec.family}: num_experts_per_tok {k} must be in 1..{num_experts} ({e}); fix config.json")
        return dataclasses.replace(spec, num_experts=e, experts_per_token=k, norm_topk_prob=norm_topk(cfg),
                                   moe_intermediate_size=int(getattr(cfg, intermediate)),
                                   experts_compute=EXPERTS_COMPUTE)
    return refine


def _use_dense_experts(model: Any, spec: ModelSpec) -> None:
    from .moe import use_dense_experts

    use_dense_experts(model, spec)


def _longrope_for_export(spec: ModelSpec, max_seq_len: int) -> ModelSpec:
    from .longrope import choose_factors

    return choose_factors(spec, max_seq_len)


def _longrope_prepare(model: Any, spec: ModelSpec) -> None:
    from .longrope import fix_factors

    fix_factors(model, spec)


register(FamilyAdapter(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    model_types=("phi3",),
    gguf_architectures=(),
    qkv_bias=lambda c: False,
    qk_norm=False,
    sliding_window=lambda c: int(c.sliding_window) if getattr(c, "sliding_window", None) else None,
    refine=_phi3,
    export_rope_types=("longrope",),
    for_export=_longrope_for_export,
    prepare_trace=_longrope_prepare,
))
register(FamilyAdapter(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    gguf_architectures=(),
    qkv_bias=lambda c: False,
    qk_norm=False,
    sliding_window=lambda c: int(c.sliding_window) if getattr(c, "sliding_window", None) else None,
    refine=_moe("num_local_experts", "intermediate_size", lambda c: True),   # Mixtral always renormalizes
    prepare_trace=_use_dense_experts,
))
register(FamilyAdapter(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    gguf_architectures=(),
    qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    qk_norm=True,
    sliding_window=_window_if_enabled,
    refine=_moe("num_experts", "moe_intermediate_size", lambda c: bool(c.norm_topk_prob)),
    prepare_trace=_use_dense_experts,
))
