"""Quantization benchmark: accuracy (trtc eval), engine size and build time per --quant mode.

Exports the model once (`trtc export`, float32 by default), then per mode runs
`trtc build --model EXPORT_DIR --quant MODE --keep-onnx --target T` and
`trtc eval ENGINE_DIR --json --backend onnxruntime` (reference: the source model in transformers
fp32; texts: the bundled eval text, disjoint from the calibration text but of its kind (Python
docs), and --offdomain, legal prose by default (bench/data/offdomain-gpl3.txt)). Each command runs as a
subprocess, exactly as a user would run it; the JSON rows go to --out.

    python bench/bench_quant.py --out bench/results-quant/smollm2.json
    python bench/bench_quant.py --modes none,int8_wo --export /tmp/export-f32   # reuse an export

Targets: sm_89 for every mode (fp8 needs 8.9+), sm_120 for nvfp4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from trtc import artifact as art

TRTC = [sys.executable, "-m", "trtc.cli"]
MODES = {  # name -> (build flags, target)
    "none": ([], "sm_89"),
    "int8_wo": (["--quant", "int8_wo"], "sm_89"),
    "int8_wo_no_outliers": (["--quant", "int8_wo", "--outlier-channels", "0"], "sm_89"),
    "int8_awq": (["--quant", "int8_awq"], "sm_89"),
    "int8_awq_outliers16": (["--quant", "int8_awq", "--outlier-channels", "16"], "sm_89"),
    "fp8": (["--quant", "fp8"], "sm_89"),
    "fp8_no_outliers": (["--quant", "fp8", "--outlier-channels", "0"], "sm_89"),
    "int4_rtn": (["--quant", "int4_rtn"], "sm_89"),
    "int4_awq": (["--quant", "int4_awq"], "sm_89"),              # low rank 64 by default
    "int4_awq_no_lowrank": (["--quant", "int4_awq", "--low-rank", "0"], "sm_89"),
    "int4_awq_lr32": (["--quant", "int4_awq", "--low-rank", "32"], "sm_89"),
    "int4_rtn_g32": (["--quant", "int4_rtn", "--group-size", "32"], "sm_89"),
    "int4_awq_g32": (["--quant", "int4_awq", "--group-size", "32", "--low-rank", "0"], "sm_89"),
    "kv_fp8": (["--kv-cache-dtype", "fp8"], "sm_89"),
    "kv_int8": (["--kv-cache-dtype", "int8"], "sm_89"),
    "nvfp4": (["--quant", "nvfp4"], "sm_120"),
}


def run(cmd: list[str], log) -> tuple[subprocess.CompletedProcess, float]:
    t = time.time()
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    res = subprocess.run(cmd, capture_output=True, text=True)
    log.write(res.stderr[-4000:] + res.stdout[-2000:] + "\n")
    log.flush()
    return res, time.time() - t


def stage_times(stderr: str) -> dict[str, float]:
    out = {}
    for line in stderr.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "[trtc]" and parts[1] in ("load", "export", "passes", "quantize", "build", "package"):
            try:
                out[parts[1]] = float(parts[2])
            except ValueError:
                pass
    return out


def _short(row: dict) -> str:
    err = row.get("eval_error", row.get("error", "-"))
    m = re.search(r"implementation for (\w+\(\d+\))", err)
    what = " for FP4" if row.get("mode") == "nvfp4" else ""
    return f"n/a: ONNX Runtime has no {m.group(1)} kernel{what}" if m else err[:60]


def table(rows: list[dict]) -> str:
    """Markdown table of the JSON rows (accuracy vs the float model, size, build time)."""
    out = ["| mode | target | top-1 agreement | perplexity | vs float model | off-domain top-1 | off-domain ppl vs float "
           "| engine MB | onnx data MB | quantize s | build s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("mode") == "export":
            continue
        e = r.get("eval") or {}
        ppl, ref = e.get("perplexity"), e.get("reference_perplexity")
        st = r.get("stages_s", {})
        cells = [r["mode"], r.get("target", ""),
                 f"{e['top1_agreement'] * 100:.2f}%" if e.get("top1_agreement") is not None else _short(r),
                 f"{ppl:.3f}" if ppl else "-", f"{(ppl / ref - 1) * 100:+.2f}%" if ppl and ref else "-",
                 *_offdomain(r.get("eval_offdomain") or {}),
                 f"{r['engine_bytes'] / 1e6:.0f}" if "engine_bytes" in r else "-",
                 f"{r['onnx_data_bytes'] / 1e6:.0f}" if "onnx_data_bytes" in r else "-",
                 f"{st.get('quantize', 0):.1f}", f"{st.get('build', 0):.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _offdomain(e: dict) -> list[str]:
    """Top-1 agreement and perplexity change on the off-domain text (columns; '-' if not measured)."""
    if e.get("top1_agreement") is None:
        return ["-", "-"]
    ppl, ref = e.get("perplexity"), e.get("reference_perplexity")
    return [f"{e['top1_agreement'] * 100:.2f}%", f"{(ppl / ref - 1) * 100:+.2f}%" if ppl and ref else "-"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-seq-len", default="512")
    ap.add_argument("--export", type=Path, default=Path("engines/bench-quant/export"))
    ap.add_argument("--engines", type=Path, default=Path("engines/bench-quant"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reuse", action="store_true", help="re-evaluate engine dirs already built and recorded")
    ap.add_argument("--out", type=Path, default=Path("bench/results-quant/smollm2.json"))
    ap.add_argument("--offdomain", type=Path, default=Path(__file__).parent / "data" / "offdomain-gpl3.txt",
                    help="second eval text, unlike the calibration text (default: GPL-3 sections 0-2, legal prose)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out.with_suffix(".log"), "a")
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    env_note = {"machine": f"{platform.node()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not (args.export / art.EXPORT_CONFIG).is_file():
        cmd = [*TRTC, "export", "--output", str(args.export), "--dtype", args.dtype, "--max-seq-len", args.max_seq_len]
        if args.model:
            cmd += ["--model", args.model]
        res, dt = run(cmd, log)
        if res.returncode:
            sys.exit(f"export failed:\n{res.stderr[-3000:]}")
        rows.append({"mode": "export", "seconds": round(dt, 1), **env_note})
    for mode in args.modes.split(","):
        flags, target = MODES[mode]
        out = args.engines / mode
        prev = next((r for r in rows if r.get("mode") == mode and "engine_bytes" in r), None)
        if args.reuse and prev is not None and (out / art.ENGINE_CONFIG).is_file():
            row = {k: v for k, v in prev.items() if not k.startswith("eval")}   # keep the build's numbers
            res = None
        else:
            res, dt = run([*TRTC, "build", "--model", str(args.export), "--output", str(out), "--keep-onnx",
                           "--target", target, *flags], log)
            row = {"mode": mode, "target": target, "flags": flags, **env_note}
        if res is None:
            pass
        elif res.returncode:
            row["error"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
            rows = [r for r in rows if r.get("mode") != mode] + [row]
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
            print(json.dumps(row), flush=True)
            continue
        else:
            st = stage_times(res.stderr)
            quant = art.read_engine_config(out).quantization
            row.update({
                "build_wall_s": round(dt, 1), "stages_s": st,
                "engine_bytes": (out / art.rank_engine(0)).stat().st_size,
                "onnx_data_bytes": (out / art.onnx_data(art.rank_onnx(0))).stat().st_size,
                "quantization": {k: v for k, v in quant.items() if k not in ("excluded",)},
            })
        for key, text in (("eval", []), ("eval_offdomain", ["--text", str(args.offdomain)])):
            res, dt = run([*TRTC, "eval", str(out), "--json", "--backend", "onnxruntime", *text], log)
            if res.returncode:
                row[key + "_error"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
            else:
                row[key] = json.loads(res.stdout.strip().splitlines()[-1])
                row[key + "_wall_s"] = round(dt, 1)
        rows = [r for r in rows if r.get("mode") != mode] + [row]
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
