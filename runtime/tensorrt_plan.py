"""What TensorRTSession does at each step, decided from the engine dir's I/O table and limits.

Plain functions of plain values (IOTable, ModelSpec, ints): they run, and are tested, on CPU
(tests/runtime/test_tensorrt_plan.py). TensorRTSession only executes the plan on a GPU.

The native-form rank graph (trtc/artifact.py):
  inputs   input_ids, position_ids [B, S]; past_key_values.{i}.{key,value} [B, Hkv, max_seq_len, D]
  outputs  logits [B, S, vocab]; present.{i}.{key,value}: the same memory as the past input (the
           KV-cache update writes the step's entries in place; the engine reports the output as
           aliased to that input), so one buffer per layer and K/V is bound to both names.
Profiles (compiler/build.py): PREFILL for seq 1..max_input_len, DECODE for seq 1; one execution
context per profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtc import artifact as art
from trtc.artifact import DECODE, PREFILL, IOTable, TensorInfo
from trtc.errors import TrtcError, TrtcInternalError
from trtc.spec import ModelSpec

REBUILD = "rebuild the engine dir with this trtc (trtc build)"

# TensorRT DataType member names -> numpy dtype names of the I/O table
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn"}


@dataclass(frozen=True)
class Buffer:
    """One device buffer: numpy dtype name (from the I/O table) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """What one step sets on the execution context of `profile` before execute_async_v3."""

    profile: int                              # PREFILL or DECODE: which context runs the step
    input_shapes: dict[str, tuple[int, ...]]  # set_input_shape, for every engine input
    bindings: dict[str, str]                  # set_tensor_address: engine tensor -> buffer name
    step_buffers: dict[str, Buffer]           # made per step: input_ids, position_ids, logits


@dataclass(frozen=True)
class EngineTensor:
    """How the deserialized engine describes one I/O tensor (read on the GPU, compared on CPU)."""

    is_input: bool
    dtype: str                 # TensorRT DataType member name, e.g. "HALF"
    aliased_input: str | None  # outputs: the input whose memory it shares (None: its own)


def expected_names(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a native-form rank graph of `spec`, in graph order."""
    caches = art.cache_names(spec.num_layers)
    return ([art.INPUT_IDS, art.POSITION_IDS, *(past for past, _ in caches)],
            [art.LOGITS, *(present for _, present in caches)])


def aliases(spec: ModelSpec) -> dict[str, str]:
    """Output -> the input whose buffer it is bound to: present.{i}.{kv} -> past_key_values.{i}.{kv}."""
    return {present: past for past, present in art.cache_names(spec.num_layers)}


def check_io(io: IOTable, spec: ModelSpec, max_seq_len: int, where: str) -> None:
    """TrtcError naming the tensor when `io` is not the native-form graph this session runs."""
    want_in, want_out = expected_names(spec)
    for kind, table, want in (("input", io.inputs, want_in), ("output", io.outputs, want_out)):
        have = [t.name for t in table]
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            raise TrtcError(f"{where}: the engine's {kind}s are not those of a native-form graph of "
                            f"{spec.num_layers} layers (missing: {', '.join(missing) or 'none'}; unexpected: "
                            f"{', '.join(extra) or 'none'}); the TensorRT backend runs native-form engines: {REBUILD}")
    cache = (spec.num_kv_heads, max_seq_len, spec.head_dim)
    for past, present in art.cache_names(spec.num_layers):
        p, q = _info(io.inputs, past), _info(io.outputs, present)
        if len(p.shape) != 4 or any(isinstance(h, int) and h != w for h, w in zip(p.shape[1:], cache)):
            raise TrtcError(f"{where}: {past} has shape {p.shape}, expected [batch, {', '.join(map(str, cache))}] "
                            f"(kv_heads, max_seq_len, head_dim); {REBUILD}")
        if p.dtype != q.dtype:
            raise TrtcError(f"{where}: {present} is {q.dtype} but {past}, whose buffer it shares, is {p.dtype}; "
                            f"{REBUILD}")
    logits = _info(io.outputs, art.LOGITS)
    if len(logits.shape) != 3 or logits.shape[2] != spec.vocab_size:
        raise TrtcError(f"{where}: {art.LOGITS} has shape {logits.shape}, expected [batch, seq, {spec.vocab_size}] "
                        f"(vocab_size); {REBUILD}")


def cache_buffers(io: IOTable, spec: ModelSpec, batch: int, max_seq_len: int) -> dict[str, Buffer]:
    """The KV cache, one buffer per layer and K/V named by its input: [batch, Hkv, max_seq_len, D]."""
    shape = art.cache_shape(batch, spec.num_kv_heads, max_seq_len, spec.head_dim)
    return {past: Buffer(_info(io.inputs, past).dtype, shape) for past, _ in art.cache_names(spec.num_layers)}


def profile_for(seq: int) -> int:
    """Prefill profile for a prompt of 2+ tokens, decode profile for one token."""
    return PREFILL if seq > 1 else DECODE


def check_batch(batch: int, max_batch_size: int) -> None:
    if not 1 <= batch <= max_batch_size:
        raise TrtcError(f"batch {batch} is outside the engine's 1..{max_batch_size} (max-batch-size); "
                        f"split the prompts into batches of {max_batch_size}, or rebuild with --max-batch-size {batch}")


def check_step(batch: int, seq: int, cache_batch: int, max_batch_size: int, max_input_len: int,
               last_position: int, max_seq_len: int) -> None:
    """TrtcError when a step does not fit the engine's profiles or the allocated cache."""
    if cache_batch == 0:
        raise TrtcError("step() before allocate(batch): the session has no KV cache yet")
    check_batch(batch, max_batch_size)
    if batch != cache_batch:
        raise TrtcError(f"batch {batch} differs from the {cache_batch} sequences the KV cache was allocated for; "
                        f"call allocate({batch}) first")
    if not 1 <= seq <= max_input_len:
        raise TrtcError(f"a step of {seq} tokens is outside the engine's 1..{max_input_len} (max-input-len); "
                        f"shorten the prompt or rebuild with --max-input-len {seq}")
    if last_position >= max_seq_len:
        raise TrtcError(f"position {last_position} is past the KV cache's {max_seq_len} slots (max-seq-len); "
                        f"generate fewer tokens or rebuild with --max-seq-len {last_position + 1}")


def check_keep(rows: list[int], cache_batch: int) -> None:
    """The generator's keep(rows): distinct rows of the allocated batch (a bug otherwise)."""
    if not rows or len(set(rows)) != len(rows) or not all(0 <= r < cache_batch for r in rows):
        raise TrtcInternalError(f"keep({rows}) on a KV cache of {cache_batch} rows: rows must be distinct, "
                                f"in 0..{cache_batch - 1}, and at least one")


def step_plan(io: IOTable, spec: ModelSpec, batch: int, seq: int, max_seq_len: int) -> StepPlan:
    """Profile, input shapes, bindings and per-step buffers of a step of `seq` tokens for `batch`
    sequences (after check_io and check_step)."""
    tokens = (batch, seq)
    cache = art.cache_shape(batch, spec.num_kv_heads, max_seq_len, spec.head_dim)
    shapes: dict[str, tuple[int, ...]] = {art.INPUT_IDS: tokens, art.POSITION_IDS: tokens}
    bindings = {art.INPUT_IDS: art.INPUT_IDS, art.POSITION_IDS: art.POSITION_IDS, art.LOGITS: art.LOGITS}
    for past, present in art.cache_names(spec.num_layers):
        shapes[past] = cache
        bindings[past] = past
    bindings.update(aliases(spec))      # present.* -> the past buffer
    logits = _info(io.outputs, art.LOGITS)
    step_buffers = {n: Buffer(_info(io.inputs, n).dtype, tokens) for n in (art.INPUT_IDS, art.POSITION_IDS)}
    step_buffers[art.LOGITS] = Buffer(logits.dtype, (batch, seq, spec.vocab_size))
    return StepPlan(profile_for(seq), shapes, bindings, step_buffers)


def check_engine_io(io: IOTable, spec: ModelSpec, engine: dict[str, EngineTensor], where: str) -> None:
    """TrtcError when the deserialized engine's tensors are not the I/O table's (names, directions,
    dtypes) or its aliases are not those the bindings assume."""
    want = {t.name: (True, t) for t in io.inputs} | {t.name: (False, t) for t in io.outputs}
    missing, extra = sorted(set(want) - set(engine)), sorted(set(engine) - set(want))
    if missing or extra:
        raise TrtcError(f"{where}: the engine's tensors differ from config.json's I/O table (not in the engine: "
                        f"{', '.join(missing) or 'none'}; not in the table: {', '.join(extra) or 'none'}); {REBUILD}")
    alias = aliases(spec)
    for name, (is_input, info) in want.items():
        e = engine[name]
        dtype = TRT_DTYPES.get(e.dtype, e.dtype)
        if e.is_input != is_input or dtype != info.dtype:
            raise TrtcError(f"{where}: the engine's {name} is an {'input' if e.is_input else 'output'} of {dtype}, "
                            f"config.json says an {'input' if is_input else 'output'} of {info.dtype}; {REBUILD}")
        if not is_input and e.aliased_input != alias.get(name):
            raise TrtcError(f"{where}: the engine's output {name} shares memory with {e.aliased_input or 'no input'}, "
                            f"the session binds it to {alias.get(name) or 'a buffer of its own'}; {REBUILD}")


def _info(table: list[TensorInfo], name: str) -> TensorInfo:
    t = next((t for t in table if t.name == name), None)
    if t is None:
        raise TrtcInternalError(f"the I/O table has no {name!r}: check_io() must accept it first")
    return t
