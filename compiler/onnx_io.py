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
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if uses_external_data(t):
            length = int(next((e.value for e in t.external_data if e.key == "length"), "0") or 0)
            if length and length < SMALL_BYTES:
                load_external_data_for_tensor(t, str(path.parent))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
    return gs.import_onnx(model)


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
