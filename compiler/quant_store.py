"""The quantized graph's data file, written as the tensors are made.

Each new constant of at least SMALL bytes goes to the data file the moment it is made and its
TensorProto keeps only the external reference, so the quantizer holds one layer's tensors at a time
(not every quantized weight until the end). At the end, `finish` streams the weights the quantizer
left alone (embedding, lm_head, norms) from the source data file, one tensor at a time.

The file is written under a temporary name and renamed over the final one last, so the output may
replace the graph it is read from (`out` == `src`).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from trtc import artifact as art

SMALL = 1024            # bytes: smaller tensors stay inside the .onnx (as onnx.save_model's size_threshold)
ALIGN = 4096            # large tensors start on a page, so readers can memory-map them
COPY_CHUNK = 64 << 20


def _refer(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make t a reference to bytes [offset, offset+length) of `location` (its own bytes dropped)."""
    t.ClearField("raw_data")
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def _ext(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


class DataWriter:
    """Appends tensors to `<out>.data` (final name), written as `<out>.data.partial` until `finish`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.name = art.onnx_data(out.name)
        self.partial = out.parent / (self.name + ".partial")
        self.f = open(self.partial, "wb")
        self.mine: set[str] = set()         # tensors written here (the others are copied at the end)

    def _append(self, raw: bytes | memoryview) -> int:
        pos = self.f.tell()
        if len(raw) >= (1 << 16) and pos % ALIGN:
            self.f.write(b"\0" * (ALIGN - pos % ALIGN))
            pos = self.f.tell()
        self.f.write(raw)
        return pos

    def put(self, t: TensorProto) -> TensorProto:
        """Move t's bytes to the file (if large); t then references them."""
        if not t.HasField("raw_data") or len(t.raw_data) < SMALL:
            return t
        pos = self._append(t.raw_data)
        _refer(t, self.name, pos, len(t.raw_data))
        self.mine.add(t.name)
        return t

    def _copy(self, t: TensorProto, src_dir: Path) -> None:
        """Stream an untouched external weight from the source data file into this one."""
        e = _ext(t)
        off, length = int(e.get("offset", 0)), int(e["length"])
        with open(src_dir / e["location"], "rb") as src:
            src.seek(off)
            pos = self._append(src.read(min(COPY_CHUNK, length)))   # aligned start
            left = length - (self.f.tell() - pos)
            while left:
                chunk = src.read(min(COPY_CHUNK, left))
                self.f.write(chunk)
                left -= len(chunk)
        _refer(t, self.name, pos, length)

    def finish(self, model: onnx.ModelProto, src_dir: Path) -> None:
        """Copy every external initializer of `model` not written here from src_dir, then put the
        data file in place and write the graph next to it."""
        for t in model.graph.initializer:
            if uses_external_data(t) and t.name not in self.mine:
                self._copy(t, src_dir)
        self.f.close()
        os.replace(self.partial, self.out.parent / self.name)
        onnx.save_model(model, str(self.out))

    def abort(self) -> None:
        self.f.close()
        self.partial.unlink(missing_ok=True)
