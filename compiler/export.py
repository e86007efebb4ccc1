"""Stage 2, export: trace the HF torch module into one ONNX graph per rank (tp=1: rank 0).

The traced graph serves prefill and decode: dynamic batch and sequence, KV cache as graph
inputs/outputs. The exporter (torch.onnx, dynamo, opset 23+) already emits Attention,
RotaryEmbedding and RMSNormalization nodes; the passes (compiler/passes) then turn the concat-style
KV cache into fixed-size caches updated by TensorScatter, precompute the rotary cache, build the
attention mask from positions, and drop what becomes dead.

I/O of the exported graph (before passes), L layers, Hkv KV heads, D head dim:
  input_ids        int64 [batch, seq]
  attention_mask   int64 [batch, past+seq]    (only to make the exporter emit an explicit mask)
  position_ids     int64 [batch, seq]
  past_key_values.{i}.key / .value   [batch, Hkv, past, D]
  logits           [batch, seq, vocab]
  present.{i}.key / .value           [batch, Hkv, past+seq, D]
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trtc import artifact as art
from trtc.errors import TrtcInternalError

from .config import ExportConfig
from .load import LoadedModel, load_torch_model
from trtc.spec import ModelSpec


def past_names(num_layers: int) -> list[str]:
    return [past for past, _ in art.cache_names(num_layers)]


def present_names(num_layers: int) -> list[str]:
    return [present for _, present in art.cache_names(num_layers)]


@dataclass(frozen=True)
class TracedGraph:
    onnx_path: Path          # model with external data next to it
    spec: ModelSpec
    config: ExportConfig
    template_layers: int = 0  # layers traced when stacked (compiler/stack.py); 0: every layer traced


def _wrapper(model, num_layers: int, marks: list | None = None):
    """The module torch.onnx traces: flat tensors in, logits and the new cache out; with `marks`
    (decoder layer modules), each one's output hidden states too (the stacked export's layer
    boundaries)."""
    import torch
    from transformers.cache_utils import DynamicCache

    captured: list = []          # not a module attribute: torch.export would warn about tensors assigned to one
    for layer in marks or ():
        layer.register_forward_hook(lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))

    class CausalLMWithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            captured.clear()
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            res = [out.logits]
            for layer in out.past_key_values.layers:
                res += [layer.keys, layer.values]
            return tuple(res + captured)

    return CausalLMWithCache(model).eval()


def trace(loaded: LoadedModel, cfg: ExportConfig, out_dir: Path) -> TracedGraph:
    """Export the model to `out_dir/traced.onnx` (+ traced.onnx.data) in a child process: torch, the
    exporter and the template keep memory past the export (0.45 GiB for TinyLlama, several GiB for
    an 8B model) that would otherwise sit beside the TensorRT builder; a child gives it all back when
    it ends. The child is forked from a server process that imported torch and transformers once
    (compiler/export_worker.py), so a process that exports many models (a test session, a recipe
    matrix) pays those imports once, not per export. Its output comes back through a pipe and is
    written to this process's stderr."""
    import pickle

    from trtc import log
    from trtc.errors import TrtcError

    from . import export_worker

    out_dir.mkdir(parents=True, exist_ok=True)
    req, res = out_dir / ".trace-request.pkl", out_dir / ".trace-result.pkl"
    req.write_bytes(pickle.dumps((loaded.hf_dir, loaded.spec, loaded.adapter.name, loaded.source,
                                  loaded.weights_sha256, loaded.files_sha256, cfg, out_dir, log.state())))
    try:
        code = export_worker.run_child(req, res)
    finally:
        req.unlink(missing_ok=True)
    answer = pickle.loads(res.read_bytes()) if res.is_file() else None
    res.unlink(missing_ok=True)
    if answer is None:
        raise TrtcError(f"export: the tracing process ended without a result (exit {code}"
                        f"{': killed, out of memory?' if code in (-9, 137) else ''}); free memory, or see "
                        f"the error above")
    kind, value = answer
    if kind == "ok":
        return value
    if kind == "user":
        raise TrtcError(value)
    raise TrtcInternalError(f"export failed in the tracing process: {value} (traceback above)")


def trace_request(req: Path, res: Path) -> None:
    """The child's side of trace(): read the request, export, write (kind, value) to `res`."""
    import pickle
    import traceback

    from trtc import log
    from trtc.errors import TrtcError

    from .families import adapter_named

    hf_dir, spec, adapter, source, weights_sha, files_sha, cfg, out_dir, log_state = pickle.loads(req.read_bytes())
    log.restore(log_state)
    loaded = LoadedModel(hf_dir=hf_dir, spec=spec, adapter=adapter_named(adapter), source=source,
                         weights_sha256=weights_sha, files_sha256=files_sha)
    try:
        answer: tuple = ("ok", trace_here(loaded, cfg, out_dir))
    except TrtcError as e:
        answer = ("user", str(e))
    except Exception as e:     # a bug: its traceback goes to stderr, the parent names it
        traceback.print_exc()
        answer = ("bug", f"{type(e).__name__}: {e}")
    tmp = res.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(answer))
    tmp.rename(res)


def trace_here(loaded: LoadedModel, cfg: ExportConfig, out_dir: Path) -> TracedGraph:
    """The export in this process: by stacking a traced template of a few layers (compiler/stack.py),
    or, where stacking does not apply, by tracing every layer."""
    from trtc.log import info

    from .stack import StackUnsupported

    # The family fixes at export what depends on the engine's length (LongRoPE's factor set) and
    # swaps what cannot be traced ahead of time (data-dependent expert loops) for its equivalent.
    spec = loaded.adapter.for_export(loaded.spec, cfg.max_seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        path, template = _trace_stacked(loaded, spec, cfg, out_dir)
    except StackUnsupported as e:
        template = 0
        info(f"[trtc]   tracing all {spec.num_layers} layers ({e})")
        for f in out_dir.iterdir():
            if f.is_file():
                f.unlink()
        shutil.rmtree(out_dir / "template", ignore_errors=True)
        path = _trace_full(loaded, spec, cfg, out_dir)
    return TracedGraph(onnx_path=path, spec=spec, config=cfg, template_layers=template)


def _trace_stacked(loaded: LoadedModel, spec: ModelSpec, cfg: ExportConfig, out_dir: Path) -> tuple[Path, int]:
    import dataclasses
    import shutil

    import onnx

    from trtc.log import info

    from . import stack
    from .load import read_hf_config

    hf_cfg = read_hf_config(loaded.hf_dir)
    kinds = stack.layer_kinds(hf_cfg)
    plan = stack.plan_stack(kinds)
    T, L = plan.template_layers, plan.num_layers
    if T >= L:
        raise stack.StackUnsupported(f"{L} layers: no layer beyond the {T}-layer template")
    ckpt = stack.checkpoint_index(loaded.hf_dir)
    model = _template_model(loaded, hf_cfg, cfg.dtype, T)
    layers_path = stack.decoder_layers_path(model)
    tspec = dataclasses.replace(spec, num_layers=T, layer_types=spec.layer_types[:T])
    loaded.adapter.prepare_trace(model, tspec)
    info(f"[trtc]   tracing a {T}-layer template, stacked to {L} layers")
    t0 = time.perf_counter()
    tdir = out_dir / "template"     # names where the template's (never written) weights would lie
    program = _export_program(model, tspec, cfg, marks=list(model.get_submodule(layers_path)))
    info(f"[trtc]   template traced in {time.perf_counter() - t0:.1f} s")
    index = stack.param_index(model)
    aliases = _checkpoint_aliases(model, ckpt)
    proto, bound = stack.bind_program(program.model, index, tdir)
    del model, program, index
    gc.collect()
    parts = stack.split_nodes(proto.graph, stack._layer_re(layers_path), T)
    stack.check_siblings(parts, proto.graph, bound, kinds, tdir)
    stacker = stack.Stacker(proto, parts, plan, layers_path, bound, aliases)
    model_proto = stack.assemble(proto, parts, plan, stacker, tdir)
    path = out_dir / "traced.onnx"
    t0 = time.perf_counter()
    stack.write_weights(model_proto, list(stacker.weights.values()), ckpt, cfg.dtype,
                        out_dir / (path.name + ".data"), stacker.layer_of_param, L)
    size = (out_dir / (path.name + ".data")).stat().st_size
    info(f"[trtc]   weights: {size / 2**30:.2f} GiB written in {time.perf_counter() - t0:.1f} s")
    onnx.save_model(model_proto, str(path))
    shutil.rmtree(tdir, ignore_errors=True)
    return path, T


def _checkpoint_aliases(model, ckpt: dict) -> dict[str, str]:
    """Parameter name -> the name the checkpoint stores it under (tied parameters are stored once)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = {}
    for names in groups.values():
        stored = next((n for n in names if n in ckpt), None)
        if stored is not None:
            out.update({n: stored for n in names})
    return out


def _template_model(loaded: LoadedModel, hf_cfg, dtype: str, T: int):
    """The model's architecture cut to T layers, with distinct random parameters (stack.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .load import attn_implementation
    from .stack import fill_distinct, template_config

    from transformers.initialization import no_init_weights

    with no_init_weights():         # filled below; HF's own init of an 8B embedding costs seconds
        model = AutoModelForCausalLM.from_config(template_config(hf_cfg, T), dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation(loaded.spec))
    model.tie_weights()             # tied embeddings: one parameter, as in the checkpoint
    fill_distinct(model)
    return model.eval()


def _trace_full(loaded: LoadedModel, spec: ModelSpec, cfg: ExportConfig, out_dir: Path) -> Path:
    """Every layer traced; initializers then named after the parameters they hold."""
    import onnx

    from . import stack

    model = load_torch_model(loaded, cfg.dtype)
    loaded.adapter.prepare_trace(model, spec)
    path = _export(model, spec, cfg, out_dir)
    index = stack.param_index(model)
    del model
    gc.collect()
    proto = onnx.load(str(path), load_external_data=False)
    stack.name_after_params(proto, stack.bind_initializers(proto, out_dir, index))
    onnx.save_model(proto, str(path))
    return path


def _export(model, spec: ModelSpec, cfg: ExportConfig, out_dir: Path) -> Path:
    """torch.onnx (dynamo) export of `model` to out_dir/traced.onnx with external data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "traced.onnx"
    program = _export_program(model, spec, cfg)
    program.save(str(path), external_data=True)
    del program
    gc.collect()
    return path


def _export_program(model, spec: ModelSpec, cfg: ExportConfig, marks: list | None = None):
    """torch.onnx (dynamo) export of `model`: the ONNXProgram, in memory (its initializers are the
    model's tensors). marks: modules whose outputs become graph outputs (the template's layers)."""
    import os

    import torch

    dtype = getattr(torch, cfg.dtype)
    L = spec.num_layers
    # Example sizes avoid 0/1 so torch.export does not specialize the dims.
    b, s, p = 2, 5, 3
    ids = torch.randint(0, spec.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.zeros(b, spec.num_kv_heads, p, spec.head_dim, dtype=dtype) for _ in range(2 * L)]
    Dim = torch.export.Dim
    # total = past + seq: bounded as torch.export proves it is (without the bound, its first attempt
    # fails a guard and the exporter exports again with this bound: seconds per export)
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=cfg.max_seq_len)
    total = Dim("total", max=2 * cfg.max_seq_len)
    plen = Dim("past", min=0, max=cfg.max_seq_len)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: plen} for _ in range(2 * L)))
    from .stack import MARK

    with torch.no_grad():
        program = torch.onnx.export(
            _wrapper(model, L, marks), (ids, mask, pos, *past), dynamic_shapes=dynamic, dynamo=True,
            opset_version=cfg.opset, external_data=True,
            input_names=[art.INPUT_IDS, art.ATTENTION_MASK, art.POSITION_IDS, *past_names(L)],
            output_names=[art.LOGITS, *present_names(L), *(f"{MARK}{j}" for j in range(len(marks or ())))],
            verbose=bool(os.environ.get("TRTC_EXPORT_VERBOSE")), report=False,
        )
    if program is None:
        raise TrtcInternalError("torch.onnx.export returned no program")
    return program
