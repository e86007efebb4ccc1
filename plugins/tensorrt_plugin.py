"""Full-TensorRT registration of the attention plugins: `tensorrt.plugin` (quickly deployable
plugins) with ahead-of-time Triton kernels, so a built engine carries the PTX and needs no Python
at run time.

Not runnable on trtc's machines: full TensorRT cannot be installed there (docs/platform.md), and
TensorRT-RTX has no plugin layer. What IS checked: `compile_aot` (Triton -> PTX, launch geometry,
calling convention) on a GPU machine with Triton (bench/ and tests/plugins), and that the functions
below follow plugins/schema.py (tests/plugins/test_tensorrt_plugin.py, by reading this file).
`register()` itself is written against the documented API (TensorRT >= 10.8:
trtp.register / trtp.autotune / trtp.aot_impl, KernelLaunchParams, SymIntExprs) and is unverified.

Calling convention of an AOT plugin kernel: input pointers (plugin input order), then the int32
scalars returned as SymIntExprs, then output pointers; the kernels in kernels.py are written that
way. An aliased output (the KV pool) is passed twice (input and output slot: same address).
Triton >= 3.3 appends two pointer parameters of its own (global and profile scratch); our kernels
allocate no scratch (compile_aot checks metadata.global_scratch_size == 0), so those parameters are
never dereferenced.

Targets: an AOT plugin carries ONE PTX, so `register(targets)` takes the build's compute
capabilities and accepts exactly one. Several are refused rather than compiled for the lowest:
Triton emits arch-specific PTX for sm_90 and newer (`.target sm_90a`, `sm_100a`), which the driver
cannot JIT to another architecture, and PTX for an older target (sm_80) would run a newer GPU
without its own tensor-core instructions. Build one engine per target instead (full TensorRT builds
for the GPU it runs on anyway).

One AOT plugin = one kernel launch. Hence the generation phase inside TensorRT uses the varlen
kernel with a small tile (tactic DECODE) instead of split-K + combine (two launches); the split-K
path is what the Triton launcher (kernels.paged_attention) uses.
"""
import dataclasses
import math
from typing import Any, Sequence

from ..errors import TrtcError, TrtcInternalError
from ..flavour import sm_number
from .schema import PAGED_ATTENTION, ROPE_KV_APPEND, PluginSpec

UNAVAILABLE = ("full TensorRT (`tensorrt`) is not installable on trtc's machines (its -libs wheels download "
               "from NVIDIA's index, unreachable here; see docs/platform.md); TensorRT-RTX has no plugin layer")

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8e4nv", "float32": "fp32",
                 "int32": "i32"}

# tactics of PagedAttention (one varlen kernel, two tile shapes)
TACTIC_CONTEXT = 1
TACTIC_DECODE = 2


@dataclasses.dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int  # bytes of dynamic shared memory
    block_q: int  # PagedAttention: tokens per program along grid x (0 for RopeKvAppend)
    num_params: int  # .param entries of the PTX entry (ours + Triton's scratch pointers)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def aot_arch(targets: Sequence[str]) -> int:
    """The compute capability (90 for "sm_90") the plugin kernels are compiled for: the build's
    one target (module docstring: why several are refused)."""
    archs = set()
    for t in targets:
        try:
            archs.add(sm_number(t))
        except ValueError:
            raise TrtcError(f"target {t!r} is not a compute capability; write e.g. sm_90") from None
    if len(archs) != 1:
        raise TrtcError(f"plugin-form engines are built for exactly one target, got {len(archs)} "
                        f"({', '.join(targets) or 'none'}): each attention plugin carries one PTX; "
                        f"build once per target, e.g. --target {'sm_%d' % max(archs) if archs else 'sm_90'}")
    return archs.pop()


def compile_aot(spec: PluginSpec, act_dtype: str, pool_dtype: str, attrs: dict[str, Any], *, arch: int,
                tactic: int = TACTIC_CONTEXT) -> AotKernel:
    """Compile the plugin's Triton kernel to PTX for compute capability `arch` (90 = sm_90; Triton
    writes `.target sm_90a` for 90 and newer). act_dtype/pool_dtype are schema dtype names
    ("float16", "float8_e4m3fn", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import kernels

    a = spec.attr_values(**attrs)
    act, pool = _TRITON_TYPES[act_dtype], _TRITON_TYPES[pool_dtype]
    hq, hkv, d, bs = a["num_q_heads"], a["num_kv_heads"], a["head_size"], a["block_size"]
    fp8 = pool_dtype == "float8_e4m3fn"
    if spec is ROPE_KV_APPEND:
        fn = kernels.rope_kv_append_kernel
        sig = {"q_ptr": f"*{act}", "k_ptr": f"*{act}", "v_ptr": f"*{act}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
               "bt_ptr": "*i32", "cu_ptr": "*i32", "seq_lens_ptr": "*i32", "scales_ptr": "*fp32",
               "pool_in_ptr": f"*{pool}", "B": "i32", "max_blocks": "i32", "q_rot_ptr": f"*{act}",
               "pool_ptr": f"*{pool}"}
        const = dict(HQ=hq, HKV=hkv, D=d, BS=bs, HQ_P=_pow2(hq), HKV_P=_pow2(hkv), FP8=fp8, SEARCH=kernels.SEARCH)
        num_warps, num_stages, block_q = 4, 1, 0
    elif spec is PAGED_ATTENTION:
        fn = kernels.paged_attention_kernel
        sig = {"q_ptr": f"*{act}", "pool_ptr": f"*{pool}", "bt_ptr": "*i32", "cu_ptr": "*i32",
               "seq_lens_ptr": "*i32", "scales_ptr": "*fp32", "B": "i32", "max_blocks": "i32",
               "out_ptr": f"*{act}"}
        group = hq // hkv
        if tactic == TACTIC_CONTEXT:
            cfg = kernels.context_config(d, group)
        else:  # one token per sequence: a tile of only the group's heads
            cfg = kernels.ContextConfig(block_m=max(16, _pow2(group)), block_n=64, num_warps=4, num_stages=3)
        const = dict(HQ=hq, HKV=hkv, D=d, BS=bs, SM_SCALE=a["softmax_scale"] or 1.0 / math.sqrt(d), FP8=fp8,
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SEARCH=kernels.SEARCH)
        num_warps, num_stages, block_q = cfg.num_warps, cfg.num_stages, cfg.block_m // group
    else:
        raise TrtcInternalError(f"no AOT kernel for {spec.name}")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages))
    if getattr(ck.metadata, "global_scratch_size", 0):
        raise TrtcInternalError(f"{spec.name}: kernel needs Triton global scratch, which AOT plugins do not provide")
    ptx = ck.asm["ptx"]
    entry = ptx[ptx.index(".entry"):]
    num_params = entry[:entry.index(")")].count(".param")
    return AotKernel(ck.metadata.name, ptx, ck.metadata.num_warps, ck.metadata.shared, block_q, num_params)


@dataclasses.dataclass
class _Registration:
    """tensorrt.plugin's registry is global to the process: the plugins are registered once, and the
    aot_impl functions compile for the target of the build in progress (set by each register())."""
    arch: int | None = None
    plugins: dict[str, Any] | None = None


_REGISTRATION = _Registration()


def register(targets: Sequence[str]) -> dict[str, Any]:
    """Register trtc::RopeKvAppend and trtc::PagedAttention with TensorRT's plugin registry, their
    kernels compiled for `targets` (the build's compute capabilities, e.g. ("sm_90",); exactly one).
    Call before building each network that holds the plugin nodes (ONNX nodes: op = plugin name,
    attribute plugin_namespace = "trtc", aot = True); registers once per process."""
    _REGISTRATION.arch = aot_arch(targets)
    if _REGISTRATION.plugins is None:
        _REGISTRATION.plugins = _register_with_tensorrt()
    return _REGISTRATION.plugins


def _build_arch() -> int:
    if _REGISTRATION.arch is None:
        raise TrtcInternalError("an aot_impl ran before register(targets) set the build's target")
    return _REGISTRATION.arch


def _register_with_tensorrt() -> dict[str, Any]:
    """The registration itself. No `from __future__ import annotations` in this module: tensorrt.plugin
    reads the registered functions' annotations (trtp.TensorDesc, int, str) at run time."""
    try:
        import tensorrt as trt
        # tensorrt-stubs describe `tensorrt` but not its pure-Python `tensorrt.plugin` package (its
        # functions are Any). unused-ignore: where mypy sees no stubs at all, nothing is reported.
        import tensorrt.plugin as trtp  # type: ignore[import-untyped, unused-ignore]
    except ImportError as e:
        raise TrtcError(f"trtc's attention plugins need full TensorRT (pip install 'trtc[tensorrt]' where "
                        f"NVIDIA's index is reachable); here: {UNAVAILABLE}") from e
    from typing import List, Tuple

    dtype_names = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.fp8: "float8_e4m3fn"}

    def dtype_name(dt: trt.DataType) -> str:
        return dtype_names[dt]

    def launch(kernel: AotKernel, grid_x: Any, grid_y: Any, extra: list[Any]) -> tuple[bytes, bytes, Any, Any]:
        """aot_impl's result: kernel name, PTX, launch parameters, extra int32 arguments (grid sizes
        and extras are ints or trtp shape expressions)."""
        p = trtp.KernelLaunchParams()
        p.grid_x, p.grid_y = grid_x, grid_y
        p.block_x = kernel.num_warps * 32
        p.shared_mem = kernel.shared
        return kernel.name.encode(), kernel.ptx.encode(), p, trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(e) for e in extra])

    # --- RopeKvAppend -------------------------------------------------------------------------
    @trtp.register(ROPE_KV_APPEND.plugin_id)
    def rope_kv_append_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, rope_cos: trtp.TensorDesc,
                            rope_sin: trtp.TensorDesc, block_tables: trtp.TensorDesc, cu_seqlens_q: trtp.TensorDesc,
                            seq_lens: trtp.TensorDesc, kv_scales: trtp.TensorDesc, kv_pool: trtp.TensorDesc,
                            num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                            kv_cache_dtype: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return q.like(), kv_pool.aliased()

    @trtp.autotune(ROPE_KV_APPEND.plugin_id)
    def rope_kv_append_autotune(q, k, v, rope_cos, rope_sin, block_tables, cu_seqlens_q, seq_lens, kv_scales,
                                kv_pool, outputs) -> List[trtp.AutoTuneCombination]:
        # positions: q k v cos sin bt cu seq_lens scales pool | q_rot pool_out
        same = "FP16|BF16, FP16|BF16, FP16|BF16, FP32, FP32, INT32, INT32, INT32, FP32, FP16|BF16, FP16|BF16, FP16|BF16"
        fp8 = "FP16|BF16, FP16|BF16, FP16|BF16, FP32, FP32, INT32, INT32, INT32, FP32, FP8, FP16|BF16, FP8"
        return [trtp.AutoTuneCombination(same, "LINEAR"), trtp.AutoTuneCombination(fp8, "LINEAR")]

    @trtp.aot_impl(ROPE_KV_APPEND.plugin_id)
    def rope_kv_append_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, rope_cos: trtp.TensorDesc,
                           rope_sin: trtp.TensorDesc, block_tables: trtp.TensorDesc, cu_seqlens_q: trtp.TensorDesc,
                           seq_lens: trtp.TensorDesc, kv_scales: trtp.TensorDesc, kv_pool: trtp.TensorDesc,
                           num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                           kv_cache_dtype: str, outputs: Tuple[trtp.TensorDesc], tactic: int):
        a = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                 block_size=block_size, kv_cache_dtype=kv_cache_dtype)
        ker = compile_aot(ROPE_KV_APPEND, dtype_name(q.dtype), dtype_name(kv_pool.dtype), a, arch=_build_arch())
        return launch(ker, q.shape_expr[0], 1, [seq_lens.shape_expr[0], block_tables.shape_expr[1]])

    # --- PagedAttention -----------------------------------------------------------------------
    @trtp.register(PAGED_ATTENTION.plugin_id)
    def paged_attention_desc(q: trtp.TensorDesc, kv_pool: trtp.TensorDesc, block_tables: trtp.TensorDesc,
                             cu_seqlens_q: trtp.TensorDesc, seq_lens: trtp.TensorDesc, kv_scales: trtp.TensorDesc,
                             num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                             kv_cache_dtype: str, softmax_scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PAGED_ATTENTION.plugin_id)
    def paged_attention_autotune(q, kv_pool, block_tables, cu_seqlens_q, seq_lens, kv_scales,
                                 outputs) -> List[trtp.AutoTuneCombination]:
        combos = []
        for pool in ("FP16|BF16", "FP8"):  # positions: q pool bt cu seq_lens scales | out
            c = trtp.AutoTuneCombination(f"FP16|BF16, {pool}, INT32, INT32, INT32, FP32, FP16|BF16", "LINEAR")
            c.tactics([TACTIC_CONTEXT, TACTIC_DECODE])
            combos.append(c)
        return combos

    @trtp.aot_impl(PAGED_ATTENTION.plugin_id)
    def paged_attention_aot(q: trtp.TensorDesc, kv_pool: trtp.TensorDesc, block_tables: trtp.TensorDesc,
                            cu_seqlens_q: trtp.TensorDesc, seq_lens: trtp.TensorDesc, kv_scales: trtp.TensorDesc,
                            num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                            kv_cache_dtype: str, softmax_scale: float, outputs: Tuple[trtp.TensorDesc],
                            tactic: int):
        a = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                 block_size=block_size, kv_cache_dtype=kv_cache_dtype, softmax_scale=softmax_scale)
        ker = compile_aot(PAGED_ATTENTION, dtype_name(q.dtype), dtype_name(kv_pool.dtype), a, arch=_build_arch(),
                          tactic=tactic)
        B = seq_lens.shape_expr[0]
        grid_x = trtp.cdiv(q.shape_expr[0], ker.block_q) + B  # as kernels.paged_attention
        return launch(ker, grid_x, num_kv_heads, [B, block_tables.shape_expr[1]])

    return {"RopeKvAppend": rope_kv_append_desc, "PagedAttention": paged_attention_desc}
