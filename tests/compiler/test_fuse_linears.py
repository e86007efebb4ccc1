"""compiler/fuse_linears.py: MatMuls sharing an input, with float initializer weights, become one
MatMul on the joined weight + Split. Checked on a match and near-misses, on a tiny model's real rank
graph with ONNX Runtime (bit-equal outputs) and with the real TensorRT-RTX parser; the source graph
and its data file stay unchanged and the joined data file holds only the joined weights."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from factories import TINY_MAX_SEQ
from onnx import TensorProto, helper, numpy_helper

from trtc import artifact as art
from trtc.compiler import fuse_linears
from trtc.compiler.mapped_weights import MappedWeights, _parse_with_mapped_weights

H = 16


def _external(t: TensorProto, location: str, offset: int) -> TensorProto:
    length = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _graph(d: Path, dtype=np.float32) -> Path:
    """x[B, H] -> q/k/v (external [H, 16/8/8]) -> sum of their first 8 columns; near-misses on x too:
    a weight behind DequantizeLinear, a MatMul whose B is computed, a lone MatMul on another input."""
    rng = np.random.default_rng(0)
    ty = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    ws = {"q": (H, 16), "k": (H, 8), "v": (H, 8), "o": (8, 8)}
    inits, off = [], 0
    with open(d / "g.onnx.data", "wb") as f:
        for name, shape in ws.items():
            t = numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)
            f.write(b"\0" * (-off % 64))
            off += -off % 64
            f.write(t.raw_data)
            inits.append(_external(t, "g.onnx.data", off))
            off = f.tell()
    inits += [numpy_helper.from_array(rng.integers(-8, 8, (H, 8)).astype(np.int8), "wq"),
              numpy_helper.from_array(np.array(0.1, dtype), "ws"), numpy_helper.from_array(np.array([0, 8]), "sl")]
    nodes = [helper.make_node("MatMul", ["x", n], [f"y_{n}"]) for n in "qkv"]
    nodes += [helper.make_node("Slice", ["y_q", "sl", "sl1"], ["y_q8"], name="slice"),
              helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"]),
              helper.make_node("MatMul", ["x", "wd"], ["y_dq"]),          # B behind DequantizeLinear
              helper.make_node("Transpose", ["x"], ["xt"]),
              helper.make_node("MatMul", ["x", "xt"], ["y_xx"]),         # B not constant
              helper.make_node("MatMul", ["y_k", "o"], ["y_o"]),         # alone on its input
              helper.make_node("Sum", ["y_q8", "y_k", "y_v", "y_dq", "y_o"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([8, 16]), "sl1"))
    outs = [helper.make_tensor_value_info(n, ty, s) for n, s in (("y", ["B", 8]), ("y_xx", ["B", "B"]),
                                                                  ("y_q", ["B", 16]))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", ty, ["B", H])], outs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), d / "g.onnx")
    return d / "g.onnx"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # no fusion by ORT itself
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _fuse(src: Path, out: Path) -> tuple[fuse_linears.Plan, Path]:
    """The joined graph in out, the original data files copied there (compiler/build.py symlinks
    them for TensorRT; onnx's checker refuses symlinked and hard-linked data files)."""
    out.mkdir()
    for f in src.parent.glob("*.data"):
        shutil.copy(f, out / f.name)
    plan = fuse_linears.plan(src)
    plan.write(out / src.name, out / f"{src.name}.joined.data")
    return plan, out / src.name


def test_joins_qkv_and_leaves_near_misses(tmp_path):
    src = _graph(tmp_path)
    before = (_sha(src), _sha(tmp_path / "g.onnx.data"))
    plan, fused = _fuse(src, tmp_path / "fused")
    assert [(g.a, g.weights, g.widths) for g in plan.groups] == [("x", ("q", "k", "v"), (16, 8, 8))]
    assert (_sha(src), _sha(tmp_path / "g.onnx.data")) == before
    m = onnx.load(str(fused), load_external_data=False)
    onnx.checker.check_model(str(fused))          # by path: its data files are checked where they lie
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Split") == 1      # joined + dq + xx + o
    assert {t.name for t in m.graph.initializer} >= {"q+k+v", "o", "wq"}
    assert not {"q", "k", "v"} & {t.name for t in m.graph.initializer}
    # the joined data file holds the joined [16, 32] float32 weight and nothing else
    assert (tmp_path / "fused" / "g.onnx.joined.data").stat().st_size == H * 32 * 4
    x = np.random.default_rng(1).standard_normal((3, H)).astype(np.float32)
    for a, b in zip(_run(src, {"x": x}), _run(fused, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_no_group_when_inputs_differ(tmp_path):
    """q on x, k on x2: a near-miss of the pattern (same K, different input)."""
    w = [numpy_helper.from_array(np.ones((H, 4), np.float32), n) for n in "qk"]
    nodes = [helper.make_node("MatMul", ["x", "q"], ["a"]), helper.make_node("MatMul", ["x2", "k"], ["b"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, H]) for n in ("x", "x2")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "ab"]
    g = helper.make_graph(nodes, "g", vi, outs, w)
    assert fuse_linears.find_groups(helper.make_model(g)) == []


@pytest.fixture(scope="module", params=["float32", "float16"])
def tiny_rank_graph(request, tiny_model, tmp_path_factory):
    from trtc.compiler.pipeline import export_model

    exp, _ = export_model(str(tiny_model("llama")), tmp_path_factory.mktemp("fuse") / "exp", dtype=request.param,
                          max_seq_len=TINY_MAX_SEQ)
    return exp


def _feeds(sess: ort.InferenceSession, batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    """Prefill of `seq` tokens after `past` cached ones: random ids and caches, positions past..past+seq."""
    rng = np.random.default_rng(2)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == art.INPUT_IDS:
            feeds[i.name] = rng.integers(0, 200, (batch, seq)).astype(np.int64)
        elif i.name == art.POSITION_IDS:
            feeds[i.name] = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64)
        else:
            assert i.name.startswith(art.PAST_PREFIX), i.name
            dt = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = rng.standard_normal([batch, *i.shape[1:]]).astype(dt)
    return feeds


def test_tiny_rank_graph_equal_on_onnxruntime_and_parsed_by_tensorrt_rtx(tiny_rank_graph, tmp_path, rtx_flavour):
    """The joined rank graph of a tiny Llama gives bit-equal outputs on ONNX Runtime (every output:
    logits and the updated caches), with ORT's own graph optimizations on, as the reference backend
    runs graphs; and the real TensorRT-RTX parser takes it with its weights from the maps."""
    src = tiny_rank_graph / "rank0.onnx"
    before = {p.name: _sha(p) for p in tiny_rank_graph.iterdir() if p.is_file()}
    plan, fused = _fuse(src, tmp_path / "fused")
    layers = art.read_export_config(tiny_rank_graph).spec.num_layers
    assert [len(g.nodes) for g in plan.groups] == [3, 2] * layers        # q/k/v and gate/up per layer
    assert {p.name: _sha(p) for p in tiny_rank_graph.iterdir() if p.is_file()} == before
    assert (tmp_path / "fused" / "rank0.onnx.joined.data").stat().st_size == plan.nbytes
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    for batch, seq, past in ((2, 7, 0), (3, 1, 5)):
        feeds = _feeds(a, batch, seq, past)
        outs_a, outs_b = a.run(None, feeds), b.run(None, feeds)
        assert len(outs_a) == 1 + 2 * layers
        for x, y in zip(outs_a, outs_b):
            np.testing.assert_array_equal(x, y)

    from trtc.flavour import import_trt, make_logger

    trt = import_trt(rtx_flavour)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    with MappedWeights(fused) as weights:
        assert "rank0.onnx.joined.data" in {t.file.name for t in weights.tensors}
        parser = trt.OnnxParser(network, logger)
        _parse_with_mapped_weights(parser, fused, weights, rtx_flavour.name)
        kinds = [network.get_layer(i).type for i in range(network.num_layers)]
        del parser, network
    assert kinds.count(trt.LayerType.SLICE) >= 2 * layers     # one Split per group: a slice per output


def _isolated_build(graph: Path, out: Path, rtx_flavour):
    from trtc.artifact import BuildConfig
    from trtc.compiler.build import build_engine_isolated

    spec = art.read_export_config(graph.parent).spec
    cfg = BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=TINY_MAX_SEQ, targets=("sm_89",))
    out.mkdir()
    return build_engine_isolated(graph, spec, cfg, rtx_flavour, out / "rank0.engine")


def test_isolated_build_joins_in_scratch_and_removes_it(tiny_rank_graph, tmp_path, rtx_flavour, monkeypatch):
    """build_engine_isolated writes the joined weights to a scratch dir beside the engine's dir
    (TRTC_WORK_DIR unset), removes it after the build and after an interrupted one, and refuses to
    start when the disk cannot hold them, naming the size; the export dir is never written."""
    from trtc.compiler import build, package
    from trtc.errors import TrtcError

    monkeypatch.delenv("TRTC_WORK_DIR", raising=False)
    src = tiny_rank_graph / "rank0.onnx"
    before = {p.name: _sha(p) for p in tiny_rank_graph.iterdir() if p.is_file()}
    seen = []
    real = build._run_worker

    def run_and_look(*a, **k):   # the worker's dir while it runs: the joined graph and its data
        seen.extend(sorted(p.name for p in tmp_path.glob(".trtc-work-*/*")))
        return real(*a, **k)

    monkeypatch.setattr(build, "_run_worker", run_and_look)
    profiles, _ = _isolated_build(src, tmp_path / "ok", rtx_flavour)
    assert seen == ["rank0.onnx.joined.data"] and len(profiles) == 2
    assert (tmp_path / "ok" / "rank0.engine").stat().st_size > 0
    assert not list(tmp_path.glob(".trtc-work-*"))

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(build, "_run_worker", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _isolated_build(src, tmp_path / "int", rtx_flavour)
    assert not list(tmp_path.glob(".trtc-work-*"))

    monkeypatch.setattr(package.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 100))
    with pytest.raises(TrtcError, match=r"needs about .* GiB of scratch space .* TRTC_WORK_DIR"):
        _isolated_build(src, tmp_path / "full", rtx_flavour)
    assert not list(tmp_path.glob(".trtc-work-*"))
    assert {p.name: _sha(p) for p in tiny_rank_graph.iterdir() if p.is_file()} == before
