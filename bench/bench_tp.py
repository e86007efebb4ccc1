"""Tensor-parallel builds: peak memory of each rank's build against the one-rank build, and rank
engine sizes. A TinyLlama-1.1B-shaped Llama (random float16 weights, 32 query / 4 KV heads) is
exported once (`trtc export`), then built from that export dir at --tp-size 1, 2 and 4 (the shard
step runs in the build process; each rank's engine is built in its own builder child process).

Memory: RssAnon (anonymous pages: what a process really holds; memory-mapped weight pages are
reclaimable and not counted) sampled every 0.1 s from /proc, per process: the `trtc build`
process itself (load, shard, package) and each builder child (one per rank, run one after another).

    .venv/bin/python bench/bench_tp.py [--work DIR] [--tp 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def _anon_kib(pid: int) -> int:
    try:
        st = Path(f"/proc/{pid}/status").read_text()
        return int(st.split("RssAnon:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def sampled(cmd: list[str]) -> dict:
    """Run cmd; peak RssAnon (GiB) of the command's own process, of each builder child (in start
    order), of the whole tree at once; wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    workers: list[int] = []
    tree = [0]

    def poll() -> None:
        while proc.poll() is None:
            pids = [proc.pid] + _children(proc.pid)
            total = 0
            for p in pids:
                kib = _anon_kib(p)
                total += kib
                peaks[p] = max(peaks.get(p, 0), kib)
                if p != proc.pid and p not in workers and "build_worker" in _cmdline(p):
                    workers.append(p)
            tree[0] = max(tree[0], total)
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    gib = 2 ** 20
    return {"wall_s": round(time.perf_counter() - t0, 1), "main_gib": round(peaks.get(proc.pid, 0) / gib, 2),
            "workers_gib": [round(peaks[w] / gib, 2) for w in workers], "tree_gib": round(tree[0] / gib, 2),
            "stderr": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/trtc-bench-tp")
    ap.add_argument("--tp", default="1,2,4")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_build import make_tinyllama

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_tinyllama(work / "tinyllama")
    trtc = [sys.executable, "-m", "trtc.cli"]
    export = work / "export"
    if not (export / "trtc_export.json").is_file():
        r = sampled(trtc + ["export", "--model", str(model), "--dtype", "float16", "--max-seq-len", "2048",
                            "--output", str(export)])
        print(f"export: {r['wall_s']} s, peak anon {r['tree_gib']} GiB", flush=True)
    rows = []
    for tp in map(int, args.tp.split(",")):
        out = work / f"tp{tp}"
        r = sampled(trtc + ["build", "--model", str(export), "--tp-size", str(tp), "--target", "sm_89", "--no-cache",
                            "--max-batch-size", "8", "--max-input-len", "1024", "--output", str(out)])
        cfg = json.loads((out / "config.json").read_text())
        sizes = [cfg["files"][e["file"]]["size"] for e in cfg["engines"]]
        row = {"tp": tp, "wall_s": r["wall_s"], "main_gib": r["main_gib"], "workers_gib": r["workers_gib"],
               "tree_gib": r["tree_gib"], "engine_mib": [round(s / 2 ** 20, 1) for s in sizes]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| tp | build wall s | `trtc build` process peak anon GiB | each rank's builder peak anon GiB | "
          "whole tree peak GiB | each rank engine MiB |\n|---:|---:|---:|---|---:|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['wall_s']} | {r['main_gib']} | {', '.join(map(str, r['workers_gib']))} | "
              f"{r['tree_gib']} | {', '.join(map(str, r['engine_mib']))} |")


if __name__ == "__main__":
    main()
