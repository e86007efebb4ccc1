"""The full-TensorRT registration. Full TensorRT cannot be installed on trtc's machines, so the
engine test skips with that reason; what runs everywhere: the registered functions follow the schema,
and (with Triton installed, no GPU needed) the AOT kernels compile to PTX with the expected
calling convention."""
import ast
import importlib.util
import pathlib
import re

import pytest

from trtc.errors import TrtcError
from trtc.plugins.schema import PAGED_ATTENTION, ROPE_KV_APPEND
from trtc.plugins.tensorrt_plugin import UNAVAILABLE

SRC = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "tensorrt_plugin.py"
ATTN_ATTRS = dict(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, kv_cache_dtype="auto")


def _functions():
    tree = ast.parse(SRC.read_text())
    return {f.name: [a.arg for a in f.args.args] for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("spec,prefix", [(ROPE_KV_APPEND, "rope_kv_append"), (PAGED_ATTENTION, "paged_attention")])
def test_registered_signatures_follow_schema(spec, prefix):
    fns = _functions()
    inputs = [t.name for t in spec.inputs]
    attrs = [a.name for a in spec.attrs]
    assert fns[f"{prefix}_desc"] == inputs + attrs
    assert fns[f"{prefix}_autotune"] == inputs + ["outputs"]
    assert fns[f"{prefix}_aot"] == inputs + attrs + ["outputs", "tactic"]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def ptx_target(ptx: str) -> str:
    return re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)


@needs_triton
@pytest.mark.parametrize("spec", [ROPE_KV_APPEND, PAGED_ATTENTION])
def test_aot_compiles_to_ptx(spec):
    from trtc.plugins.tensorrt_plugin import compile_aot
    ker = compile_aot(spec, "float16", "float8_e4m3fn", {**ATTN_ATTRS, "kv_cache_dtype": "fp8_e4m3"}, arch=90)
    n_ours = len(spec.inputs) + 2 + len(spec.outputs)  # inputs, (B, max_blocks), outputs
    assert ker.num_params in (n_ours, n_ours + 1, n_ours + 2)  # + Triton's scratch pointers (unused)
    assert ker.name in ker.ptx


@needs_triton
@pytest.mark.parametrize("spec", [ROPE_KV_APPEND, PAGED_ATTENTION])
def test_aot_ptx_is_for_the_build_target(spec):
    """The build's target flows into the PTX: two targets give two different `.target` lines."""
    from trtc.plugins.tensorrt_plugin import aot_arch, compile_aot
    targets = {}
    for target in ("sm_80", "sm_90"):
        ker = compile_aot(spec, "float16", "float16", ATTN_ATTRS, arch=aot_arch((target,)))
        targets[target] = ptx_target(ker.ptx)
    assert targets["sm_80"] == "sm_80"
    assert targets["sm_90"] in ("sm_90", "sm_90a")  # Triton writes sm_90a (wgmma)


def test_aot_arch_takes_one_target():
    from trtc.plugins.tensorrt_plugin import aot_arch
    assert aot_arch(("sm_90",)) == 90
    assert aot_arch(("sm_100",)) == 100
    assert aot_arch(("sm_90", "sm_90")) == 90
    with pytest.raises(TrtcError, match=r"exactly one target.*sm_90, sm_100.*--target sm_100"):
        aot_arch(("sm_90", "sm_100"))
    with pytest.raises(TrtcError, match="'ampere' is not a compute capability"):
        aot_arch(("ampere",))


def test_build_passes_its_targets_to_register():
    """compiler/build.py hands the build's targets to register(), which sets what the aot_impl
    functions compile for before it needs TensorRT (absent here: it then raises)."""
    from trtc.compiler import build
    from trtc.plugins import tensorrt_plugin
    if importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("tensorrt.plugin") is not None:
        pytest.skip("full TensorRT installed: register() would really register")
    for target, arch in (("sm_100", 100), ("sm_89", 89)):
        with pytest.raises(TrtcError, match="need full TensorRT"):
            build._register_plugins((target,))
        assert tensorrt_plugin._build_arch() == arch


def test_engine_with_plugins_matches_reference():
    pytest.importorskip("tensorrt.plugin", reason=UNAVAILABLE)  # (tensorrt-stubs alone make `tensorrt` importable)
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    from trtc.plugins import reference as ref
    from trtc.plugins import tensorrt_plugin
    from trtc.plugins.testing import make_case, rel_err

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    tensorrt_plugin.register((f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}",))
    case = make_case([5, 0], [1, 7], 32, 8, 128, 16, device="cuda", seed=0)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    names = [t.name for t in ROPE_KV_APPEND.inputs]
    trt_type = {torch.float16: trt.float16, torch.float32: trt.float32, torch.int32: trt.int32}
    ins = {n: net.add_input(n, trt_type[t.dtype], tuple(t.shape)) for n, t in zip(names, case.append_args)}
    app = net.add_plugin(trtp.op.trtc.RopeKvAppend(*[ins[n] for n in names], **case.append_attrs), aot=True)
    attn = net.add_plugin(trtp.op.trtc.PagedAttention(app.get_output(0), app.get_output(1), ins["block_tables"],
                                                      ins["cu_seqlens_q"], ins["seq_lens"], ins["kv_scales"],
                                                      **case.attrs), aot=True)
    net.mark_output(attn.get_output(0))
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(net, builder.create_builder_config()))
    ctx = engine.create_execution_context()
    pool_ref = case.kv_pool.clone()
    q_ref = ref.rope_kv_append(*case.append_args[:-1], pool_ref, **case.append_attrs)
    want = ref.paged_attention_f32(q_ref, pool_ref, *case.attention_args(q_ref)[2:], **case.attrs)
    out = torch.full_like(case.q, float("nan"))
    for n, t in zip(names, case.append_args):
        ctx.set_tensor_address(n, t.data_ptr())
    ctx.set_tensor_address(attn.get_output(0).name, out.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert rel_err(out, want) < 2e-3
