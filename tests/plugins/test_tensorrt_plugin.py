"""The full-TensorRT registration. Full TensorRT cannot be installed on trtc's machines, so the
engine test skips with that reason; what runs everywhere: the registered functions follow the schema,
and (with Triton installed, no GPU needed) the AOT kernels compile to PTX with the expected
calling convention."""
import ast
import importlib.util
import pathlib

import pytest

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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("spec", [ROPE_KV_APPEND, PAGED_ATTENTION])
def test_aot_compiles_to_ptx(spec):
    from trtc.plugins.tensorrt_plugin import compile_aot
    ker = compile_aot(spec, "float16", "float8_e4m3fn", {**ATTN_ATTRS, "kv_cache_dtype": "fp8_e4m3"})
    n_ours = len(spec.inputs) + 2 + len(spec.outputs)  # inputs, (B, max_blocks), outputs
    assert ker.num_params in (n_ours, n_ours + 1, n_ours + 2)  # + Triton's scratch pointers (unused)
    assert ".target sm_90" in ker.ptx and ker.name in ker.ptx


def test_engine_with_plugins_matches_reference():
    pytest.importorskip("tensorrt", reason=UNAVAILABLE)
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    from trtc.plugins import reference as ref
    from trtc.plugins import tensorrt_plugin
    from trtc.plugins.testing import make_case, rel_err

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    tensorrt_plugin.register()
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
