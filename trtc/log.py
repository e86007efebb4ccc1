"""Stage logging: each pipeline stage prints its name, then its wall time and peak RSS."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    VmHWM is per address space, so a process started by a large parent does not inherit the
    parent's peak (getrusage's ru_maxrss survives execve on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class StageTimes:
    """Wall time (s) and peak RSS (MiB) after each stage, in the order the stages ran."""

    rows: list[tuple[str, float, float]] = field(default_factory=list)


_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def info(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, times: StageTimes | None = None, detail: str = ""):
    info(f"[trtc] {name}{(': ' + detail) if detail else ''} ...")
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    rss = peak_rss_mb()
    if times is not None:
        times.rows.append((name, dt, rss))
    info(f"[trtc] {name} done in {dt:.1f} s (peak RSS {rss:.0f} MiB)")
