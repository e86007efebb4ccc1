"""Time (and optionally profile) the first few decoder-layer units of `--quant` on a real export:
calibration of each slice on ONNX Runtime, then its linears quantized, exactly as
compiler/quantize.py does, without writing a graph. The whole quantize stage is about
(units of the model) x (per-unit seconds printed here).

  python bench/bench_quant_layers.py --export EXPORT_DIR [--quant int4_awq] [--units 3]
         [--profile out.prof] [--threads N]

EXPORT_DIR is a float export dir (`trtc export --output DIR`, or an entry of the engine cache's
exports/). Prints one line per unit, then (with --profile) the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--quant", default="int4_awq")
    ap.add_argument("--units", type=int, default=3, help="slices to run (the first is the embedding's)")
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="TRTC_QUANT_THREADS for this run")
    ap.add_argument("--profile", type=Path, default=None)
    a = ap.parse_args()
    if a.threads is not None:
        os.environ["TRTC_QUANT_THREADS"] = str(a.threads)

    from trtc.compiler.calibrate import calibrate_by_unit, calibration_plan, calibration_windows
    from trtc.compiler.onnx_io import load_graph
    from trtc.compiler.quant_algos import cpu_threads
    from trtc.compiler.quant_config import make_quant_config, resolve_for_model
    from trtc.compiler.quant_rewrite import Rewriter, find_targets
    from trtc.compiler.quant_store import DataWriter
    from trtc.compiler.rank_graphs import load_export_dir
    from trtc.log import peak_rss_mb

    graphs = load_export_dir(a.export)
    src = graphs.dir / graphs.graphs[0].file
    q = resolve_for_model(make_quant_config(a.quant, calib_samples=a.calib_samples), graphs.spec)
    graph = load_graph(src)
    targets = find_targets(graph)
    prof = cProfile.Profile() if a.profile else None
    with tempfile.TemporaryDirectory() as tmp, cpu_threads():
        writer = DataWriter(Path(tmp) / "rank0.onnx")
        rw = Rewriter(graph, targets, q, src.parent, writer)
        plan = calibration_plan(q, list(targets.groups), [n.inputs[1].name for n in targets.scatters])
        windows = calibration_windows(graphs.tokenizer_dir, q, graphs.config.max_seq_len)
        units = calibrate_by_unit(src, plan, windows, graphs.spec, graphs.config.max_seq_len)
        t_start = time.time()
        if prof:
            prof.enable()
        for unit, stats, secs in itertools.islice(units, a.units):
            t0 = time.time()
            n = rw.quantize(list(stats), stats)
            print(f"unit {unit}: {n} linears, calibrated in {secs:.1f} s, quantized in {time.time() - t0:.1f} s "
                  f"(peak RSS {peak_rss_mb():.0f} MiB, load {os.getloadavg()[0]:.2f})", flush=True)
        if prof:
            prof.disable()
        writer.abort()
    print(f"total {time.time() - t_start:.1f} s for {a.units} units, threads {os.environ.get('TRTC_QUANT_THREADS')}")
    if prof:
        prof.dump_stats(a.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
