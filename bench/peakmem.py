#!/usr/bin/env python3
"""Run a command; print its wall time, peak anonymous memory and peak RSS of its process tree.

    .venv/bin/python bench/peakmem.py trtc build --model M --dtype float16 --output E

Anonymous memory (RssAnon) is what a build really holds: pages of memory-mapped files are
reclaimable and not counted there, every copy is. Sampled every 0.1 s from /proc (Linux), summed
over the command and all its children (trtc's builder child included). The last stderr line is
JSON. `tree_processes` / `tree_memory` are the one-sample functions the build bench uses too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def status_kib(pid: int, name: str) -> int:
    """One field of /proc/PID/status in KiB (RssAnon, VmRSS); 0 when the process is gone."""
    try:
        st = Path(f"/proc/{pid}/status").read_text()
        return int(st.split(name + ":")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def children(pid: int) -> list[int]:
    """The children of every thread of pid (/proc/PID/task/TID/children lists only the children
    that thread started: a child spawned from a worker thread is under that thread's TID)."""
    kids: list[int] = []
    try:
        tids = [t.name for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return kids
    for tid in tids:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [pid], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def tree_processes(pid: int) -> list[tuple[int, int, int]]:
    """(pid, RssAnon KiB, VmRSS KiB) of every process in pid's tree at this instant."""
    return [(p, status_kib(p, "RssAnon"), status_kib(p, "VmRSS")) for p in process_tree(pid)]


def tree_memory(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) in KiB, each summed over pid's process tree at this instant."""
    procs = tree_processes(pid)
    return sum(a for _, a, _ in procs), sum(r for _, _, r in procs)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    t0 = time.time()
    proc = subprocess.Popen(argv)
    peak = {"anon": 0, "rss": 0}

    def poll() -> None:
        while proc.poll() is None:
            anon, rss = tree_memory(proc.pid)
            peak["anon"] = max(peak["anon"], anon)
            peak["rss"] = max(peak["rss"], rss)
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    wall = time.time() - t0
    res = {"rc": rc, "wall_s": round(wall, 2), "peak_anon_gib": round(peak["anon"] / 2**20, 3),
           "peak_rss_gib": round(peak["rss"] / 2**20, 3)}
    print(f"peakmem: exit {rc}, {wall:.1f} s, peak anonymous {res['peak_anon_gib']:.2f} GiB, "
          f"peak RSS {res['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    print(json.dumps(res), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main(sys.argv[1:])
