"""The builder's weights come from read-only memory maps of the graph's external data
(compiler/build.py MappedWeights): every external initializer reaches the real TensorRT-RTX parser
with its own bytes, and a damaged data file is a TrtcError naming the weight, before TensorRT runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trtc.compiler.mapped_weights import MappedWeights, _parse_with_mapped_weights, external_tensors
from trtc.errors import TrtcError

H, F = 16, 24


def _external(name: str, dtype: int, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _graph(d: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """x[B, H] @ up[H, F] @ down[F, H] + bias[H]: up and down external (at 64-byte aligned offsets,
    as exporters write them), bias inline in the proto."""
    rng = np.random.default_rng(0)
    ws = {"up": rng.standard_normal((H, F)).astype(np.float16), "down": rng.standard_normal((F, H)).astype(np.float16)}
    inits, off = [], 0
    with open(d / "g.onnx.data", "wb") as f:
        for name, a in ws.items():
            f.write(b"\0" * (-off % 64))
            off += -off % 64
            f.write(a.tobytes())
            inits.append(_external(name, TensorProto.FLOAT16, a.shape, "g.onnx.data", off, a.nbytes))
            off += a.nbytes
    inits.append(onnx.numpy_helper.from_array(np.ones(H, np.float16), "bias"))
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"]), helper.make_node("MatMul", ["h", "down"], ["y0"]),
             helper.make_node("Add", ["y0", "bias"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", H])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), d / "g.onnx")
    return d / "g.onnx", ws


def test_external_tensors_lists_external_initializers_only(tmp_path):
    path, ws = _graph(tmp_path)
    ts = external_tensors(path)
    assert [(t.name, t.length) for t in ts] == [("up", ws["up"].nbytes), ("down", ws["down"].nbytes)]
    assert ts[1].offset % 64 == 0 and ts[1].offset >= ws["up"].nbytes


def test_packed_int4_length(tmp_path):
    """INT4 packs two values a byte: 5 values need 3 bytes; a length of 5 is a damaged graph."""
    g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("q", TensorProto.INT4, [5])],
                          [_external("q", TensorProto.INT4, (5,), "d.bin", 0, 3)])
    onnx.save(helper.make_model(g), tmp_path / "q.onnx")
    assert external_tensors(tmp_path / "q.onnx")[0].length == 3
    g.initializer[0].external_data[2].value = "5"
    onnx.save(helper.make_model(g), tmp_path / "q.onnx")
    with pytest.raises(TrtcError, match=r"'q' .* has 5 bytes of external data, its shape \[5\] needs 3"):
        external_tensors(tmp_path / "q.onnx")


def test_parser_takes_every_weight_from_the_maps(tmp_path, rtx_flavour):
    """The real parser, fed pointers into the maps: the network's constant layers point at the maps
    themselves (no copy) and hold the file's bytes; the inline bias stays the parser's own."""
    from trtc.flavour import import_trt, make_logger

    trt = import_trt(rtx_flavour)
    path, ws = _graph(tmp_path)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    with MappedWeights(path) as weights:
        parser = trt.OnnxParser(network, logger)
        _parse_with_mapped_weights(parser, path, weights, rtx_flavour.name)
        at = {weights.address(t): t.name for t in weights.tensors}
        seen = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.CONSTANT:
                layer.__class__ = trt.IConstantLayer
                w = layer.weights           # numpy view of the layer's weights
                seen[at.get(w.ctypes.data, "elsewhere")] = np.array(w, copy=True).reshape(tuple(layer.shape))
        del parser, network, layer, w       # before the maps close
    assert sorted(seen) == ["down", "elsewhere", "up"]
    for name, a in ws.items():
        np.testing.assert_array_equal(seen[name], a)


def test_short_data_file_names_the_weight(tmp_path):
    path, ws = _graph(tmp_path)
    data = tmp_path / "g.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(TrtcError, match=r"weight 'down' needs bytes .* of g\.onnx\.data, which has .*short"):
        with MappedWeights(path):
            pass
    data.unlink()
    with pytest.raises(TrtcError, match=r"cannot read the weights of 'up' from .*g\.onnx\.data"):
        with MappedWeights(path):
            pass


def test_engine_writer_keeps_a_full_disk_error():
    """TensorRT swallows an exception raised in IStreamWriter.write and reports the build as done
    (a full disk once left a truncated rank engine and exit 0): the writer must keep the error for
    build_engine to raise."""
    import errno

    from trtc.compiler.build import _file_writer
    from trtc.flavour import FLAVOURS, import_trt

    class Full:
        def __init__(self):
            self.n = 0

        def write(self, data):
            if self.n + len(data) > 10:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(data)
            return len(data)

    w = _file_writer(import_trt(FLAVOURS["tensorrt_rtx"]), Full())
    assert w.write(b"12345") == 5 and w.error is None
    assert w.write(b"1234567890") == 0 and w.error.errno == errno.ENOSPC
    assert w.write(b"1") == 0 and w.written == 5


def test_engine_writer_hashes_exactly_what_it_wrote(tmp_path):
    """The engine's sha256 comes from the writer (packaging does not read a 2 GiB engine back): it
    must be the sha256 of the file's bytes, chunk after chunk."""
    import hashlib

    from trtc.compiler.build import _file_writer
    from trtc.flavour import FLAVOURS, import_trt

    chunks = [bytes(range(256)) * 4096, b"", b"tail", bytes(3000)]
    path = tmp_path / "engine.plan"
    with open(path, "wb") as f:
        w = _file_writer(import_trt(FLAVOURS["tensorrt_rtx"]), f)
        assert [w.write(c) for c in chunks] == [len(c) for c in chunks]
    assert w.error is None and w.written == path.stat().st_size
    assert w.sha256.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_written_sha256_trusts_a_recorded_digest_only_for_the_same_file(tmp_path):
    """A digest recorded by the writer serves the file while it is unchanged (renamed: still the
    same inode); a rewritten file, or a record made for another identity, is read from disk."""
    import hashlib
    import os

    from trtc import artifact as art

    a = tmp_path / "a.engine"
    a.write_bytes(b"x" * 1000)
    real = hashlib.sha256(b"x" * 1000).hexdigest()
    ident = art.file_identity(a)
    assert art.record_sha256(a, "recorded", ident)
    assert art.written_sha256(a) == "recorded"             # not read: the record is used
    b = tmp_path / "b.engine"
    os.replace(a, b)
    assert art.written_sha256(b) == "recorded"             # a rename keeps the identity
    b.write_bytes(b"y" * 1000)                              # same size, new bytes
    os.utime(b, ns=(ident[3] + 10**9, ident[3] + 10**9))    # and a later mtime, whatever the clock's resolution
    assert art.written_sha256(b) == hashlib.sha256(b"y" * 1000).hexdigest()
    c = tmp_path / "c.engine"
    c.write_bytes(b"x" * 1000)
    assert not art.record_sha256(c, "stale", ident)        # another file's identity: not recorded
    assert art.written_sha256(c) == real
