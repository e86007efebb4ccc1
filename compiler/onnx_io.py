"""Load and save rank graphs without pulling the weights through Python.

The traced model's weights live in one external data file. The passes only touch small tensors
(shapes, inv_freq, new rotary caches), so large initializers stay references into that file:
loading reads only tensors under SMALL_BYTES, saving writes the graph and renames the data file.
Passes and save then cost megabytes and milliseconds, not a copy of the model.
"""

from __future__ import annotations

import os
from pathlib import Path

SMALL_BYTES = 1 << 20


def load_graph(path: Path):
    """onnx-graphsurgeon graph of `path`; large initializers stay external references."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if uses_external_data(t):
            length = int(next((e.value for e in t.external_data if e.key == "length"), "0") or 0)
            if length and length < SMALL_BYTES:
                inline_external(t, path.parent)
    return gs.import_onnx(model)


def inline_external(t, data_dir: Path) -> None:
    """Read an initializer's external data into the TensorProto `t` itself (raw_data) and drop
    its external reference. trtc reads the bytes itself: onnx's load_external_data_for_tensor
    refuses data files with more than one hard link (a "hardlink attack" check, onnx 1.18+), and
    the engine cache stores and reuses exports as hard links. The location must name a file in
    `data_dir` (no directories, as trtc writes them)."""
    import onnx

    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not loc or Path(loc).name != loc or loc in (".", ".."):
        raise ValueError(f"initializer {t.name}: external data location {loc!r} is not a file name in {data_dir}")
    offset = int(info.get("offset") or 0)
    with open(data_dir / loc, "rb") as f:
        if "length" in info:
            data = os.pread(f.fileno(), int(info["length"]), offset)
            if len(data) != int(info["length"]):
                raise ValueError(f"initializer {t.name}: {loc} ends before offset {offset} + {info['length']}")
        else:
            f.seek(offset)
            data = f.read()
    t.raw_data = data
    t.data_location = onnx.TensorProto.DEFAULT
    del t.external_data[:]


def save_graph(graph, src_data: Path, out: Path):
    """Write `graph` to `out` with its large weights in `out.name + '.data'` (moved from
    `src_data`, the file the external references point into). Returns the ONNX model proto
    (without weights) for inspection."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx.external_data_helper import uses_external_data

    model = gs.export_onnx(graph)
    data_name = out.name + ".data"
    for t in model.graph.initializer:
        if uses_external_data(t):
            for e in t.external_data:
                if e.key == "location":
                    if e.value != src_data.name:
                        raise ValueError(f"initializer {t.name} points into {e.value}, not {src_data.name}")
                    e.value = data_name
    os.replace(src_data, out.parent / data_name)
    onnx.save_model(model, str(out))
    return model
