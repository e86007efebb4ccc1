"""compiler/onnx_io.py: reading external weights the way the engine cache stores them."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, set_external_data

from trtc.compiler.onnx_io import inline_external


def _external(tmp_path, values: np.ndarray, offset: int):
    """A TensorProto whose data sits at `offset` of tmp_path/w.data, a file with a second hard link
    (as the engine cache hands out a reused export)."""
    data = tmp_path / "w.data"
    data.write_bytes(b"\xff" * offset + values.tobytes() + b"\xee" * 8)
    os.link(data, tmp_path / "cache-entry.data")
    t = numpy_helper.from_array(values, "w")
    set_external_data(t, "w.data", offset=offset, length=values.nbytes)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    return t


def test_reads_hard_linked_external_data(tmp_path):
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    t = _external(tmp_path, values, offset=64)
    probe = onnx.TensorProto()
    probe.CopyFrom(t)
    with pytest.raises(Exception, match="hard link"):      # why trtc reads the bytes itself
        load_external_data_for_tensor(probe, str(tmp_path))
    inline_external(t, tmp_path)
    assert t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
    np.testing.assert_array_equal(numpy_helper.to_array(t), values)


@pytest.mark.parametrize("location", ["../w.data", "/etc/passwd", "sub/w.data", ""])
def test_refuses_locations_outside_the_dir(tmp_path, location):
    t = _external(tmp_path, np.zeros(4, np.float32), offset=0)
    for e in t.external_data:
        if e.key == "location":
            e.value = location
    with pytest.raises(ValueError, match="not a file name"):
        inline_external(t, tmp_path)


def test_short_file_is_an_error(tmp_path):
    t = _external(tmp_path, np.zeros(4, np.float32), offset=0)
    for e in t.external_data:
        if e.key == "length":
            e.value = "4096"
    with pytest.raises(ValueError, match="ends before"):
        inline_external(t, tmp_path)
