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


def _wrapper(model, num_layers: int):
    import torch
    from transformers.cache_utils import DynamicCache

    class CausalLMWithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            res = [out.logits]
            for layer in out.past_key_values.layers:
                res += [layer.keys, layer.values]
            return tuple(res)

    return CausalLMWithCache(model).eval()


def trace(loaded: LoadedModel, cfg: ExportConfig, out_dir: Path) -> TracedGraph:
    """Export the model to `out_dir/traced.onnx` (+ traced.onnx.data)."""
    import torch

    # The family fixes at export what depends on the engine's length (LongRoPE's factor set) and
    # swaps what cannot be traced ahead of time (data-dependent expert loops) for its equivalent.
    spec = loaded.adapter.for_export(loaded.spec, cfg.max_seq_len)
    model = load_torch_model(loaded, cfg.dtype)
    loaded.adapter.prepare_trace(model, spec)
    dtype = getattr(torch, cfg.dtype)
    L = spec.num_layers
    # Example sizes avoid 0/1 so torch.export does not specialize the dims.
    b, s, p = 2, 5, 3
    ids = torch.randint(0, spec.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.zeros(b, spec.num_kv_heads, p, spec.head_dim, dtype=dtype) for _ in range(2 * L)]
    Dim = torch.export.Dim
    batch, seq, total = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=cfg.max_seq_len), Dim("total")
    plen = Dim("past", min=0, max=cfg.max_seq_len)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: plen} for _ in range(2 * L)))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "traced.onnx"
    with torch.no_grad():
        program = torch.onnx.export(
            _wrapper(model, L), (ids, mask, pos, *past), dynamic_shapes=dynamic, dynamo=True,
            opset_version=cfg.opset, external_data=True,
            input_names=[art.INPUT_IDS, art.ATTENTION_MASK, art.POSITION_IDS, *past_names(L)],
            output_names=[art.LOGITS, *present_names(L)], verbose=bool(__import__('os').environ.get('TRTC_EXPORT_VERBOSE')), report=False,
        )
    if program is None:
        raise TrtcInternalError("torch.onnx.export returned no program")
    program.save(str(path), external_data=True)
    del program, model
    gc.collect()
    return TracedGraph(onnx_path=path, spec=spec, config=cfg)
