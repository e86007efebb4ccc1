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


def quiet_third_party(verbose: bool = False) -> None:
    """Keep other libraries' warnings, log lines and progress bars off the user's terminal (torch's
    exporter, transformers, onnxscript); `--verbose` lets them through."""
    import logging
    import os
    import warnings

    global _verbose
    _verbose = verbose
    if verbose:
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"     # read by transformers when it is first imported
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"   # read by huggingface_hub (and so transformers' bars)
    os.environ.setdefault("TQDM_DISABLE", "1")      # bars of libraries that use tqdm directly (GGUF dequantization)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torch configures its own loggers when imported (after this runs): "-onnx" = ERROR and above
    os.environ.setdefault("TORCH_LOGS", "-onnx,-dynamo,-export")
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "transformers",
                 "accelerate", "onnxruntime", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Already imported (a library user's process): tell it directly. Otherwise the variables above
    # do it when it is imported, and the CLI does not pay for importing transformers (and, from
    # transformers 5, torch) before it starts the export server: ~1.5 s at load 1.5.
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


_verbose = True      # until the CLI says otherwise (quiet_third_party): library users keep their output


def state() -> tuple[bool, bool]:
    """What a child process needs to print (and silence) as this one does: (quiet, verbose)."""
    return _quiet, _verbose


def restore(st: tuple[bool, bool]) -> None:
    """In a child process started with `spawn`: this process's output settings, from state()."""
    set_quiet(st[0])
    if not st[1]:
        quiet_third_party(False)


@contextlib.contextmanager
def third_party_output():
    """Around a library call that writes its own progress to stderr (tqdm imported before the
    CLI could disable it): that output is dropped unless --verbose."""
    if _verbose:
        yield
        return
    import os

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


def info(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, times: StageTimes | None = None, detail: str = ""):
    """One named stage: its start and end on stderr, its wall time and peak RSS in `times`. Running
    out of disk or memory inside it is a user error naming the stage and what it had used."""
    import errno

    from trtc.errors import TrtcError

    info(f"[trtc] {name}{(': ' + detail) if detail else ''} ...")
    t0 = time.perf_counter()
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise TrtcError(f"{name}: out of disk space writing {e.filename or 'its output'} ({e.strerror}); "
                        f"free space there, or point TRTC_WORK_DIR / --output at a larger disk") from e
    except MemoryError as e:
        raise TrtcError(f"{name}: out of memory after {peak_rss_mb():.0f} MiB resident; use a machine with more "
                        f"memory, or a smaller model/limits") from e
    dt = time.perf_counter() - t0
    rss = peak_rss_mb()
    if times is not None:
        times.rows.append((name, dt, rss))
    info(f"[trtc] {name} done in {dt:.1f} s (peak RSS {rss:.0f} MiB)")
