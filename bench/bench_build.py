"""Build benchmark: wall time, peak memory and disk use per stage of `trtc build`.

For each model x quant mode, one `trtc build --no-cache --target sm_89 --max-batch-size 8
--max-input-len 1024 --max-seq-len 2048` runs in its own process tree while this script samples,
every 0.1 s: anonymous memory (RssAnon, what the build holds; memory-mapped weight pages do not
count) and RSS, each summed over the process tree (the builder child included), the bytes on disk
under the run dir (output, its temp dir, the scratch dir next to it) and $TRTC_WORK_DIR, and the
free space of those disks. Each sample belongs to the stage trtc last announced on stderr
("[trtc] <stage> ..." to "[trtc] <stage> done in"), read live; "(outside stages)" is the rest
(interpreter start, imports, exit).

Models: smollm2 (the bundled SmolLM2-135M, real weights), tinyllama-1.1b and llama-3.1-8b
(random weights of those shapes, written by make_models.py under --models-dir once).

    .venv/bin/python bench/bench_build.py [--models smollm2,tinyllama-1.1b,llama-3.1-8b]
        [--quant none,int4_awq] [--dtype float16] [--tp-size N] [--models-dir DIR] [--results DIR] [--keep]

Each process of the tree also gets its own peaks (the `trtc build` process, the export server
`trtc.compiler.export_worker (server)` and the export child it forks `... (export child)`, each
rank's builder child `trtc.compiler.build_worker`), so a
`--tp-size 2` run shows the per-rank builder peak next to the tree's.

Prints a markdown table; writes it with the machine, date, command and load average, plus JSON
and each build's stderr, under --results (default bench/results-build/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from make_models import MODELS, TINYLLAMA, default_root, model_dir, write_model  # noqa: F401 (TINYLLAMA: bench_tp)
from peakmem import tree_processes

BENCH = Path(__file__).resolve().parent
BUNDLED = {"smollm2": "smollm2-135m-instruct"}
LIMITS = ["--target", "sm_89", "--max-batch-size", "8", "--max-input-len", "1024", "--max-seq-len", "2048"]
STAGE_START = re.compile(r"^\[trtc\] ([A-Za-z_][\w-]*)(?:: .*)? \.\.\.\s*$")
STAGE_DONE = re.compile(r"^\[trtc\] ([A-Za-z_][\w-]*) done in ([\d.]+) s")
OUTSIDE = "(outside stages)"
GIB = 2**30


def make_tinyllama(out: Path) -> Path:
    """The TinyLlama-1.1B shape, float16, random weights, in `out` (bench_tp.py uses it)."""
    return write_model("tinyllama-1.1b", out, "float16")


@dataclass
class Stage:
    """What one stage used: wall time on this script's clock, trtc's own figure, and the peaks of
    the samples taken while it ran (memory in KiB over the process tree, disk in bytes)."""

    name: str
    wall_s: float = 0.0
    trtc_s: float | None = None
    peak_anon_kib: int = 0
    peak_rss_kib: int = 0
    peak_disk_bytes: int = 0
    free_low_bytes: int | None = None
    samples: int = 0

    def add(self, anon: int, rss: int, disk: int, free: int) -> None:
        self.peak_anon_kib = max(self.peak_anon_kib, anon)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_disk_bytes = max(self.peak_disk_bytes, disk)
        self.free_low_bytes = free if self.free_low_bytes is None else min(self.free_low_bytes, free)
        self.samples += 1


@dataclass
class StageTracker:
    """Attributes samples to the stage trtc's stderr says is running (lines arrive on the reader
    thread, samples on the main thread). A repeated stage gets '#2', '#3'; a start line naming the
    stage already running (a progress line) changes nothing."""

    stages: dict[str, Stage] = field(default_factory=lambda: {OUTSIDE: Stage(OUTSIDE)})
    total: Stage = field(default_factory=lambda: Stage("total"))
    procs: dict[int, dict] = field(default_factory=dict)   # pid -> {what, peak_anon_kib, peak_rss_kib, stage}
    current: str = OUTSIDE
    since: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _switch(self, key: str) -> None:
        now = time.perf_counter()
        self.stages[self.current].wall_s += now - self.since
        self.current, self.since = key, now

    def line(self, text: str) -> None:
        with self.lock:
            if m := STAGE_START.match(text):
                name = m.group(1)
                if self.current != OUTSIDE and self.stages[self.current].name == name:
                    return
                key = name
                n = 1
                while key in self.stages:
                    n += 1
                    key = f"{name} #{n}"
                self.stages[key] = Stage(name)
                self._switch(key)
            elif (m := STAGE_DONE.match(text)) and self.stages[self.current].name == m.group(1):
                self.stages[self.current].trtc_s = float(m.group(2))
                self._switch(OUTSIDE)

    def sample(self, procs: list[tuple[int, int, int]], disk: int, free: int) -> None:
        """One sample: (pid, RssAnon KiB, VmRSS KiB) of each process of the tree; the tree's sums
        go to the stage, each process's own peak (and the stage it was reached in) to `procs`."""
        anon, rss = sum(a for _, a, _ in procs), sum(r for _, _, r in procs)
        with self.lock:
            self.stages[self.current].add(anon, rss, disk, free)
            self.total.add(anon, rss, disk, free)
            for pid, a, r in procs:
                p = self.procs.setdefault(pid, {"pid": pid, "what": "?", "peak_anon_kib": 0,
                                                "peak_rss_kib": 0, "stage": self.current})
                if a:                   # read each time: a fresh child shows its parent's argv until exec
                    p["what"] = process_name(pid)
                if a > p["peak_anon_kib"]:
                    p["peak_anon_kib"], p["stage"] = a, self.current
                p["peak_rss_kib"] = max(p["peak_rss_kib"], r)

    def finish(self, wall_s: float) -> None:
        with self.lock:
            self._switch(OUTSIDE)
            self.total.wall_s = wall_s


EXPORT_WORKER = "trtc.compiler.export_worker"


def _argv(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None


def _module(argv: list[str]) -> str:
    """The module of `python -m M`, else the program's name."""
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name


def parent_pid(pid: int) -> int | None:
    """The parent's pid from /proc/<pid>/stat (its 4th field; the 2nd, the name, may hold spaces)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def process_name(pid: int) -> str:
    """What a process of the tree is: the module of `python -m M`, else the program's name. The
    export server (`python -m trtc.compiler.export_worker`) forks each export child without exec,
    so a child has the server's argv: a process whose parent runs the same module is its child."""
    argv = _argv(pid)
    if argv is None:
        return "?"
    what = _module(argv)
    if what == EXPORT_WORKER:
        ppid = parent_pid(pid)
        parent = _argv(ppid) if ppid else None
        return f"{what} ({'export child' if parent and _module(parent) == EXPORT_WORKER else 'server'})"
    return what


def disk_bytes(paths: list[Path]) -> int:
    """Bytes allocated on disk (st_blocks) by the files under `paths`; files that vanish meanwhile
    count 0."""
    total = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
    return total


def free_bytes(paths: list[Path]) -> int:
    return min(shutil.disk_usage(p).free for p in paths if p.exists())


def run_monitored(cmd: list[str], watch: list[Path], log: Path, env: dict) -> tuple[int, StageTracker]:
    """Run cmd, reading its stderr live into `log` and the tracker; sample memory and disk every 0.1 s."""
    tracker = StageTracker()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def take() -> None:
        tracker.sample(tree_processes(proc.pid), disk_bytes(watch), free_bytes(watch))

    def read() -> None:
        with open(log, "w") as f:
            for text in proc.stderr:           # universal newlines: a '\r' progress update is a line too
                f.write(text)
                take()                             # the instant a stage ends belongs to it ...
                tracker.line(text.rstrip("\n"))
                take()                             # ... and the instant the next one starts to that one

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        take()
        time.sleep(0.1)
    reader.join()
    tracker.finish(time.perf_counter() - t0)
    return proc.returncode, tracker


def model_arg(name: str, models_dir: Path, source_dtype: str) -> str:
    if name in BUNDLED:
        return BUNDLED[name]
    return str(write_model(name, model_dir(name, models_dir, source_dtype), source_dtype))


def build_cmd(model: str, quant: str, dtype: str, output: Path, tp: int = 1) -> list[str]:
    tp_args = ["--tp-size", str(tp)] if tp != 1 else []
    return ["trtc", "build", "--model", model, "--dtype", dtype, "--quant", quant, "--output", str(output),
            "--no-cache", *tp_args, *LIMITS]


def run_name(name: str, quant: str, args: argparse.Namespace) -> str:
    return f"{name}-{quant}-{args.dtype}" + (f"-tp{args.tp_size}" if args.tp_size != 1 else "")


def bench_one(name: str, quant: str, args: argparse.Namespace, logs: Path) -> dict:
    model = model_arg(name, args.models_dir, args.source_dtype)
    run = args.models_dir / "runs" / run_name(name, quant, args)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    out = run / "engine"
    cmd = build_cmd(model, quant, args.dtype, out, args.tp_size)
    watch = [run] + ([Path(os.environ["TRTC_WORK_DIR"])] if os.environ.get("TRTC_WORK_DIR") else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()
    free_before = free_bytes(watch)
    log = logs / f"{run_name(name, quant, args)}.log"
    rc, tr = run_monitored([sys.executable, "-m", "trtc.cli", *cmd[1:]], watch, log, env)
    leftover = sorted(p.name for p in run.iterdir() if p.name != "engine")
    row = {"model": name, "quant": quant, "dtype": args.dtype, "tp": args.tp_size, "command": shlex.join(cmd), "rc": rc,
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
           "free_before_bytes": free_before,
           "engine_bytes": disk_bytes([out]) if rc == 0 else None, "leftover_in_run_dir": leftover,
           "stages": [asdict(s) | {"key": k} for k, s in tr.stages.items()], "total": asdict(tr.total),
           "processes": list(tr.procs.values()),
           "stderr_tail": log.read_text().splitlines()[-5:] if rc else []}
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return row


def gib(x: float | None, scale: int = 1) -> str:
    return "" if x is None else f"{x * scale / GIB:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | quant | stage | wall s | trtc s | peak anon GiB | peak RSS GiB | disk peak GiB | free low GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for s in r["stages"] + [r["total"] | {"key": "**total**"}]:
            if not s["samples"] and s["key"] == OUTSIDE:
                continue
            trtc_s = "" if s["trtc_s"] is None else f"{s['trtc_s']:.1f}"
            lines.append(f"| {r['model']} | {r['quant']} | {s['key']} | {s['wall_s']:.1f} | {trtc_s} | "
                         f"{gib(s['peak_anon_kib'], 1024)} | {gib(s['peak_rss_kib'], 1024)} | "
                         f"{gib(s['peak_disk_bytes'])} | {gib(s['free_low_bytes'])} |")
        result = (f"engine {gib(r['engine_bytes'])} GiB" if r["rc"] == 0
                  else f"FAILED (exit {r['rc']}): {' / '.join(r['stderr_tail'][-2:])}")
        result += f"; disk free at start {gib(r['free_before_bytes'])} GiB"
        if r["leftover_in_run_dir"]:
            result += f"; left behind: {', '.join(r['leftover_in_run_dir'])}"
        lines.append(f"| {r['model']} | {r['quant']} | result | {result} | | | | | |")
        for p in r.get("processes", []):
            if p["peak_anon_kib"] >= 64 * 1024:           # the trtc processes, not `tee`-sized helpers
                lines.append(f"| {r['model']} | {r['quant']} | process {p['pid']} {p['what']} (peak in {p['stage']}) | | | "
                             f"{gib(p['peak_anon_kib'], 1024)} | {gib(p['peak_rss_kib'], 1024)} | | |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    commit = subprocess.run(["git", "-C", str(BENCH), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / GIB, 1),
            "python": platform.python_version(), "trtc_commit": commit}


def header(args: argparse.Namespace, mach: dict, date: str) -> str:
    return (f"# trtc build stages, {date}\n\n"
            f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_build.py', *sys.argv[1:]])}`\n"
            f"Machine: {mach['host']}, {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB, "
            f"Python {mach['python']}, trtc {mach['trtc_commit']}\n"
            f"Each build: `trtc build --model M --dtype {args.dtype} --quant Q --output O --no-cache "
            f"{f'--tp-size {args.tp_size} ' if args.tp_size != 1 else ''}"
            f"{' '.join(LIMITS)}`; memory summed over the process tree, sampled every 0.1 s.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,tinyllama-1.1b,llama-3.1-8b")
    ap.add_argument("--quant", default="none,int4_awq")
    ap.add_argument("--dtype", default="float16", help="trtc build --dtype")
    ap.add_argument("--tp-size", type=int, default=1, help="trtc build --tp-size")
    ap.add_argument("--source-dtype", default="float16", help="dtype of the generated random-weight models")
    ap.add_argument("--models-dir", type=Path, default=default_root(),
                    help="generated models and run dirs (default $TRTC_BENCH_DIR or ~/.cache/trtc-bench)")
    ap.add_argument("--results", type=Path, default=BENCH / "results-build")
    ap.add_argument("--keep", action="store_true", help="keep each engine dir (default: removed after measuring)")
    args = ap.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in BUNDLED and n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(BUNDLED) + sorted(MODELS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    logs = args.results / stamp
    logs.mkdir(parents=True, exist_ok=True)
    mach = machine()
    head = header(args, mach, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(head, flush=True)
    rows = []
    for name in names:
        for quant in args.quant.split(","):
            rows.append(bench_one(name, quant, args, logs))
            r = rows[-1]
            print(f"{name} {quant}: exit {r['rc']}, {r['total']['wall_s']:.1f} s, load {r['load_before']} -> "
                  f"{r['load_after']}", file=sys.stderr, flush=True)
    loads = "\n".join(f"- {r['model']} {r['quant']}: load average (1/5/15 min) {r['load_before']} before, "
                      f"{r['load_after']} after; `{r['command']}`" for r in rows)
    md = f"{head}\n{table(rows)}\n\n{loads}\n"
    print(table(rows))
    (logs / "results.md").write_text(md)
    (logs / "results.json").write_text(json.dumps({"machine": mach, "argv": sys.argv, "runs": rows}, indent=1) + "\n")
    print(f"\nwritten: {logs}/results.md, results.json, <model>-<quant>-<dtype>.log", file=sys.stderr)


if __name__ == "__main__":
    main()
