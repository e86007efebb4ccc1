"""Run one export (compiler/export.py trace_here) in a fresh process: `python -m
trtc.compiler.export_worker REQUEST RESULT`. The memory torch and the exporter keep after a trace
goes back to the system when this process ends, instead of sitting beside the TensorRT builder."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    from trtc.compiler.export import trace_request

    trace_request(Path(sys.argv[1]), Path(sys.argv[2]))
