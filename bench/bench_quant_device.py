"""Time the int4_awq weight recipe (AWQ scale search, clipping search, GPTQ, rank-64 correction)
on every linear of a SmolLM2-135M-shaped model, per torch device, and check that the devices
agree. Runs on a machine without trtc installed too (a GPU box with torch): the repo's packages
are mapped by path.

The weights and calibration statistics are synthetic (seeded numpy: the same on every machine),
in SmolLM2-135M's shapes (30 layers; q/k/v 576->576/192/192, o 576->576, gate/up 576->1536,
down 1536->576; 512 AWQ rows, Hessian from 4096 correlated rows with a few salient channels):
the real statistics are ~400 MB, too much to ship to a lent GPU. The algorithms' cost depends on
the shapes, not the values.

    python bench/bench_quant_device.py --devices cpu            # here
    python bench/bench_quant_device.py --devices cpu,cuda       # on a GPU machine: times both, compares
    python bench/bench_quant_device.py --layers 2 --devices cpu # quick
    python bench/bench_quant_device.py --shape llama-8b --layers 1 --devices cpu   # one 8B-shaped layer
    python bench/bench_quant_device.py ... --root OTHER_CHECKOUT  # another version of trtc, side by side

`--shape llama-8b` is Llama-3.1-8B's layer (4096 hidden, 1024 KV, 14336 intermediate, group 128);
its Hessians come from 2048 synthetic rows (the SmolLM2 shape keeps its 4096 rows and digest).
Each linear group shares one GPTQ factor and Hessian root, as quant_rewrite does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYERS, RANK = 30, 64
# hidden, kv, intermediate, group, rows of the synthetic Hessian
SHAPES = {"smollm2-135m": (576, 192, 1536, 64, 4096), "llama-8b": (4096, 1024, 14336, 128, 2048)}
HIDDEN, KV, INTER, GROUP, HROWS = SHAPES["smollm2-135m"]


def _import_trtc(root: Path | None = None):
    """trtc.compiler from this checkout (installed editable here; mapped by path elsewhere), or
    from `root` (another checkout) when given."""
    try:
        if root is not None:
            raise ImportError
        import trtc.compiler.quant_recipes  # noqa: F401
    except ImportError:
        root = root or ROOT
        for name, path in (("trtc", root / "trtc"), ("trtc.compiler", root / "compiler")):
            m = types.ModuleType(name)
            m.__path__ = [str(path)]
            sys.modules[name] = m
    from trtc.compiler import quant_algos, quant_recipes
    return quant_algos, quant_recipes


class Stats:
    """What the recipe reads of calibration (calibrate.ActStats' fields)."""

    def __init__(self, x: np.ndarray, rows: int = 512) -> None:
        self.rows = [x[:rows]]
        self.abs_sum = np.abs(x).sum(0)
        self.count = len(x)
        x64 = x.astype(np.float64) if x.shape[1] <= 4096 else x    # float32 above: 8B's 14336 channels
        self.hessian = (x64.T @ x64).astype(np.float32) / len(x)


def layer_data(layer: int) -> list[tuple[Stats, list[np.ndarray]]]:
    """(statistics, weights [K, N]) of each linear group of one layer, from a fixed seed."""
    rng = np.random.default_rng(1000 + layer)
    out = []
    for k, ns in ((HIDDEN, (HIDDEN, KV, KV)), (HIDDEN, (HIDDEN,)), (HIDDEN, (INTER, INTER)), (INTER, (HIDDEN,))):
        x = rng.standard_normal((HROWS, 16)) @ rng.standard_normal((16, k)) + 0.3 * rng.standard_normal((HROWS, k))
        x[:, :8] *= 20.0                                     # salient channels, as in real LLMs
        ws = [(rng.standard_normal((k, n)) * 0.05).astype(np.float32) for n in ns]
        out.append((Stats(x.astype(np.float32)), ws))
    return out


def run(qr, qa, layers: int) -> tuple[dict, list]:
    """The int4_awq recipe as quant_rewrite applies it (minus the graph): per group the AWQ search,
    per linear clipping + GPTQ and the low-rank factors. Returns times and the results."""
    grid = qr.grid_of("int4_awq", GROUP)
    t = {"awq": 0.0, "clip+gptq": 0.0, "low_rank": 0.0, "error_ratio": 0.0}
    results = []
    for layer in range(layers):
        for st, ws in layer_data(layer):
            t0 = time.perf_counter()
            s, alpha, _ = qr.awq_scales(np.concatenate(st.rows), st.abs_sum / st.count, ws, "int4_awq", GROUP)
            t1 = time.perf_counter()
            H = st.hessian / np.outer(s, s)
            eig = qr.hessian_root(H)
            shared = {"hessian": H}                   # GPTQ's factor made once per group, as quant_rewrite does
            t["low_rank"] += time.perf_counter() - t1
            for w in ws:
                ws_ = w * s[:, None]
                t2 = time.perf_counter()
                q, sc, lo = qr.quantize_weight(ws_, "int4_awq", grid, st, s, shared)
                t3 = time.perf_counter()
                e = ws_ - qr.dequantize(q, grid, sc, lo)
                a, b = qr.low_rank(e, eig, RANK)
                t4 = time.perf_counter()
                ratio = qr.error_ratio(e, a, b, H)     # output error left by the correction
                t["clip+gptq"] += t3 - t2
                t["low_rank"] += t4 - t3
                t["error_ratio"] += time.perf_counter() - t4
                results.append((alpha, q.astype(np.int8), ratio))
                print(f"  group K={w.shape[0]} N={w.shape[1]}: gptq {t3 - t2:.1f} s, low rank {t4 - t3:.1f} s",
                      file=sys.stderr, flush=True)
            t["awq"] += t1 - t0
            del shared, eig, H
    return t, results


def digest(results: list) -> str:
    h = hashlib.sha256()
    for alpha, q, *_ in results:
        h.update(np.float64(alpha).tobytes())
        h.update(q.tobytes())
    return h.hexdigest()[:16]


def compare(a: list, b: list) -> dict:
    """How far two devices' results are apart: alphas, rounded values, the correction."""
    q_diff = sum(int((x[1] != y[1]).sum()) for x, y in zip(a, b))
    q_all = sum(x[1].size for x in a)
    # the rank-r factors themselves may differ where singular values are nearly equal: compare
    # what they are for, the calibration output error they leave (quant_recipes.error_ratio)
    lr = max(abs(x[2] - y[2]) for x, y in zip(a, b))
    return {"alphas_equal": all(x[0] == y[0] for x, y in zip(a, b)),
            "int4_values_differing": q_diff, "int4_values": q_all,
            "low_rank_error_ratio_mean": [round(float(np.mean([x[2] for x in r])), 5) for r in (a, b)],
            "low_rank_error_ratio_max_abs_diff": lr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--root", type=Path, help="import trtc from this checkout instead (old vs new)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the one-layer warm-up run (CPU only)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    global HIDDEN, KV, INTER, GROUP, HROWS
    HIDDEN, KV, INTER, GROUP, HROWS = SHAPES[args.shape]
    qa, qr = _import_trtc(args.root)
    import torch
    rows, res = [], {}
    for dev in args.devices.split(","):
        os.environ["TRTC_QUANT_DEVICE"] = dev
        with qa.cpu_threads():                              # as the quantize stage runs it
            threads = torch.get_num_threads()
            if not args.no_warmup:
                run(qr, qa, 1)                              # warm-up (CUDA context, kernels)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            t, res[dev] = run(qr, qa, args.layers)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"{platform.machine()}, {threads} threads"
        row = {"device": dev, "name": name, "shape": args.shape, "trtc": str(args.root or ROOT), "layers": args.layers, "linears": len(res[dev]), "wall_s": round(wall, 1),
               **{k + "_s": round(v, 1) for k, v in t.items()}, "digest": digest(res[dev]),
               "torch": torch.__version__, "numpy": np.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
    devs = list(res)
    for d in devs[1:]:
        c = {"compare": f"{devs[0]} vs {d}", **compare(res[devs[0]], res[d])}
        rows.append(c)
        print(json.dumps(c), flush=True)
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
