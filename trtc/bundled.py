"""Data files shipped inside the trtc package (trtc/data/), found through importlib.resources so
they resolve the same in an editable checkout, an installed wheel or a zipped install."""

from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path

CALIB_TEXT = "calib.txt"   # calibration text: CPython's pydoc topics minus those in eval.txt
EVAL_TEXT = "eval.txt"     # held-out evaluation text, disjoint from calib.txt

_files = contextlib.ExitStack()


def data_file(name: str) -> Path:
    """A real file path to bundled data file `name` (extracted once per process if zipped)."""
    res = importlib.resources.files("trtc") / "data" / name
    return Path(_files.enter_context(importlib.resources.as_file(res)))


def read_text(name: str) -> str:
    return (importlib.resources.files("trtc") / "data" / name).read_text(encoding="utf-8")
