"""trtc's attention plugins, each declared once.

Every consumer reads these declarations: the torch reference (plugins/reference.py), the Triton
launchers (plugins/kernels.py), the TensorRT registration (plugins/tensorrt_plugin.py), the tests,
the ONNX insertion pass (compiler/passes/plugin_attention.py), the graph check and the reference
backend's custom ops (runtime/ort_plugin_session.py). Shapes are tuples of dimension names; a name that is also an
attribute (num_q_heads, head_size, ...) is bound to that attribute's value, every other name is
bound by the first tensor that carries it and must agree everywhere else. `check_call` derives all
shape/dtype checks from the declaration.

Layout decisions (why):
- Query/key/value tokens are PACKED: q [T, Hq, D] with `cu_seqlens_q` [B+1] (the varlen layout of
  FlashAttention/TensorRT-LLM/vLLM). Sequences of different lengths share one batch with no padding,
  the generation phase is simply T == B, and a mixed batch (prefill and decode together) needs no
  other code path. [B, S, H, D] would waste compute and bandwidth on padding in the context phase.
- The KV block pool is [num_blocks, 2, Hkv, block_size, D]: one block holds K and V of
  `block_size` consecutive tokens of one sequence for all KV heads. For one (block, K|V, head) the
  block_size x D elements are contiguous (4 KiB at fp16, bs 16, D 128), so a kernel streams whole
  pages with wide coalesced loads.
- Rotary embedding is applied by RopeKvAppend, not by PagedAttention: keys are rotated exactly once
  (when they are written), before the FP8 quantization, so the per-tensor K scale describes the
  keys that are actually stored and attention never re-rotates the whole context at each step.
  The rotated queries come out of the same kernel, which reads q/k/v once.
- The tokens' positions are not an input: in the packed layout token i of sequence b sits at
  position seq_lens[b] - q_len[b] + i (q_len[b] = cu_seqlens_q[b+1] - cu_seqlens_q[b]).
- AOT TensorRT plugins launch exactly one kernel each, with int32 scalar arguments only: hence two
  plugins (append, attention) and scales passed as device tensors, not float attributes.

FP8 KV (kv_cache_dtype "fp8_e4m3"): the pool holds float8_e4m3fn; `kv_scales` [2] float32 holds the
per-tensor DEQUANTIZATION scales (k_scale, v_scale): stored = saturate_e4m3(x / scale),
read = stored * scale (the convention of vLLM/TensorRT-LLM/ONNX DequantizeLinear).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..artifact import DEFAULT_KV_BLOCK_SIZE, KV_BLOCK_SIZES
from ..errors import TrtcError

NAMESPACE = "trtc"

# dtype names are torch's (str(torch.float16) without the "torch." prefix).
ACT_DTYPES = ("float16", "bfloat16")
POOL_DTYPES = ("float16", "bfloat16", "float8_e4m3fn")
HEAD_SIZES = (64, 128)
BLOCK_SIZES = KV_BLOCK_SIZES   # the block sizes of the contract's paged KV cache (trtc/artifact.py)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # "auto": the pool has the activations' dtype
# The SEMANTICS above are defined for any even head size and float32 too; only the kernels are
# limited to ACT_DTYPES/HEAD_SIZES. `reference=True` in attr_values/check_call checks the
# semantics alone: what the torch reference (and the CPU reference backend running plugin-form
# graphs of tiny fp32 test models) accepts. The default checks what the kernels support.
REFERENCE_EXTRA_DTYPES = ("float32",)


class SchemaError(TrtcError, ValueError):
    """A tensor or attribute does not match a plugin declaration (the caller can fix it)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtypes: tuple[str, ...]  # allowed dtypes
    shape: tuple[str | int, ...]  # dimension names or literals; "B+1" is allowed
    doc: str
    same_dtype_as: str | None = None  # another tensor of the same plugin
    aliases_input: str | None = None  # output only: written in place into this input


@dataclasses.dataclass(frozen=True)
class AttrSpec:
    name: str
    type: type
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[AttrSpec, ...]
    doc: str
    namespace: str = NAMESPACE

    @property
    def plugin_id(self) -> str:  # "namespace::name", as tensorrt.plugin wants it
        return f"{self.namespace}::{self.name}"

    def input(self, name: str) -> TensorSpec:
        return {t.name: t for t in self.inputs}[name]

    def attr_values(self, reference: bool = False, **given: Any) -> dict[str, Any]:
        """Defaults filled in, unknown names and wrong types/choices rejected. `reference=True`:
        head_size may be any even number (the kernels' HEAD_SIZES are not enforced)."""
        known = {a.name: a for a in self.attrs}
        unknown = set(given) - set(known)
        if unknown:
            raise SchemaError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; known: {sorted(known)}")
        out = {}
        for a in self.attrs:
            v = given.get(a.name, a.default)
            if v is None:
                raise SchemaError(f"{self.name}: attribute {a.name!r} is required ({a.doc})")
            if a.type is float and isinstance(v, int):
                v = float(v)
            if not isinstance(v, a.type) or (a.type is int and isinstance(v, bool)):
                raise SchemaError(f"{self.name}: attribute {a.name}={v!r} must be {a.type.__name__}")
            if reference and a.name == "head_size":
                if v < 2 or v % 2:
                    raise SchemaError(f"{self.name}: attribute head_size={v} must be even and positive")
            elif a.choices is not None and v not in a.choices:
                raise SchemaError(f"{self.name}: attribute {a.name}={v!r} not in {a.choices}")
            out[a.name] = v
        return out


def _pool_dtype_ok(attrs: Mapping[str, Any], pool_dtype: str, act_dtype: str) -> None:
    want = "float8_e4m3fn" if attrs["kv_cache_dtype"] == "fp8_e4m3" else act_dtype
    if pool_dtype != want:
        raise SchemaError(
            f"kv_pool dtype {pool_dtype} does not match kv_cache_dtype={attrs['kv_cache_dtype']!r} "
            f"with {act_dtype} activations (expected {want})")


_COMMON_ATTRS = (
    AttrSpec("num_q_heads", int, None, "query heads Hq"),
    AttrSpec("num_kv_heads", int, None, "key/value heads Hkv; Hq % Hkv == 0 (GQA, MQA when 1)"),
    AttrSpec("head_size", int, None, "D", HEAD_SIZES),
    AttrSpec("block_size", int, DEFAULT_KV_BLOCK_SIZE, "tokens per KV block", BLOCK_SIZES),
    AttrSpec("kv_cache_dtype", str, "auto", "pool element type: 'auto' (= activations) or 'fp8_e4m3'",
             KV_CACHE_DTYPES),
)

_POOL = TensorSpec("kv_pool", POOL_DTYPES, ("num_blocks", 2, "num_kv_heads", "block_size", "head_size"),
                   "block pool; [:, 0] keys (rotated), [:, 1] values")
_BLOCK_TABLES = TensorSpec("block_tables", ("int32",), ("B", "max_blocks"),
                           "block ids of each sequence in order; entries past a sequence's last block are unused")
_CU_SEQLENS = TensorSpec("cu_seqlens_q", ("int32",), ("B+1",),
                         "prefix sums of new-token counts: sequence b owns tokens cu[b]:cu[b+1]")
_SEQ_LENS = TensorSpec("seq_lens", ("int32",), ("B",),
                       "tokens in the cache per sequence AFTER this step's append (context + new)")
_KV_SCALES = TensorSpec("kv_scales", ("float32",), (2,),
                        "(k_scale, v_scale) dequantization scales; read only for fp8_e4m3, pass ones otherwise")

ROPE_KV_APPEND = PluginSpec(
    name="RopeKvAppend",
    version="1",
    doc="Rotate q and k (rotate-half/NeoX rotary, full head), write rotated k and v of the new tokens "
        "into their blocks (quantized for fp8_e4m3), return the rotated q.",
    inputs=(
        TensorSpec("q", ACT_DTYPES, ("T", "num_q_heads", "head_size"), "new tokens' queries"),
        TensorSpec("k", ACT_DTYPES, ("T", "num_kv_heads", "head_size"), "new tokens' keys", same_dtype_as="q"),
        TensorSpec("v", ACT_DTYPES, ("T", "num_kv_heads", "head_size"), "new tokens' values", same_dtype_as="q"),
        TensorSpec("rope_cos", ("float32",), ("max_positions", "half_head"), "cos table, [pos, i] = cos(pos * inv_freq[i])"),
        TensorSpec("rope_sin", ("float32",), ("max_positions", "half_head"), "sin table"),
        _BLOCK_TABLES, _CU_SEQLENS, _SEQ_LENS, _KV_SCALES, _POOL,
    ),
    outputs=(
        TensorSpec("q_rot", ACT_DTYPES, ("T", "num_q_heads", "head_size"), "rotated queries", same_dtype_as="q"),
        TensorSpec("kv_pool_out", POOL_DTYPES, ("num_blocks", 2, "num_kv_heads", "block_size", "head_size"),
                   "the pool, updated in place", same_dtype_as="kv_pool", aliases_input="kv_pool"),
    ),
    attrs=_COMMON_ATTRS,
)

PAGED_ATTENTION = PluginSpec(
    name="PagedAttention",
    version="1",
    doc="Causal attention of the new tokens over their sequence's cached tokens (which include the new "
        "ones: run RopeKvAppend first). Query i of sequence b (position p = seq_lens[b] - q_len + i) "
        "attends to cached positions 0..p. Works for the context phase (many tokens per sequence, "
        "varlen), the generation phase (one each) and mixes.",
    inputs=(
        TensorSpec("q", ACT_DTYPES, ("T", "num_q_heads", "head_size"), "rotated queries"),
        _POOL, _BLOCK_TABLES, _CU_SEQLENS, _SEQ_LENS, _KV_SCALES,
    ),
    outputs=(
        TensorSpec("out", ACT_DTYPES, ("T", "num_q_heads", "head_size"), "attention output", same_dtype_as="q"),
    ),
    attrs=_COMMON_ATTRS + (
        AttrSpec("softmax_scale", float, 0.0, "0.0 means 1/sqrt(head_size)"),
    ),
)

PLUGINS = {p.name: p for p in (ROPE_KV_APPEND, PAGED_ATTENTION)}


def _dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_call(spec: PluginSpec, tensors: Mapping[str, Any], attrs: Mapping[str, Any],
               outputs: bool = False, reference: bool = False) -> dict[str, int]:
    """Check tensors (anything with .shape and .dtype: torch tensors; numpy arrays with a torch-like
    dtype name) against `spec`; return the bound dimensions. `outputs=True` also checks outputs
    that are present in `tensors`. `reference=True` checks the semantics only (float32 activations
    and pools, any even head size: see REFERENCE_EXTRA_DTYPES)."""
    attrs = spec.attr_values(reference=reference, **attrs)
    dims: dict[str, int] = {k: v for k, v in attrs.items() if isinstance(v, int) and not isinstance(v, bool)}
    hq, hkv, d = attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_size"]
    if hkv < 1 or hq % hkv:
        raise SchemaError(f"{spec.name}: num_q_heads={hq} must be a multiple of num_kv_heads={hkv}")
    dims["half_head"] = d // 2
    specs = list(spec.inputs) + (list(spec.outputs) if outputs else [])
    for ts in specs:
        if ts.name not in tensors:
            if ts.aliases_input or (outputs and ts in spec.outputs):
                continue
            raise SchemaError(f"{spec.name}: missing input {ts.name!r}")
        t = tensors[ts.name]
        dt = _dtype_name(t)
        allowed = ts.dtypes + (REFERENCE_EXTRA_DTYPES if reference and ts.dtypes in (ACT_DTYPES, POOL_DTYPES) else ())
        if dt not in allowed:
            raise SchemaError(f"{spec.name}: {ts.name} has dtype {dt}, allowed {allowed}")
        if ts.same_dtype_as and ts.same_dtype_as in tensors and dt != _dtype_name(tensors[ts.same_dtype_as]):
            raise SchemaError(f"{spec.name}: {ts.name} dtype {dt} differs from {ts.same_dtype_as}")
        shape = tuple(int(s) for s in t.shape)
        if len(shape) != len(ts.shape):
            raise SchemaError(f"{spec.name}: {ts.name} has shape {shape}, expected {ts.shape}")
        for axis, (want, got) in enumerate(zip(ts.shape, shape)):
            if isinstance(want, int):
                val, name = want, str(want)
            elif want.endswith("+1"):
                name = want[:-2]
                val = dims.setdefault(name, got - 1) + 1
            else:
                name = want
                val = dims.setdefault(name, got)
            if val != got:
                raise SchemaError(f"{spec.name}: {ts.name} axis {axis} ({want}) is {got}, expected {val} "
                                  f"(bound from the attributes or an earlier tensor)")
    if "kv_pool" in tensors:
        _pool_dtype_ok(attrs, _dtype_name(tensors["kv_pool"]), _dtype_name(tensors["q"]))
    for name in ("block_tables", "cu_seqlens_q", "seq_lens"):
        t = tensors.get(name)
        if t is not None and hasattr(t, "is_contiguous") and not t.is_contiguous():
            raise SchemaError(f"{spec.name}: {name} must be contiguous")
    return dims
