"""Writing an engine-sized file: buffered (through the page cache) vs compiler/direct_io.py's
DirectWriter (O_DIRECT), alternating, in 64 MiB chunks as TensorRT hands them to the stream writer.

  python bench/bench_engine_write.py [--gib 2] [--rounds 3] [--dir DIR]

DIR defaults to the current dir (put it on the disk the engines go to). Each file is fsynced, as
the engine is, and kept until the end, as a build keeps its export and joined weights: the page
cache grows as it does in a build (writing into pages just freed by a deleted file is faster than
the steady state and would flatter the buffered writer). Prints one row per write and the median ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def _buffered(path: Path, chunk: bytes, n: int) -> None:
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _direct(path: Path, chunk: bytes, n: int) -> bool:
    from trtc.compiler.direct_io import DirectWriter

    w = DirectWriter(path)
    for _ in range(n):
        w.write(chunk)
    w.close()
    return w.direct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path.cwd())
    a = ap.parse_args()
    chunk = os.urandom(1 << 20) * 64
    n = int(a.gib * 16)
    paths: list[Path] = []
    times: dict[str, list[float]] = {"buffered": [], "direct": []}
    print(f"| round | writer | GiB | s | MB/s | load |\n|---:|---|---:|---:|---:|---:|")
    try:
        for r in range(a.rounds):
            for name in ("buffered", "direct") if r % 2 == 0 else ("direct", "buffered"):
                path = a.dir / f".bench-engine-write-{os.getpid()}-{len(paths)}"
                paths.append(path)
                t = time.perf_counter()
                note = ""
                if name == "buffered":
                    _buffered(path, chunk, n)
                elif not _direct(path, chunk, n):
                    note = " (O_DIRECT refused: buffered)"
                dt = time.perf_counter() - t
                times[name].append(dt)
                print(f"| {r + 1} | {name}{note} | {n / 16:.2f} | {dt:.2f} | {n * 64 * 2**20 / dt / 1e6:.0f} | "
                      f"{os.getloadavg()[0]:.2f} |", flush=True)
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    b, d = statistics.median(times["buffered"]), statistics.median(times["direct"])
    print(f"\nmedian: buffered {b:.2f} s, direct {d:.2f} s, ratio {b / d:.2f}x")


if __name__ == "__main__":
    main()
