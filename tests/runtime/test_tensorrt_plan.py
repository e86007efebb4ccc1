"""TensorRTSession's decisions, on CPU: profile per step, input shapes, bindings and aliases, buffer
dtypes, and what it refuses. TensorRT itself is not involved (nor faked): these are the plain
functions the session executes (runtime/tensorrt_plan.py)."""

from __future__ import annotations

import dataclasses

import pytest

from trtc.artifact import DECODE, PREFILL, IOTable, TensorInfo
from trtc.errors import TrtcError, TrtcInternalError
from trtc.runtime import tensorrt_plan as plan
from trtc.spec import ModelSpec

MAX_BATCH, MAX_INPUT, MAX_SEQ = 4, 48, 96
WHERE = "engines/tiny"


def tiny_spec(num_layers: int = 2) -> ModelSpec:
    return ModelSpec(family="llama", architecture="LlamaForCausalLM", vocab_size=50, hidden_size=32,
                     intermediate_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=256, rope_type="default", rope_theta=10000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, qkv_bias=False, qk_norm=False, sliding_window=None,
                     source_dtype="float32", bos_token_id=1, eos_token_ids=(2,))


def native_io(spec: ModelSpec, cache_dtype: str = "float16", logits_dtype: str = "float16",
              token_dtype: str = "int64", max_seq_len: int = MAX_SEQ) -> IOTable:
    """The I/O table trtc export writes for a native-form graph (names spelled out, as in config.json)."""
    cache: list[int | str] = ["batch", spec.num_kv_heads, max_seq_len, spec.head_dim]
    layers = [(i, kv) for i in range(spec.num_layers) for kv in ("key", "value")]
    return IOTable(
        inputs=[TensorInfo("input_ids", token_dtype, ["batch", "seq"]),
                TensorInfo("position_ids", token_dtype, ["batch", "seq"])]
        + [TensorInfo(f"past_key_values.{i}.{kv}", cache_dtype, cache) for i, kv in layers],
        outputs=[TensorInfo("logits", logits_dtype, ["batch", "seq", spec.vocab_size])]
        + [TensorInfo(f"present.{i}.{kv}", cache_dtype, cache) for i, kv in layers])


def engine_view(io: IOTable, spec: ModelSpec) -> dict[str, plan.EngineTensor]:
    """What a correct engine reports for `io`: same names and directions, TensorRT dtype names, KV aliases."""
    trt_name = {v: k for k, v in plan.TRT_DTYPES.items()}
    view = {t.name: plan.EngineTensor(True, trt_name[t.dtype], None) for t in io.inputs}
    for t in io.outputs:
        alias = t.name.replace("present.", "past_key_values.") if t.name.startswith("present.") else None
        view[t.name] = plan.EngineTensor(False, trt_name[t.dtype], alias)
    return view


# --- profile and shapes ---------------------------------------------------------------------------

def test_prompt_steps_use_the_prefill_profile_and_single_tokens_the_decode_profile():
    assert (PREFILL, DECODE) == (0, 1)           # the order compiler/build.py adds them in
    assert plan.profile_for(2) == plan.profile_for(MAX_INPUT) == PREFILL
    assert plan.profile_for(1) == DECODE


def test_prefill_step_sets_token_shapes_and_full_cache_shapes_for_every_input():
    spec = tiny_spec()
    io = native_io(spec)
    p = plan.step_plan(io, spec, batch=3, seq=5, max_seq_len=MAX_SEQ)
    assert p.profile == PREFILL
    assert set(p.input_shapes) == {t.name for t in io.inputs}
    assert p.input_shapes["input_ids"] == p.input_shapes["position_ids"] == (3, 5)
    for i in range(spec.num_layers):
        for kv in ("key", "value"):
            assert p.input_shapes[f"past_key_values.{i}.{kv}"] == (3, 2, MAX_SEQ, 8)   # [B, Hkv, max_seq_len, D]


def test_decode_step_uses_profile_1_with_one_token():
    spec = tiny_spec()
    p = plan.step_plan(native_io(spec), spec, batch=2, seq=1, max_seq_len=MAX_SEQ)
    assert p.profile == DECODE
    assert p.input_shapes["input_ids"] == (2, 1)
    assert p.step_buffers["logits"].shape == (2, 1, spec.vocab_size)


# --- bindings, aliases, dtypes ----------------------------------------------------------------------

def test_every_engine_tensor_is_bound_and_present_outputs_alias_past_inputs():
    spec = tiny_spec()
    io = native_io(spec)
    p = plan.step_plan(io, spec, batch=1, seq=4, max_seq_len=MAX_SEQ)
    names = {t.name for t in io.inputs + io.outputs}
    assert set(p.bindings) == names
    assert p.bindings["present.0.key"] == "past_key_values.0.key"
    assert p.bindings["present.1.value"] == "past_key_values.1.value"
    assert p.bindings["input_ids"] == "input_ids" and p.bindings["logits"] == "logits"
    # each binding names a buffer the session owns: the cache (allocate) or a per-step buffer
    cache = plan.cache_buffers(io, spec, 1, MAX_SEQ)
    assert set(p.bindings.values()) == set(cache) | set(p.step_buffers)
    # only the aliased outputs share a buffer
    by_buffer: dict[str, list[str]] = {}
    for tensor, buf in p.bindings.items():
        by_buffer.setdefault(buf, []).append(tensor)
    shared = {b: sorted(ts) for b, ts in by_buffer.items() if len(ts) > 1}
    assert shared == {f"past_key_values.{i}.{kv}": [f"past_key_values.{i}.{kv}", f"present.{i}.{kv}"]
                      for i in range(2) for kv in ("key", "value")}
    assert plan.aliases(spec) == {f"present.{i}.{kv}": f"past_key_values.{i}.{kv}"
                                  for i in range(2) for kv in ("key", "value")}


def test_buffer_dtypes_come_from_the_io_table():
    spec = tiny_spec()
    io = native_io(spec, cache_dtype="float16", logits_dtype="float32", token_dtype="int32")
    p = plan.step_plan(io, spec, batch=2, seq=3, max_seq_len=MAX_SEQ)
    assert p.step_buffers["logits"] == plan.Buffer("float32", (2, 3, spec.vocab_size))
    assert p.step_buffers["input_ids"] == p.step_buffers["position_ids"] == plan.Buffer("int32", (2, 3))
    cache = plan.cache_buffers(io, spec, 2, MAX_SEQ)
    assert len(cache) == 2 * spec.num_layers
    assert set(cache.values()) == {plan.Buffer("float16", (2, 2, MAX_SEQ, 8))}


# --- what the session refuses -------------------------------------------------------------------------

def test_io_table_of_a_native_graph_is_accepted():
    spec = tiny_spec()
    plan.check_io(native_io(spec), spec, MAX_SEQ, WHERE)


def test_io_table_with_a_missing_cache_is_refused_naming_it():
    spec = tiny_spec()
    io = native_io(spec)
    io = dataclasses.replace(io, inputs=[t for t in io.inputs if t.name != "past_key_values.1.value"])
    with pytest.raises(TrtcError, match=r"engines/tiny: the engine's inputs .*missing: past_key_values\.1\.value"):
        plan.check_io(io, spec, MAX_SEQ, WHERE)


def test_io_table_of_another_layer_count_is_refused():
    with pytest.raises(TrtcError, match=r"missing: past_key_values\.2\.key.*native-form graph of 3 layers"
                                        r"|native-form graph of 3 layers.*missing: past_key_values\.2\.key"):
        plan.check_io(native_io(tiny_spec(2)), tiny_spec(3), MAX_SEQ, WHERE)


def test_plugin_form_io_table_is_refused_naming_its_tensors():
    spec = tiny_spec(1)
    io = IOTable(inputs=[TensorInfo("input_ids", "int64", ["batch", "seq"]),
                         TensorInfo("position_ids", "int64", ["batch", "seq"]),
                         TensorInfo("block_tables", "int32", ["batch", 6]),
                         TensorInfo("past_kv_pool.0", "float16", ["blocks", 2, 2, 16, 8])],
                 outputs=[TensorInfo("logits", "float16", ["batch", "seq", 50]),
                          TensorInfo("present_kv_pool.0", "float16", ["blocks", 2, 2, 16, 8])])
    with pytest.raises(TrtcError, match=r"unexpected: block_tables, past_kv_pool\.0.*native-form engines"):
        plan.check_io(io, spec, MAX_SEQ, WHERE)


def test_cache_length_other_than_max_seq_len_is_refused():
    spec = tiny_spec()
    with pytest.raises(TrtcError, match=r"past_key_values\.0\.key has shape \['batch', 2, 64, 8\], expected "
                                        r"\[batch, 2, 96, 8\]"):
        plan.check_io(native_io(spec, max_seq_len=64), spec, MAX_SEQ, WHERE)


def test_present_of_another_dtype_than_its_past_is_refused():
    spec = tiny_spec()
    io = native_io(spec)
    outputs = [dataclasses.replace(t, dtype="float32") if t.name == "present.0.value" else t for t in io.outputs]
    with pytest.raises(TrtcError, match=r"present\.0\.value is float32 but past_key_values\.0\.value.* float16"):
        plan.check_io(dataclasses.replace(io, outputs=outputs), spec, MAX_SEQ, WHERE)


def test_logits_of_another_vocabulary_are_refused():
    spec = tiny_spec()
    with pytest.raises(TrtcError, match=r"logits has shape \['batch', 'seq', 50\], expected \[batch, seq, 51\]"):
        plan.check_io(native_io(spec), dataclasses.replace(spec, vocab_size=51), MAX_SEQ, WHERE)


@pytest.mark.parametrize("args, message", [
    (dict(batch=5, cache_batch=5), r"batch 5 is outside the engine's 1\.\.4 \(max-batch-size\).*--max-batch-size 5"),
    (dict(batch=0, cache_batch=0), r"before allocate"),
    (dict(batch=0, cache_batch=1), r"batch 0 is outside"),
    (dict(seq=49), r"49 tokens is outside the engine's 1\.\.48 \(max-input-len\)"),
    (dict(cache_batch=2), r"batch 3 differs from the 2 sequences .* allocate\(3\)"),
    (dict(last_position=96), r"position 96 is past the KV cache's 96 slots.*--max-seq-len 97"),
])
def test_steps_outside_the_limits_are_refused(args, message):
    step = dict(batch=3, seq=4, cache_batch=3, max_batch_size=MAX_BATCH, max_input_len=MAX_INPUT,
                last_position=10, max_seq_len=MAX_SEQ)
    plan.check_step(**step)     # within the limits
    with pytest.raises(TrtcError, match=message):
        plan.check_step(**{**step, **args})


def test_keep_takes_distinct_rows_of_the_allocated_batch():
    plan.check_keep([2, 0], cache_batch=3)
    for rows in ([], [0, 0], [3], [-1]):
        with pytest.raises(TrtcInternalError, match=r"rows must be distinct, in 0\.\.2"):
            plan.check_keep(rows, cache_batch=3)


def test_engine_that_matches_the_io_table_is_accepted():
    spec = tiny_spec()
    io = native_io(spec, logits_dtype="float32")
    plan.check_engine_io(io, spec, engine_view(io, spec), WHERE)


@pytest.mark.parametrize("change, message", [
    (lambda v: v.pop("present.1.key"), r"not in the engine: present\.1\.key"),
    (lambda v: v.update(extra=plan.EngineTensor(True, "HALF", None)), r"not in the table: extra"),
    (lambda v: v.update(logits=plan.EngineTensor(False, "FLOAT", None)),
     r"logits is an output of float32, config\.json says an output of float16"),
    (lambda v: v.update({"input_ids": plan.EngineTensor(False, "INT64", None)}), r"input_ids is an output"),
    (lambda v: v.update({"present.0.key": plan.EngineTensor(False, "HALF", None)}),
     r"present\.0\.key shares memory with no input, the session binds it to past_key_values\.0\.key"),
])
def test_engine_that_differs_from_the_io_table_is_refused(change, message):
    spec = tiny_spec()
    io = native_io(spec)
    view = engine_view(io, spec)
    change(view)
    with pytest.raises(TrtcError, match=message):
        plan.check_engine_io(io, spec, view, WHERE)


# --- against what trtc build writes ------------------------------------------------------------------

def test_plan_fits_the_io_table_of_a_real_engine_dir(tiny_engine):
    from trtc.runtime.engine_dir import load_engine_dir

    ed = load_engine_dir(tiny_engine("llama"))
    plan.check_io(ed.io, ed.spec, ed.max_seq_len, str(ed.path))
    p = plan.step_plan(ed.io, ed.spec, ed.max_batch_size, ed.max_input_len, ed.max_seq_len)
    assert set(p.bindings) == {t.name for t in ed.io.inputs + ed.io.outputs}
    assert set(p.input_shapes) == {t.name for t in ed.io.inputs}
    cache = plan.cache_buffers(ed.io, ed.spec, ed.max_batch_size, ed.max_seq_len)
    assert {b.dtype for b in cache.values()} == {ed.dtype}
    plan.check_engine_io(ed.io, ed.spec, engine_view(ed.io, ed.spec), str(ed.path))
