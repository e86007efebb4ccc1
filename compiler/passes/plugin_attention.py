"""plugin_attention: the native attention of each layer -> trtc's plugins (`--attention plugin`).

Runs after the native lowering (kv_cache_scatter, fold_repeat_kv, attention_mask_from_positions,
rotary_cache) and matches, per layer i, exactly what those passes leave:

    q_rot  = RotaryEmbedding(q [B, Hq, S, D], cos_cache, sin_cache, position_ids)   (interleaved 0)
    k_rot  = RotaryEmbedding(k [B, Hkv, S, D], cos_cache, sin_cache, position_ids)
    present.i.key   = TensorScatter(past_key_values.i.key,   k_rot, write_idx)        -> graph output
    present.i.value = TensorScatter(past_key_values.i.value, v,     write_idx)        -> graph output
    out    = Attention(q_rot, present.i.key, present.i.value, mask)   [B, Hq, S, D]

and rewrites it to the plugins declared in plugins/schema.py (domain "trtc"), on packed tokens:

    q_rot_t, present_kv_pool.i = RopeKvAppend(q_t, k_t, v_t, cos32, sin32, block_tables, cu_seqlens_q,
                                              seq_lens, kv_scales, past_kv_pool.i)
    out_t  = PagedAttention(q_rot_t, present_kv_pool.i, block_tables, cu_seqlens_q, seq_lens, kv_scales)
    out    = Transpose(Reshape(out_t, [B, S, Hq, D]))

where x_t = Reshape(Transpose(x) to [B, S, H, D], [B*S, H, D]). Graph I/O changes: the per-layer
caches past_key_values.i.{key,value} / present.i.{key,value} [B, Hkv, max_seq, D] become one block
pool per layer, past_kv_pool.i -> present_kv_pool.i [num_blocks, 2, Hkv, block_size, D] (updated in
place by TensorRT: the plugin declares the output aliased), plus `block_tables` int32 [B, max_blocks]
(max_blocks = ceil(max_seq_len / block_size)), filled by the runtime's paged KV manager, and
`cu_seqlens_q` int32 [batch+1]. The tokens are PACKED: the runtime feeds input_ids/position_ids as
[1, tokens], the sequences back to back with no padding (the graph's token-wise ops see one row; only
the plugins need sequence boundaries, from cu_seqlens_q), so prompts of different lengths cost their
own lengths, not batch x longest. seq_lens (cache length after the append) is derived in the graph:
position_ids[0, cu[b+1] - 1] + 1, so each sequence's positions must be consecutive.

The rewrite is all or nothing: a layer that does not match (near-miss: interleaved or partial rotary,
per-step cos/sin, an Attention with softcap or fed by anything but the scattered cache, another
reader of the cache) is a TrtcError naming the node and the reason, with the graph left unchanged,
never a silently mixed or native graph. Sliding-window attention is refused the same way (the
plugins are full causal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trtc.artifact import BLOCK_TABLES, CU_SEQLENS, DEFAULT_KV_BLOCK_SIZE, INPUT_IDS, PAST_PREFIX, POSITION_IDS, max_blocks, past_name, pool_names
from trtc.errors import TrtcError
from trtc.plugins.schema import NAMESPACE, PAGED_ATTENTION, ROPE_KV_APPEND, PluginSpec

from . import PassContext, register_pass
from ._match import graph_input, producer

# Attributes that TensorRT's ONNX parser reads to find a tensorrt.plugin plugin (ONNX node op =
# plugin name); the reference backend ignores them. See plugins/tensorrt_plugin.py.
TRT_NODE_ATTRS = ("plugin_namespace", "plugin_version", "aot")


@dataclass
class LayerMatch:
    layer: int
    attn: object            # gs.Node Attention
    q: object               # [B, Hq, S, D] before rotation
    k: object               # [B, Hkv, S, D] before rotation
    v: object               # [B, Hkv, S, D]
    cos: object             # gs.Constant [max_seq_len, D/2]
    sin: object
    past_k: object          # graph inputs / outputs replaced by the pool
    past_v: object
    present_k: object
    present_v: object
    softmax_scale: float


class _Miss(Exception):
    pass


def _rope(t, graph, ctx: PassContext, what: str):
    import onnx_graphsurgeon as gs

    node = producer(t)
    if node is None or node.op != "RotaryEmbedding":
        raise _Miss(f"{what} is not produced by RotaryEmbedding")
    if len(node.inputs) != 4 or node.inputs[3].name != POSITION_IDS or graph_input(graph, POSITION_IDS) is None:
        raise _Miss(f"{node.name}: rotary without a position-indexed cos/sin cache (rotary_cache did not apply)")
    if int(node.attrs.get("interleaved", 0)) != 0:
        raise _Miss(f"{node.name}: interleaved rotary (the plugins rotate halves, NeoX/HF Llama style)")
    dim = int(node.attrs.get("rotary_embedding_dim", 0) or 0)
    if dim not in (0, ctx.spec.head_dim):
        raise _Miss(f"{node.name}: partial rotary ({dim} of {ctx.spec.head_dim} dims) is not supported")
    cos, sin = node.inputs[1], node.inputs[2]
    want = (ctx.max_seq_len, ctx.spec.head_dim // 2)
    for c in (cos, sin):
        if not isinstance(c, gs.Constant) or tuple(c.values.shape) != want:
            raise _Miss(f"{node.name}: cos/sin cache {c.name} is not a constant of shape {want}")
    if len(node.inputs[0].shape or ()) != 4:
        raise _Miss(f"{node.name}: input is not 4D [B, H, S, D]")
    return node


def _scatter(t, graph, kind: str):
    node = producer(t)
    if node is None or node.op != "TensorScatter":
        raise _Miss(f"attention {kind} is not a TensorScatter-updated cache")
    past = node.inputs[0]
    if not past.name.startswith(PAST_PREFIX) or not past.name.endswith("." + kind) \
            or graph_input(graph, past.name) is None:
        raise _Miss(f"{node.name}: updates {past.name}, not a past_key_values.*.{kind} graph input")
    if int(node.attrs.get("axis", -2)) != -2 or node.attrs.get("mode", "linear") != "linear":
        raise _Miss(f"{node.name}: not a linear scatter along the sequence axis")
    return node, past, node.outputs[0]


def _only_readers(t, allowed, graph, what: str) -> None:
    extra = [n.name for n in t.outputs if n not in allowed]
    if extra:
        raise _Miss(f"{what} {t.name} is also read by {', '.join(extra)}")


def _match(attn, graph, ctx: PassContext) -> LayerMatch:
    if len(attn.outputs) != 1 or len(attn.inputs) not in (3, 4):
        raise _Miss("not the single-output Attention(q, k, v[, mask]) form")
    if float(attn.attrs.get("softcap", 0.0) or 0.0) != 0.0:
        raise _Miss("softcap is not supported by PagedAttention")
    if any(k in attn.attrs for k in ("q_num_heads", "kv_num_heads")):
        raise _Miss("3D Attention form")
    rope_q = _rope(attn.inputs[0], graph, ctx, "query")
    scat_k, past_k, present_k = _scatter(attn.inputs[1], graph, "key")
    scat_v, past_v, present_v = _scatter(attn.inputs[2], graph, "value")
    rope_k = _rope(scat_k.inputs[1], graph, ctx, "key")
    if (rope_k.inputs[1].name, rope_k.inputs[2].name) != (rope_q.inputs[1].name, rope_q.inputs[2].name):
        raise _Miss("query and key use different cos/sin caches")
    layer = past_k.name.split(".")[1]
    if past_v.name != past_name(layer, "value"):
        raise _Miss(f"key cache {past_k.name} and value cache {past_v.name} are of different layers")
    outs = {t.name for t in graph.outputs}
    for present in (present_k, present_v):
        if present.name not in outs:
            raise _Miss(f"{present.name} is not a graph output")
        _only_readers(present, (attn,), graph, "updated cache")
    _only_readers(attn.inputs[0], (attn,), graph, "rotated query")
    _only_readers(scat_k.inputs[1], (scat_k,), graph, "rotated key")
    scale = attn.attrs.get("scale")
    return LayerMatch(layer=int(layer), attn=attn, q=rope_q.inputs[0], k=rope_k.inputs[0], v=scat_v.inputs[1],
                      cos=rope_q.inputs[1], sin=rope_q.inputs[2], past_k=past_k, past_v=past_v,
                      present_k=present_k, present_v=present_v,
                      softmax_scale=float(scale) if scale else 1.0 / math.sqrt(ctx.spec.head_dim))


def _shape_readers(graph, past_names: set[str], matched_nodes: set[int]):
    """Other readers of the cache inputs: Shape nodes (batch or static dims) can be rewired; anything
    else is a miss. Returns [(node, start, end)]."""
    out = []
    for node in graph.nodes:
        if id(node) in matched_nodes or not any(t.name in past_names for t in node.inputs):
            continue
        if node.op != "Shape":
            raise _Miss(f"{node.name} ({node.op}) reads a KV cache input")
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", 4))
        start, end = start % 4 if start < 0 else start, end % 4 if end < 0 else min(end, 4)
        if start == 0 and end > 1:
            raise _Miss(f"{node.name}: Shape over batch and cache dims at once")
        out.append((node, start, end))
    return out


def _node(graph, op, name, inputs, out_name, dtype, shape=None, attrs=None, domain=None):
    import onnx_graphsurgeon as gs

    out = gs.Variable(out_name, dtype=dtype, shape=shape)
    node = gs.Node(op, name, attrs=attrs or {}, inputs=inputs, outputs=[out])
    if domain:
        node.domain = domain
    graph.nodes.append(node)
    return out


def _plugin_attrs(spec: PluginSpec, **given) -> dict:
    a = spec.attr_values(reference=True, **{k: v for k, v in given.items() if k in {x.name for x in spec.attrs}})
    return {**a, "plugin_namespace": spec.namespace, "plugin_version": spec.version, "aot": 1}


def _refuse_spec_features(spec) -> None:
    """What the plugins do not implement, named by the ModelSpec field that declares it."""
    why = []
    if spec.attn_logit_softcapping:
        why.append(f"soft-capped attention scores (attn_logit_softcapping {spec.attn_logit_softcapping})")
    if spec.nope_layers:
        why.append(f"layers without rotary embedding (nope_layers {list(spec.nope_layers)})")
    if spec.rotary_dim:
        why.append(f"partial rotary (rotary_dim {spec.rotary_dim} of head_dim {spec.head_dim})")
    if why:
        raise TrtcError(f"--attention plugin: this {spec.family} model has {'; '.join(why)}, which trtc's "
                        f"RopeKvAppend/PagedAttention plugins do not implement; use --attention native")


@register_pass("plugin_attention")
def plugin_attention(graph, ctx: PassContext):
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs

    spec = ctx.spec
    _refuse_spec_features(spec)
    if spec.sliding_window and spec.sliding_window < ctx.max_seq_len:
        raise TrtcError(f"--attention plugin: {spec.family} uses sliding-window attention (window "
                        f"{spec.sliding_window} < max-seq-len {ctx.max_seq_len}), which trtc's PagedAttention "
                        f"plugin does not implement; use --attention native, or --max-seq-len {spec.sliding_window}")
    graph.cleanup(remove_unused_graph_inputs=False)   # dead readers (HF's repeat_kv, mask) are not readers
    attns = [n for n in graph.nodes if n.op == "Attention"]
    if not attns:
        raise TrtcError("--attention plugin: the graph has no Attention node to lower; use --attention native")
    matches = []
    for attn in attns:
        try:
            matches.append(_match(attn, graph, ctx))
        except _Miss as e:
            raise TrtcError(f"--attention plugin: Attention node {attn.name}: {e}; this model's graph cannot be "
                            f"lowered to trtc's plugins yet, use --attention native") from None
    if sorted(m.layer for m in matches) != list(range(spec.num_layers)):
        raise TrtcError(f"--attention plugin: matched layers {sorted(m.layer for m in matches)} of "
                        f"{spec.num_layers}; use --attention native")
    past_names = {t.name for m in matches for t in (m.past_k, m.past_v)}
    scatters = {id(producer(t)) for m in matches for t in (m.present_k, m.present_v)}
    try:
        shape_readers = _shape_readers(graph, past_names, scatters)
    except _Miss as e:
        raise TrtcError(f"--attention plugin: {e}; use --attention native") from None

    # ---- the graph matches: rewrite (nothing above modified it) ----
    hq, hkv, d, bs = spec.num_heads, spec.num_kv_heads, spec.head_dim, ctx.kv_block_size or DEFAULT_KV_BLOCK_SIZE
    act = matches[0].past_k.dtype
    i64, i32 = np.int64, np.int32
    ids, pos = graph_input(graph, INPUT_IDS), graph_input(graph, POSITION_IDS)

    def const(name, v):
        return gs.Constant(f"plugin_{name}", np.asarray(v))

    ids_shape = _node(graph, "Shape", "plugin_ids_shape", [ids], "plugin_ids_shape", i64, [2])   # [1, tokens]
    cu = gs.Variable(CU_SEQLENS, dtype=i32, shape=["batch+1"])
    # seq_lens[b] = positions[cu[b+1] - 1] + 1: the cache length of sequence b after this step
    cu64 = _node(graph, "Cast", "plugin_cu64", [cu], "plugin_cu64", i64, ["batch+1"], {"to": onnx.TensorProto.INT64})
    ends = _node(graph, "Slice", "plugin_cu_ends", [cu64, const("one", i64([1])), const("big", i64([2 ** 62])),
                                                     const("axis0", i64([0]))], "plugin_cu_ends", i64, ["batch"])
    last_tok = _node(graph, "Sub", "plugin_last_tok", [ends, const("one_i", i64(1))], "plugin_last_tok", i64, ["batch"])
    flat_pos = _node(graph, "Reshape", "plugin_flat_pos", [pos, const("flat", i64([-1]))], "plugin_flat_pos", i64,
                     ["tokens"])
    last = _node(graph, "Gather", "plugin_last_pos", [flat_pos, last_tok], "plugin_last_pos", i64, ["batch"],
                 {"axis": 0})
    sl = _node(graph, "Add", "plugin_seq_lens64", [last, const("one_p", i64(1))], "plugin_seq_lens64", i64, ["batch"])
    sl = _node(graph, "Cast", "plugin_seq_lens", [sl], "seq_lens", i32, ["batch"], {"to": onnx.TensorProto.INT32})
    scales = const("kv_scales", np.ones(2, np.float32))   # read only for fp8 pools (not emitted yet)
    bt = gs.Variable(BLOCK_TABLES, dtype=i32, shape=["batch", max_blocks(ctx.max_seq_len, bs)])
    q_shape, kv_shape = const("q_tok_shape", i64([-1, hq, d])), const("kv_tok_shape", i64([-1, hkv, d]))
    out_shape = _node(graph, "Concat", "plugin_out_shape", [ids_shape, const("hd", i64([hq, d]))],
                      "plugin_out_shape", i64, [4], {"axis": 0})
    tables: dict[str, gs.Constant] = {}

    def f32_table(c):
        if c.name not in tables:
            tables[c.name] = gs.Constant(f"plugin_{c.name}_f32", np.ascontiguousarray(c.values, dtype=np.float32))
        return tables[c.name]

    def tokens(x, shape, tag):   # [B, H, S, D] -> [B*S, H, D]
        src = producer(x)
        if src is not None and src.op == "Transpose" and list(src.attrs.get("perm", [])) == [0, 2, 1, 3]:
            bshd = src.inputs[0]      # the projection's [B, S, H, D] view: no transpose needed
        else:
            bshd = _node(graph, "Transpose", f"{tag}_bshd", [x], f"{tag}_bshd", x.dtype, None, {"perm": [0, 2, 1, 3]})
        return _node(graph, "Reshape", f"{tag}_tok", [bshd, shape], f"{tag}_tok", x.dtype, None)

    attrs = dict(num_q_heads=hq, num_kv_heads=hkv, head_size=d, block_size=bs, kv_cache_dtype="auto")
    new_inputs, new_outputs = {}, {}
    for m in sorted(matches, key=lambda m: m.layer):
        i = m.layer
        pin, pout = pool_names(spec.num_layers)[i]
        pool_shape = ["num_blocks", 2, hkv, bs, d]
        pool_in = gs.Variable(pin, dtype=act, shape=pool_shape)
        pool_out = gs.Variable(pout, dtype=act, shape=pool_shape)
        tag = f"plugin_l{i}"
        args = {"q": tokens(m.q, q_shape, f"{tag}_q"), "k": tokens(m.k, kv_shape, f"{tag}_k"),
                "v": tokens(m.v, kv_shape, f"{tag}_v"), "rope_cos": f32_table(m.cos), "rope_sin": f32_table(m.sin),
                "block_tables": bt, "cu_seqlens_q": cu, "seq_lens": sl, "kv_scales": scales, "kv_pool": pool_in}
        q_rot = gs.Variable(f"{tag}_q_rot", dtype=act, shape=["tokens", hq, d])
        app = gs.Node(ROPE_KV_APPEND.name, f"{tag}_rope_kv_append", domain=NAMESPACE,
                      attrs=_plugin_attrs(ROPE_KV_APPEND, **attrs),
                      inputs=[args[ts.name] for ts in ROPE_KV_APPEND.inputs], outputs=[q_rot, pool_out])
        args.update(q=q_rot, kv_pool=pool_out)
        out_t = gs.Variable(f"{tag}_attn_tok", dtype=act, shape=["tokens", hq, d])
        att = gs.Node(PAGED_ATTENTION.name, f"{tag}_paged_attention", domain=NAMESPACE,
                      attrs=_plugin_attrs(PAGED_ATTENTION, **attrs, softmax_scale=m.softmax_scale),
                      inputs=[args[ts.name] for ts in PAGED_ATTENTION.inputs], outputs=[out_t])
        graph.nodes.extend([app, att])
        out = m.attn.outputs[0]
        m.attn.outputs = []
        bshd = _node(graph, "Reshape", f"{tag}_attn_bshd", [out_t, out_shape], f"{tag}_attn_bshd", act, None)
        graph.nodes.append(gs.Node("Transpose", f"{tag}_attn_bhsd", attrs={"perm": [0, 2, 1, 3]},
                                   inputs=[bshd], outputs=[out]))
        new_inputs[m.past_k.name], new_inputs[m.past_v.name] = pool_in, None
        new_outputs[m.present_k.name], new_outputs[m.present_v.name] = pool_out, None
        m.present_k.outputs.clear()
        m.present_v.outputs.clear()

    static = {1: hkv, 2: ctx.max_seq_len, 3: d}   # cache dims other than batch
    for node, start, end in shape_readers:
        if end <= 1:
            node.inputs[0] = ids            # Shape(cache)[0:1] == Shape(input_ids)[0:1] == [B]
        else:
            node.op, node.attrs = "Identity", {}
            node.inputs = [const(f"{node.name}_static", i64([static[a] for a in range(start, end)]))]

    def swap(tensors, repl):
        out = []
        for t_ in tensors:
            if t_.name not in repl:
                out.append(t_)
            elif repl[t_.name] is not None:
                out.append(repl[t_.name])
        return out

    graph.inputs = swap(graph.inputs, new_inputs)
    graph.inputs += [bt, cu]
    graph.outputs = swap(graph.outputs, new_outputs)
    graph.cleanup(remove_unused_graph_inputs=False)
    ctx.stats["plugin_attention"] = len(matches)
    return graph
