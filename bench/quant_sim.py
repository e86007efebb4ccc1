"""Fake-quantization study on the float SmolLM2 in transformers: which weight/activation recipe
meets issue 3's accuracy targets before it is written into ONNX.

Same held-out text, windows and metrics as `trtc eval` (trtc/data/eval.txt, windows of 256,
top-1 agreement and perplexity vs the float model), same calibration text as `trtc build --quant`
(trtc/data/calib.txt, 128 windows of 128 spread over it). Each recipe quantizes a copy of the weights
(per nn.Linear, lm_head excluded) and optionally fake-quantizes the Linear inputs.

    python bench/quant_sim.py int8_rtn int8_gptq fp8 fp8_w fp8_a int4_rtn_g64 ...

Imports the installed trtc (`pip install -e .`): the quantizers are trtc.compiler.quant_algos.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from trtc.bundled import CALIB_TEXT, EVAL_TEXT, data_file
from trtc.compiler import quant_algos as qa
from trtc.compiler.load import resolve_source

INT8 = qa.Grid("int", -127, 127, 0)
FP8 = qa.Grid("fp8", 0, 0, 0)


def fq_fp8(x, scale):
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fq_mantissa(x, bits):
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2 ** (bits + 1)) / 2 ** (bits + 1), e)


MEMO = Path("/tmp/quant_sim_memo")


def memo_simulate(recipe, w, st):
    """simulate(), with weight-only results kept on disk (/tmp/quant_sim_memo) so that variants
    built on an expensive base recipe (AWQ/GPTQ) do not redo it."""
    import hashlib
    key = hashlib.sha256(recipe.encode() + w.tobytes() + st["H"].tobytes()).hexdigest()[:20]
    f = MEMO / f"{key}.npy"
    if f.exists():
        return np.load(f), None
    wq, act = simulate(recipe, w, st)
    if act is None:
        MEMO.mkdir(exist_ok=True)
        np.save(f, wq)
    return wq, act


def simulate(recipe, w, st):
    """recipe -> (dequantized weight [K, N] as the MatMul sees it, activation fake-quant or None)."""
    parts = recipe.split("_")
    kind = parts[0]
    opts = set(parts[1:])
    g = next((int(o[1:]) for o in opts if o.startswith("g") and o[1:].isdigit()), 64)
    if kind == "int8":
        grid = INT8
    elif kind == "fp8":
        grid = FP8
    elif kind == "int4":
        grid = qa.Grid("int", -8, 7, g)
    elif kind == "int4a":
        grid = qa.Grid("int", 0, 15, g)
    nlr = next((int(o[2:]) for o in opts if o.startswith("lr") and o[2:].isdigit()), 0)
    if nlr:    # activation-aware low-rank float correction of the weight error (x @ A) @ B
        wq, act = memo_simulate("_".join(p for p in parts if p != f"lr{nlr}"), w, st)
        A, B = qa.low_rank(w - wq, st["H"], nlr)
        return wq + A @ B, act
    nout = next((int(o[1:]) for o in opts if o.startswith("o") and o[1:].isdigit()), 0)
    if nout:   # outlier input channels (largest calibration amax) kept in float, the rest quantized
        out_idx = np.argsort(st["camax"])[-nout:]
        keep = np.setdiff1d(np.arange(w.shape[0]), out_idx)
        sub = dict(st, rows=st["rows"][:, keep], abs=st["abs"][keep], camax=st["camax"][keep],
                   H=st["H"][np.ix_(keep, keep)])
        wq_k, act_k = simulate("_".join(p for p in parts if p != f"o{nout}"), w[keep], sub)
        wq = w.copy()
        wq[keep] = wq_k
        if act_k is None:
            return wq, None
        ki = torch.from_numpy(keep)

        def act(t):
            t = t.clone()
            t[..., ki] = act_k(t[..., ki])
            return t
        return wq, act
    x = st["rows"]
    s = np.ones(w.shape[0], np.float32)
    if "awq" in opts:
        def qdq(v):
            q, sc, z = qa.rtn(v, grid)
            return qa.dequantize(q, grid, sc, z)
        s, alpha, ratio = qa.awq_scales(x, st["abs"], [w], qdq)
    if "sq" in opts:     # SmoothQuant: s = camax^a / wmax^(1-a), a searched with fp8 x and w
        wmax = np.maximum(np.abs(w).max(1), 1e-8)
        cam = np.maximum(st["camax"], 1e-8)
        ref = x @ w
        best = (np.inf, None)
        for a in np.linspace(0, 1, 11):
            ss = (cam ** a / wmax ** (1 - a)).astype(np.float32)
            ss = ss / np.sqrt(ss.max() * ss.min())
            xs = torch.from_numpy(x / ss)
            xa = float(np.max(cam / ss)) / 448
            xq = fq_fp8(xs, xa).numpy()
            q, sc, z = qa.rtn(w * ss[:, None], grid)
            loss = float(((xq @ qa.dequantize(q, grid, sc, z) - ref) ** 2).sum())
            if loss < best[0]:
                best = (loss, ss)
        s = best[1]
    ws = w * s[:, None]
    clip = 1.0
    if "clip" in opts:
        clip = qa.clip_search(ws, x / s, grid)
    if "gptq" in opts:
        H = st["H"] / np.outer(s, s)
        damp = next((float(o[4:]) for o in opts if o.startswith("damp")), 0.01)
        q, sc, z = qa.gptq(ws, H, grid, clip=None if "clip" not in opts else clip, damp=damp,
                           act_order="natural" not in opts)
    else:
        q, sc, z = qa.rtn(ws, grid, clip)
    wq = qa.dequantize(q, grid, sc, z) / s[:, None]
    act = None
    if kind == "fp8" and "w" not in opts:
        amax = float(np.max(st["camax"] / s))
        amax *= next((float(o[1:]) for o in opts if o.startswith("x") and o[1:].replace(".", "").isdigit()), 1.0)
        st_s = torch.from_numpy(s)
        if "nosub" in opts:      # 3 mantissa bits, unbounded exponent: the rounding fp8 cannot avoid
            act = lambda t: fq_mantissa(t / st_s, 3) * st_s
        elif "tok" in opts:      # a dynamic scale per token (row)
            act = lambda t: fq_fp8(t / st_s, t.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448) * st_s
        else:
            act = lambda t: fq_fp8(t / st_s, amax / 448) * st_s
    if "a" in opts:          # activations only
        wq = w
    return wq, act


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(model_dir)


def windows(tok, path, W, n=None):
    """Eval: consecutive windows (as trtc eval); calibration (n given): n windows spread evenly
    over the text (as trtc build --quant)."""
    ids = tok(Path(path).read_text(encoding="utf-8"))["input_ids"]
    if n:
        total = len(ids) // W
        return [ids[i * W:(i + 1) * W] for i in np.linspace(0, total - 1, min(n, total)).round().astype(int)]
    out = [ids[i:i + W] for i in range(0, len(ids), W)]
    return [w for w in out if len(w) >= 2]


@torch.no_grad()
def logits_of(m, wins):
    return [m(torch.tensor([w])).logits[0].float() for w in wins]


def score(ref, got, wins):
    nll, agree, tot = 0.0, 0, 0
    for r, g, w in zip(ref, got, wins):
        t = torch.tensor(w[1:])
        lp = torch.log_softmax(g[:-1].double(), -1)
        nll += float(-lp[torch.arange(len(t)), t].sum())
        agree += int((r[:-1].argmax(-1) == g[:-1].argmax(-1)).sum())
        tot += len(t)
    return agree / tot, float(np.exp(nll / tot))


def linears(m):
    return [(n, mod) for n, mod in m.named_modules()
            if isinstance(mod, torch.nn.Linear) and not n.endswith("lm_head")]


class _Stop(Exception):
    pass


@torch.no_grad()
def calibrate(m, wins, only=None, stop_after=None):
    """Per Linear: X^T X [K, K] (float64), mean |x| [K], amax, sampled rows. `only`: names to
    collect; `stop_after`: a module after whose forward the pass stops (sequential calibration)."""
    st = {}
    hooks = []
    if stop_after is not None:
        def stop(*_):
            raise _Stop
        hooks.append(stop_after.register_forward_hook(stop))
    for n, mod in linears(m):
        if only is not None and n not in only:
            continue
        def hook(mod, args, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = st.setdefault(n, {"H": 0, "abs": 0, "amax": 0.0, "n": 0, "rows": []})
            s["H"] = s["H"] + x.T @ x
            s["abs"] = s["abs"] + x.abs().sum(0)
            s["amax"] = max(s["amax"], float(x.abs().max()))
            s["camax"] = torch.maximum(torch.as_tensor(s.get("camax", 0.0)).double(), x.abs().amax(0))
            s["n"] += x.shape[0]
            s["rows"].append(x[::4].float())
        hooks.append(mod.register_forward_pre_hook(hook))
    for w in wins:
        try:
            m(torch.tensor([w]))
        except _Stop:
            pass
    for h in hooks:
        h.remove()
    for s in st.values():
        s["H"] = (s["H"] / s["n"]).numpy()
        s["abs"] = (s["abs"] / s["n"]).numpy()
        s["camax"] = s["camax"].numpy()
        s["rows"] = torch.cat(s["rows"]).numpy()
    return st


class KV:
    """Fake 8-bit KV cache: post-rotary keys (wrapped apply_rotary_pos_emb) and values (v_proj
    output), with per-layer / per-head / per-channel scales calibrated as amax."""
    mode = None          # None | "calib" | (dtype, granularity)
    amax = {}
    i = 0

    @classmethod
    def install(cls, m):
        import transformers.models.llama.modeling_llama as ml
        orig = ml.apply_rotary_pos_emb
        L = m.config.num_hidden_layers

        def rope(q, k, cos, sin, *a, **kw):
            q, k = orig(q, k, cos, sin, *a, **kw)
            layer = cls.i % L
            cls.i += 1
            return q, cls.apply(("k", layer), k)
        ml.apply_rotary_pos_emb = rope
        for layer, blk in enumerate(m.model.layers):
            D = m.config.head_dim if getattr(m.config, "head_dim", None) else m.config.hidden_size // m.config.num_attention_heads
            def vhook(mod, args, out, layer=layer, D=D):
                B, S, _ = out.shape
                v = out.view(B, S, -1, D).transpose(1, 2)
                return cls.apply(("v", layer), v).transpose(1, 2).reshape(B, S, -1)
            blk.self_attn.v_proj.register_forward_hook(vhook)

    @classmethod
    def apply(cls, key, t):            # t [B, H, S, D]
        if cls.mode is None:
            return t
        if cls.mode == "calib":
            a = t.detach().abs().amax(dim=(0, 2))            # [H, D]
            cls.amax[key] = torch.maximum(cls.amax.get(key, a), a)
            return t
        dtype, gran = cls.mode
        a = cls.amax[key]
        if gran == "layer":
            a = a.max()
        elif gran == "head":
            a = a.amax(-1, keepdim=True)[None, :, None]
        else:
            a = a[None, :, None]
        if dtype == "fp8":
            return fq_fp8(t, a / 448)
        sc = a / 127
        return (t / sc).round().clamp(-127, 127) * sc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--model", default=None, help="HF dir, .gguf or bundled name [default: the bundled SmolLM2]")
    ap.add_argument("--calib", default=str(data_file(CALIB_TEXT)))
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval", default=str(data_file(EVAL_TEXT)), help="held-out text to score")
    a = ap.parse_args()
    a.model = str(resolve_source(a.model))
    torch.set_num_threads(2)
    m, tok = load(a.model)
    ev = windows(tok, a.eval, 256)
    cal = windows(tok, a.calib, 128, a.calib_windows)
    t0 = time.time()
    ref = logits_of(m, ev)
    KV.install(m)
    import hashlib
    import pickle
    key = hashlib.sha256(repr((a.model, a.calib, a.calib_windows)).encode()).hexdigest()[:12]
    cpath = Path(f"/tmp/quant_sim_stats_{key}.pkl")
    if cpath.exists():
        st, KV.amax = pickle.loads(cpath.read_bytes())
    else:
        st = calibrate(m, cal)
        KV.mode = "calib"
        logits_of(m, cal)
        KV.mode = None
        cpath.write_bytes(pickle.dumps((st, KV.amax)))
    KV.mode = "calib"
    logits_of(m, cal)
    KV.mode = None
    print(f"reference + calibration {time.time() - t0:.0f} s; float ppl {score(ref, ref, ev)[1]:.3f}", flush=True)
    orig = {n: mod.weight.detach().clone() for n, mod in linears(m)}
    print(f"| recipe | top-1 agreement | perplexity | quantize s |\n|---|---|---|---|", flush=True)
    float_ppl = score(ref, ref, ev)[1]
    cache = {}
    for r in a.recipes:
        t0 = time.time()
        hooks = []
        if r.startswith("kv_"):
            _, dt, gran = r.split("_")
            KV.mode = (dt, gran)
            agree, ppl = score(ref, logits_of(m, ev), ev)
            KV.mode = None
            print(f"| {r} | {100 * agree:.2f}% | {ppl:.3f} ({100 * (ppl / float_ppl - 1):+.2f}%) | 0 |", flush=True)
            continue
        r, _, only = r.partition("@")
        skip = only.startswith("!")
        only = only.lstrip("!")
        seq = "_seq" in r          # sequential: layer i calibrated on the model with layers < i quantized
        for n, mod in linears(m):
            mod.weight.data = orig[n]
        for n, mod in linears(m):
            if only and ((only in n) == skip):
                continue
            w = orig[n].T.numpy().astype(np.float32)            # ONNX layout [K, N]
            if seq and (r, n) not in cache:
                layer = int(n.split("layers.")[1].split(".")[0])
                names = [x for x, _ in linears(m) if f"layers.{layer}." in x]
                if n == names[0]:
                    st_seq = calibrate(m, cal, set(names), m.model.layers[layer])
                cache[(r, n)] = simulate(r.replace("_seq", ""), w, st_seq[n])
            if (r, n) not in cache:
                cache[(r, n)] = memo_simulate(r, w, st[n])
            wq, act = cache[(r, n)]
            mod.weight.data = torch.from_numpy(np.ascontiguousarray(wq.T))
            if act is not None:
                hooks.append(mod.register_forward_pre_hook(lambda mod, args, act=act: (act(args[0]),)))
        tq = time.time() - t0
        got = logits_of(m, ev)
        for h in hooks:
            h.remove()
        agree, ppl = score(ref, got, ev)
        print(f"| {r}{'@' + ('!' if skip else '') + only if only else ''} | {100 * agree:.2f}% | {ppl:.3f} ({100 * (ppl / float_ppl - 1):+.2f}%) | {tq:.0f} |", flush=True)
    for n, mod in linears(m):
        mod.weight.data = orig[n]


if __name__ == "__main__":
    main()
