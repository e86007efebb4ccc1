"""Peak memory of one activation group's Hessian steps at a real model's width: the low-rank root
(quant_recipes.hessian_root) and a GPTQ-rounded linear (quant_recipes.quantize_weight, int4_awq),
called in quant_rewrite.py's order, on a synthetic Hessian of size K (14336 = Llama-3.1-8B's
down_proj input, 1.6 GB per [K, K] float64 matrix).

  python bench/bench_quant_hessian_memory.py [--k 14336] [--n 1024]

Prints the process's peak RSS after each step (ru_maxrss). Run it at two commits to compare
(the [K, K] copies are what differ; N only sets the weight's size).
"""

from __future__ import annotations

import argparse
import resource
import time
from types import SimpleNamespace


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=14336)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=512)
    a = ap.parse_args()

    import numpy as np

    from trtc.compiler.quant_algos import cpu_threads
    from trtc.compiler.quant_recipes import grid_of, hessian_root, quantize_weight

    rng = np.random.default_rng(0)
    k, n = a.k, a.n
    t0 = time.perf_counter()
    with cpu_threads():
        # An SPD Hessian with a spread of channel scales, built in blocks (no [rows, K] x [K, K] temporaries).
        B = rng.standard_normal((k, 256)).astype(np.float64) * rng.uniform(0.1, 3.0, k)[:, None]
        H = B @ B.T
        H.flat[::k + 1] += 1.0
        del B
        rows = rng.standard_normal((a.rows, k)).astype(np.float32)
        st = SimpleNamespace(hessian=H, rows=[rows])
        s = rng.uniform(0.5, 2.0, k).astype(np.float32)      # AWQ scales
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
        print(f"| step | peak RSS GiB | s |\n|---|---:|---:|\n| inputs (H, rows, w) | {_peak_gib():.2f} | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)
        shared: dict = {}
        Hs = st.hessian / np.outer(s, s)                      # quant_rewrite._group_input's inp.H
        shared["hessian"] = Hs                                # what quant_rewrite shares (older code ignores it)
        root = hessian_root(Hs)
        print(f"| scaled H + low-rank root | {_peak_gib():.2f} | {time.perf_counter() - t0:.1f} |", flush=True)
        quantize_weight(w, "int4_awq", grid_of("int4_awq", 128), st, s, shared)
        print(f"| + GPTQ factor and rounding of one linear | {_peak_gib():.2f} | {time.perf_counter() - t0:.1f} |",
              flush=True)
        del root


if __name__ == "__main__":
    main()
