"""Run one TensorRT engine build in a fresh process with address-space randomization off.

Why: TensorRT-RTX's builder orders some of its internal tables by memory address, so the same
network built twice (identical ONNX bytes, `max_aux_streams = 0`) gave different plans from one
process to the next (3 distinct engines in 8 builds of a tiny Llama); with ASLR off, every build
was byte-identical (12 of 12). A child process per engine also gives the builder's memory back to
the system when it ends. Measured 2026-12-01 with TensorRT-RTX 1.7.1.116 (docs/reproducible-builds.md).

Protocol: the parent writes one JSON request to stdin; the child answers one JSON object on stdout:
{"profiles": [...], "aslr_off": bool, "sha256": hex, "identity": [dev, ino, size, mtime_ns]} or
{"error": message} (a TrtcError, exit code 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ADDR_NO_RANDOMIZE = 0x0040000


def aslr_off() -> bool:
    """Whether this process runs without address-space randomization."""
    try:
        return bool(int(Path("/proc/self/personality").read_text(), 16) & ADDR_NO_RANDOMIZE)
    except (OSError, ValueError):
        return False


def disable_aslr_for_exec() -> None:
    """preexec_fn of the child: ask the kernel for a non-randomized address space at exec. Refused
    in some sandboxes (seccomp): the child then reports aslr_off false and the build is marked
    not reproducible."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current != -1:
            libc.personality(current | ADDR_NO_RANDOMIZE)
    except (OSError, AttributeError):
        pass


# What the child inherits: enough to run Python and find trtc and TensorRT, nothing that varies
# from one CI run to the next (its size alone moves the child's memory layout).
_ENV_KEEP = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "TRTC_CACHE_DIR", "CUDA_VISIBLE_DEVICES",
             "TMPDIR")


def worker_env() -> dict[str, str]:
    import os

    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.update(LANG="C.UTF-8", PYTHONHASHSEED="0")
    return env


def main() -> int:
    from trtc import typed_json
    from trtc.artifact import BuildConfig, file_identity, written_sha256
    from trtc.errors import TrtcError
    from trtc.flavour import FLAVOURS
    from trtc.spec import ModelSpec

    from .build import build_engine

    req = json.loads(sys.stdin.read())
    try:
        profiles = build_engine(Path(req["onnx"]), typed_json.from_json(ModelSpec, req["spec"], "build request"),
                                typed_json.from_json(BuildConfig, req["build"], "build request"),
                                FLAVOURS[req["flavour"]], Path(req["engine"]), kv_block_size=req["kv_block_size"],
                                label=req.get("label"))
    except TrtcError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    engine = Path(req["engine"])
    # the engine's sha256 as hashed while it was written, and the file identity it belongs to
    print(json.dumps({"profiles": typed_json.to_json(profiles), "aslr_off": aslr_off(),
                      "sha256": written_sha256(engine), "identity": file_identity(engine)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
