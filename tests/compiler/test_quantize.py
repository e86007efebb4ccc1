"""Quantization: config validation and target policy, the numpy quantizers, and each mode end to end
on a tiny Llama. The float rank graph is exported once; each mode runs the quantize stage on it and
the result runs on ONNX Runtime. Real TensorRT-RTX builds only where the build is the check: each
stored weight format is accepted for its targets, and a quantized export dir builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from factories import TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ
from trtc import artifact as art
from trtc.flavour import FLAVOURS
from trtc.compiler import quant_algos as qat
from trtc.compiler.quantize import (QuantConfig, check_targets, default_targets, grid_of, make_quant_config,
                                    qdq, quant_nvfp4, resolve_for_model)
from trtc.errors import TrtcError

RTX = FLAVOURS["tensorrt_rtx"]


# --- config and checks -------------------------------------------------------------------------

def test_config_validates_and_fingerprints():
    with pytest.raises(TrtcError, match="--quant 'int3' is unknown"):
        QuantConfig(algo="int3")
    with pytest.raises(TrtcError, match="--kv-cache-dtype"):
        QuantConfig(kv_cache_dtype="int4")
    with pytest.raises(TrtcError, match="--group-size 0"):
        QuantConfig(algo="int4_awq", group_size=0)
    a = make_quant_config("int4_awq")
    assert a.calib_source == "bundled:calib.txt" and len(a.calib_sha256) == 64
    # the fingerprint covers what changes the graph: group size for int4, not for int8_wo
    assert make_quant_config("int4_awq", group_size=64).fingerprint() != a.fingerprint()
    assert make_quant_config("int8_wo", group_size=64).fingerprint() == make_quant_config("int8_wo").fingerprint()
    # outlier channels: a per-mode default, only for grids with an exact zero, part of the fingerprint
    assert make_quant_config("fp8").outlier_channels == 16 and make_quant_config("int4_awq").outlier_channels == 0
    assert make_quant_config("fp8", outlier_channels=0).fingerprint() != make_quant_config("fp8").fingerprint()
    with pytest.raises(TrtcError, match="--outlier-channels applies to --quant fp8, int8_wo, int8_awq, not int4_awq"):
        make_quant_config("int4_awq", outlier_channels=8)
    with pytest.raises(TrtcError, match="--outlier-channels -1 must be 0"):
        make_quant_config("fp8", outlier_channels=-1)
    # low-rank correction: any mode with a weight grid; it makes int4_rtn calibrate (x^T x)
    assert make_quant_config("int4_rtn", low_rank=4).fingerprint() != make_quant_config("int4_rtn").fingerprint()
    assert make_quant_config("int4_rtn", low_rank=4).needs_calibration
    assert "low_rank" not in make_quant_config("nvfp4").to_dict()
    with pytest.raises(TrtcError, match="--low-rank applies to --quant .*int4_awq.*, not nvfp4"):
        make_quant_config("nvfp4", low_rank=8)
    with pytest.raises(TrtcError, match="--low-rank -2 must be 0"):
        make_quant_config("int4_awq", low_rank=-2)
    assert make_quant_config("int4_awq").low_rank == 64 and make_quant_config("int4_rtn").low_rank == 0
    assert "low_rank_explicit" not in make_quant_config("int4_awq", low_rank=8).to_dict()


def test_calibration_file_errors(tmp_path):
    with pytest.raises(TrtcError, match="no such file"):
        make_quant_config("fp8", calib_data=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TrtcError, match="is empty"):
        make_quant_config("fp8", calib_data=str(tmp_path / "empty.txt"))
    (tmp_path / "c.txt").write_text("some text")
    q = make_quant_config("fp8", calib_data=str(tmp_path / "c.txt"))
    assert q.calib_sha256 == __import__("hashlib").sha256(b"some text").hexdigest()


def test_target_checks_name_target_and_alternative():
    with pytest.raises(TrtcError, match=r"--quant nvfp4 needs compute capability 12\.0\+.*sm_89.*--target sm_120.*fp8 or int4_awq"):
        check_targets(QuantConfig(algo="nvfp4"), RTX, ("sm_89",))
    with pytest.raises(TrtcError, match=r"--quant fp8 needs compute capability 8\.9\+.*sm_80, sm_86.*int8_wo"):
        check_targets(QuantConfig(algo="fp8"), RTX, ("sm_80", "sm_86", "sm_89"))
    with pytest.raises(TrtcError, match="kv-cache-dtype fp8"):
        check_targets(QuantConfig(kv_cache_dtype="fp8"), RTX, ("sm_86",))
    check_targets(QuantConfig(algo="int4_awq"), RTX, ("sm_75", "sm_120"))
    # datacenter TensorRT: FP8 from 9.0 targets (8.9 too), NVFP4 from sm_100
    with pytest.raises(TrtcError, match="12.0|10.0"):
        check_targets(QuantConfig(algo="nvfp4"), FLAVOURS["tensorrt"], ("sm_90",))
    assert default_targets(QuantConfig(algo="fp8"), RTX) == ("sm_89", "sm_120")
    assert default_targets(QuantConfig(algo="nvfp4"), RTX) == ("sm_120",)
    assert default_targets(QuantConfig(algo="int8_wo"), RTX) == RTX.default_targets
    # below FP8's targets the alternative to nvfp4 is int4 only; no config, no requirement
    with pytest.raises(TrtcError, match=r"target sm_86 is older; build for --target sm_120,sm_121, or use --quant int4_awq$"):
        check_targets(QuantConfig(algo="nvfp4"), RTX, ("sm_86",))
    check_targets(None, RTX, ("sm_75",))


def _spec(hidden: int, heads: int, head_dim: int, intermediate: int):
    """A real ModelSpec with the layer sizes resolve_for_model checks."""
    import dataclasses

    from factories import pass_test_spec

    return dataclasses.replace(pass_test_spec(num_heads=heads, num_kv_heads=heads, head_dim=head_dim),
                               hidden_size=hidden, intermediate_size=intermediate)


def test_group_size_against_model():
    spec = _spec(576, 9, 64, 1536)     # SmolLM2-135M sizes
    assert resolve_for_model(make_quant_config("int4_awq"), spec).group_size == 64   # default falls back
    with pytest.raises(TrtcError, match="--group-size 128 does not divide the hidden size 576"):
        resolve_for_model(make_quant_config("int4_awq", group_size=128), spec)      # explicit: never changed
    assert resolve_for_model(make_quant_config("int4_awq", group_size=32), spec).group_size == 32
    # the default low rank (64) fits SmolLM2; on a tiny model it shrinks, an explicit one is refused
    assert resolve_for_model(make_quant_config("int4_awq"), spec).low_rank == 64
    tiny = _spec(64, 4, 16, 128)
    assert resolve_for_model(make_quant_config("int4_awq"), tiny).low_rank == 8
    with pytest.raises(TrtcError, match="--low-rank 64 is too large for the hidden size 64"):
        resolve_for_model(make_quant_config("int4_awq", low_rank=64), tiny)


# --- quantizers (torch, called with numpy arrays here) ------------------------------------------

def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(qat.device()) if isinstance(a, np.ndarray) else a


def _np(out):
    if isinstance(out, tuple):
        return tuple(_np(o) for o in out)
    return qat.numpy(out) if isinstance(out, torch.Tensor) else out


class qa:
    """quant_algos with numpy in and out (the torch tensors keep the arrays' dtypes)."""
    @staticmethod
    def rtn(w, grid, clip=1.0):
        return _np(qat.rtn(_t(w), grid, _t(clip)))

    @staticmethod
    def dequantize(q, grid, s, lo):
        return _np(qat.dequantize(_t(q), grid, _t(s), _t(lo)))

    @staticmethod
    def gptq(w, H, grid, **kw):
        return _np(qat.gptq(_t(w), _t(H), grid, **kw))

    @staticmethod
    def low_rank(e, H, r, **kw):
        return _np(qat.low_rank(_t(e), _t(H), r, **kw))

    @staticmethod
    def clip_search(w, x, grid):
        return _np(qat.clip_search(_t(w), _t(x), grid))

    @staticmethod
    def awq_scales(x, mean_abs, ws, qdq):
        return _np(qat.awq_scales(_t(x), _t(mean_abs), [_t(w) for w in ws], qdq))


def test_grids_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 96)).astype(np.float32)
    g8 = grid_of("int8_wo", 64)
    q, s, lo = qa.rtn(w, g8)
    assert lo is None and s.shape == (1, 96) and q.min() >= -127 and q.max() <= 127
    assert np.abs(qa.dequantize(q, g8, s, lo) - w).max() <= s.max() / 2 + 1e-6
    g4 = grid_of("int4_awq", 64)
    q4, s4, lo4 = qa.rtn(w, g4)
    assert q4.min() >= 0 and q4.max() <= 15 and s4.shape == lo4.shape == (4, 96)
    assert np.abs(qa.dequantize(q4, g4, s4, lo4) - w).max() <= s4.max() / 2 + 1e-6
    gf = grid_of("fp8", 64)
    f8, sf, _ = qa.rtn(w, gf)
    assert np.abs(qa.dequantize(f8, gf, sf, None) - w).max() <= np.abs(w).max() * 2 ** -4
    f4, s8, g = quant_nvfp4(w)
    deq = (f4.astype(np.float32).reshape(16, 16, 96) * (s8.astype(np.float32) * g)[:, None, :]).reshape(256, 96)
    assert np.abs(deq - w).max() <= np.abs(w).max() * 0.25


def test_affine_int4_reproduces_a_q4_1_grid_exactly():
    """Weights that already lie on a Q4_1 grid (scale and min per 32 rows, all 16 levels used) come
    back unchanged from the affine int4 grid at group 32: the float offset is what makes this so."""
    rng = np.random.default_rng(2)
    u = rng.integers(0, 16, (128, 8)).astype(np.float32)
    u[::32] = 0
    u[1::32] = 15
    d = rng.uniform(0.01, 0.1, (4, 1, 8)).astype(np.float32)
    m = rng.uniform(-1, 0, (4, 1, 8)).astype(np.float32)
    w = (u.reshape(4, 32, 8) * d + m).reshape(128, 8)
    g = grid_of("int4_rtn", 32)
    q, s, lo = qa.rtn(w, g)
    np.testing.assert_allclose(qa.dequantize(q, g, s, lo), w, atol=1e-6)


def _correlated(rng, n, k):
    base = rng.standard_normal((n, 8))
    x = base @ rng.standard_normal((8, k)) + 0.1 * rng.standard_normal((n, k))
    x[:, :4] *= 20.0                            # a few salient input channels, as in real LLMs
    return x.astype(np.float32)


@pytest.mark.parametrize("algo", ["int8_wo", "int4_awq", "fp8"])
def test_gptq_lowers_output_error_vs_rtn(algo):
    """On correlated inputs, GPTQ's rounding gives a smaller output error ||x W - x Q(W)|| than
    round-to-nearest on the same grid, on held-out rows drawn from the same distribution."""
    rng = np.random.default_rng(3)
    x = _correlated(rng, 2048, 128)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    grid = grid_of(algo, 32)
    held = x[1024:]
    H = x[:1024].T @ x[:1024] / 1024
    q, s, lo = qa.gptq(w, H, grid)
    err_gptq = np.linalg.norm(held @ (qa.dequantize(q, grid, s, lo) - w))
    q, s, lo = qa.rtn(w, grid)
    err_rtn = np.linalg.norm(held @ (qa.dequantize(q, grid, s, lo) - w))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_low_rank_correction_is_the_best_rank_r_fix_for_the_inputs():
    """quant_algos.low_rank: on held-out correlated inputs the rank-r correction of a GPTQ int4
    weight's error lowers the output error, more with more rank, exactly to zero at full rank; on
    the calibration inputs it is no worse than the plain (activation-blind) SVD of the error."""
    rng = np.random.default_rng(5)
    x = _correlated(rng, 4096, 128)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    grid = grid_of("int4_awq", 32)
    H = x[:2048].T @ x[:2048] / 2048
    q, s, lo = qa.gptq(w, H, grid)
    e = w - qa.dequantize(q, grid, s, lo)
    held = x[2048:]
    errs = []
    for r in (0, 4, 16, 64):
        a, b = qa.low_rank(e, H, r) if r else (np.zeros((128, 0)), np.zeros((0, 64)))
        assert a.shape == (128, r) and b.shape == (r, 64)
        errs.append(np.linalg.norm(held @ (e - a @ b)) / np.linalg.norm(held @ e))
    assert abs(errs[0] - 1) < 1e-6 and errs[0] > errs[1] > errs[2] and errs[3] < 1e-3, errs
    # optimal for the calibration inputs: no worse there than the activation-blind SVD of e
    cal = x[:2048]
    a, b = qa.low_rank(e, H, 4, damp=0.0)
    u, sv, vt = np.linalg.svd(e, full_matrices=False)
    assert np.linalg.norm(cal @ (e - a @ b)) <= np.linalg.norm(cal @ (e - (u[:, :4] * sv[:4]) @ vt[:4]))


def test_awq_never_worse_than_rtn_on_its_data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 128)).astype(np.float32)
    x[:, :4] *= 30.0                            # a few salient input channels, as in real LLMs
    ws = [rng.standard_normal((128, 64)).astype(np.float32) for _ in range(2)]
    s, alpha, ratio = qa.awq_scales(x, np.abs(x).mean(0), ws, qdq("int4_awq", 32))
    assert s.shape == (128,) and 0.0 <= alpha <= 1.0
    assert ratio < 0.9                           # salient channels: scaling clearly helps


def test_clip_search_never_worse_than_full_range():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[5, 3] = 12.0                              # one outlier stretches its group's range
    grid = grid_of("int4_awq", 32)
    clip = qa.clip_search(w, x, grid)
    assert clip.shape == (2, 32) and clip.min() >= 0.5 and clip.max() <= 1.0
    errs = []
    for c in (1.0, clip):
        q, s, lo = qa.rtn(w, grid, c)
        errs.append(np.linalg.norm(x @ (qa.dequantize(q, grid, s, lo) - w)))
    assert errs[1] <= errs[0]


# --- the policy through the Python API ---------------------------------------------------------

def test_build_model_refuses_unsupported_target_before_any_work(tmp_path):
    """build_model applies check_targets itself (not only the CLI): the model path does not exist,
    so the target error can only come first if it is checked before anything is loaded."""
    from trtc.compiler.pipeline import build_model

    with pytest.raises(TrtcError, match=r"--quant fp8 needs compute capability 8\.9\+.*sm_86.*--quant int8_wo"):
        build_model(str(tmp_path / "no-such-model"), tmp_path / "out", RTX, ("sm_86",),
                    quant=make_quant_config("fp8"))
    assert not (tmp_path / "out").exists()


def test_calibrated_modes_refuse_bfloat16_before_exporting(tiny_model, tmp_path):
    """Calibration runs the float graph on ONNX Runtime, which has no bfloat16 kernels: a clear error
    before any export work (it used to be a KeyError inside calibration)."""
    from trtc.compiler.pipeline import build_model, export_model

    with pytest.raises(TrtcError, match="cannot run bfloat16 graphs; quantize with --dtype float16"):
        build_model(str(tiny_model("llama")), tmp_path / "out", RTX, ("sm_89",), dtype="bfloat16",
                    quant=make_quant_config("int8_wo"))
    with pytest.raises(TrtcError, match="cannot run bfloat16"):
        export_model(str(tiny_model("llama")), tmp_path / "exp", dtype="bfloat16", quant=make_quant_config("fp8"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_export_dir_quantized_at_export_keeps_the_target_policy(tiny_model, tmp_path):
    """An export dir quantized with fp8 cannot be built for sm_86 either."""
    from trtc.compiler.pipeline import build_model, export_model

    exp, _ = export_model(str(tiny_model("llama")), tmp_path / "exp", max_seq_len=TINY_MAX_SEQ,
                          quant=make_quant_config("fp8", calib_samples=2))
    with pytest.raises(TrtcError, match=r"--quant fp8 needs compute capability 8\.9\+.*sm_86"):
        build_model(str(exp), tmp_path / "out", RTX, ("sm_86",), max_batch_size=TINY_MAX_BATCH,
                    max_input_len=TINY_MAX_INPUT)
    assert not (tmp_path / "out").exists()


# --- end to end on a tiny model: the quantize stage on one float export, run on ONNX Runtime -----

@pytest.fixture(scope="module")
def tiny_export(tiny_model, tmp_path_factory):
    from trtc.compiler.pipeline import export_model

    out = tmp_path_factory.mktemp("quant") / "export"
    export_model(str(tiny_model("llama")), out, max_seq_len=TINY_MAX_SEQ)
    return out


def _quantize(export_dir: Path, out_dir: Path, src: Path | None = None, **quant) -> tuple[Path, dict]:
    """The quantize stage alone on the export dir's float rank graph (or `src`, a graph of the same
    model): (quantized graph, report)."""
    from trtc.compiler.quantize import quantize_rank_graph

    cfg = art.read_export_config(export_dir)
    out_dir.mkdir(parents=True)
    res = quantize_rank_graph(src or export_dir / art.rank_onnx(0), out_dir / art.rank_onnx(0), cfg.spec,
                              make_quant_config(**quant), export_dir, cfg.export_config.max_seq_len)
    return res.onnx_path, res.report


def _logits(onnx_path: Path, export_dir: Path) -> np.ndarray:
    """Logits [S, vocab] of a prompt from a rank graph on ONNX Runtime (empty cache), with the
    reference backend's setting for quantized graphs: basic graph optimizations only
    (runtime/ort_session.py says why)."""
    import onnxruntime as ort
    from factories import PROMPTS
    from transformers import AutoTokenizer

    spec = art.read_export_config(export_dir).spec
    ids = np.array([AutoTokenizer.from_pretrained(export_dir)(PROMPTS[3])["input_ids"]])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    cache = np.zeros(art.cache_shape(1, spec.num_kv_heads, TINY_MAX_SEQ, spec.head_dim), np.float32)
    feeds = {art.INPUT_IDS: ids, art.POSITION_IDS: np.arange(ids.shape[1])[None],
             **{past: cache for past, _ in art.cache_names(spec.num_layers)}}
    return sess.run([art.LOGITS], feeds)[0][0]


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _initializers(onnx_path: Path, with_values: bool = False) -> dict:
    """name -> TensorProto (values loaded only when asked)."""
    import onnx

    return {t.name: t for t in onnx.load(str(onnx_path), load_external_data=with_values).graph.initializer}


@pytest.fixture(scope="module")
def float_logits(tiny_export):
    return _logits(tiny_export / art.rank_onnx(0), tiny_export)


# The configs the tests below quantize the tiny export with (each once per module).
QUANT = {
    "int8_wo": {"algo": "int8_wo"},
    "int8_awq": {"algo": "int8_awq", "outlier_channels": 8},
    "int4_awq": {"algo": "int4_awq"},                           # g64, low rank 8 (defaults shrunk)
    "int4_rtn": {"algo": "int4_rtn", "group_size": 32},
    "int4_rtn_lr8": {"algo": "int4_rtn", "group_size": 32, "low_rank": 8},
    "fp8": {"algo": "fp8", "low_rank": 4},                      # + 16 outlier channels (default)
    "kv_int8": {"kv_cache_dtype": "int8"},
    "kv_fp8": {"kv_cache_dtype": "fp8"},
    "nvfp4": {"algo": "nvfp4"},
}


@pytest.fixture(scope="module")
def quantized(tiny_export, tmp_path_factory):
    """name in QUANT -> (quantized rank graph, report)."""
    root = tmp_path_factory.mktemp("quantized")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            cache[name] = _quantize(tiny_export, root / name, **QUANT[name])
        return cache[name]

    return get


# mode -> (stored weight type, max relative logit error vs the float graph).
# Tolerance = 1.5x the error measured on this tiny random-weight Llama (deterministic: calibration
# and rounding draw no random numbers; the margin covers BLAS differences between machines), so a
# change that makes a mode clearly worse fails. Random weights have no structure for int4 to keep:
# its error is large here, not on real models (bench/RESULTS-quant.md).
MODES = {
    "int8_wo": ("INT8", 0.050),             # 0.0330 measured
    "int8_awq": ("INT8", 0.076),            # 0.0508
    "int4_awq": ("INT4", 0.65),             # 0.434
    "int4_rtn": ("INT4", 0.61),             # 0.406
    "fp8": ("FLOAT8E4M3FN", 0.25),          # 0.165
    "kv_int8": (None, 0.047),               # 0.0311
    "kv_fp8": (None, 0.29),                 # 0.191 (e4m3: 3 mantissa bits)
}


@pytest.mark.parametrize("mode", MODES)
def test_mode_quantizes_every_linear(mode, quantized, tiny_export, float_logits):
    import onnx

    (wtype, tol), kw = MODES[mode], QUANT[mode]
    path, rep = quantized(mode)
    assert rep["config"]["algo"] == kw.get("algo", "none")
    if wtype is not None:
        stored = [n for n, t in _initializers(path).items()
                  if t.data_type == getattr(onnx.TensorProto, wtype) and not n.endswith("_zp")]
        assert len(stored) == rep["quantized_linears"] == 14          # 7 linears x 2 layers; lm_head excluded
        assert "lm_head" in rep["excluded"]
        assert rep.get("group_size") in (None, kw.get("group_size", 64))   # 128 does not divide hidden 64
    if "calibration" in rep:
        assert rep["calibration"]["sha256"] == make_quant_config().calib_sha256
    err = _rel_err(_logits(path, tiny_export), float_logits)
    assert 0 < err < tol, err


def test_nvfp4_stores_fp4_weights(quantized):
    """ONNX Runtime 1.32 has no FP4 DequantizeLinear kernel: the graph is checked by its build
    (test_quantized_graph_builds) and its initializers, not its numerics."""
    import onnx

    path, rep = quantized("nvfp4")
    types = [t.data_type for t in _initializers(path).values()]
    assert types.count(onnx.TensorProto.FLOAT4E2M1) == rep["quantized_linears"] == 14
    assert types.count(onnx.TensorProto.FLOAT8E4M3FN) == 14                 # block scales
    assert "calibration" not in rep


def _massive_activation_graph(export_dir: Path, out_dir: Path) -> Path:
    """The export's rank graph with channel 7 of each decoder layer's RMSNorm weights x3000 (the
    input and post-attention norms: every RMSNormalization but the last, the final norm), as
    scaling those weights in the torch model would export it."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(export_dir / art.rank_onnx(0)))         # tiny: all weights in memory
    norms = [n for n in m.graph.node if n.op_type == "RMSNormalization"]
    assert len(norms) == 2 * 2 + 1
    inits = {t.name: t for t in m.graph.initializer}
    for i, n in enumerate(norms[:-1]):
        w = numpy_helper.to_array(inits[n.input[1]]).copy()
        w[7] *= 3000
        m.graph.initializer.append(numpy_helper.from_array(w, f"massive_norm_{i}"))
        n.input[1] = f"massive_norm_{i}"
    out_dir.mkdir()
    onnx.save_model(m, str(out_dir / art.rank_onnx(0)))
    return out_dir / art.rank_onnx(0)


def test_fp8_outlier_channels(tiny_export, tmp_path):
    """fp8's outlier decomposition on a tiny Llama whose normalized activations have one channel
    ~3000x the others (massive activations, as real LLMs have): a per-tensor FP8 scale then
    pushes every other channel into FP8's subnormals. Keeping the 4 largest channels out of FP8
    (their float weight rows in a separate MatMul, zero rows in the FP8 weight) must cut the logit
    error (measured 0.170 -> 0.088 relative)."""
    import onnx
    from onnx import numpy_helper

    src = _massive_activation_graph(tiny_export, tmp_path / "massive")
    ref = _logits(src, tiny_export)
    errs = {}
    for n in (0, 4):
        path, rep = _quantize(tiny_export, tmp_path / f"fp8-o{n}", src=src, algo="fp8", outlier_channels=n)
        errs[n] = _rel_err(_logits(path, tiny_export), ref)
        assert rep["config"]["outlier_channels"] == n
        inits = _initializers(path, with_values=True)
        idx = {k: numpy_helper.to_array(t) for k, t in inits.items() if k.endswith("_outlier_idx")}
        rows = {k: t for k, t in inits.items() if k.endswith("_outlier_rows")}
        fp8 = {k: numpy_helper.to_array(t) for k, t in inits.items()
               if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and not k.endswith("_zp")}
        if n == 0:
            assert not idx and not rows and "outlier_channels" not in rep
            continue
        assert rep["outlier_channels"]["per_linear"] == 4
        # 4 activations per layer (q/k/v input, o input, gate/up input, down input) x 2 layers
        assert len(idx) == 8 and all(len(v) == 4 for v in idx.values())
        # the scaled channel is an outlier of the post-norm activations (q/k/v and gate/up inputs)
        assert sum(7 in v for v in idx.values()) >= 4
        assert len(rows) == len(fp8) == 14
        for q in fp8.values():            # outlier rows are exactly zero in the FP8 weight
            assert (q.astype(np.float32) == 0).all(1).sum() >= 4
    assert errs[4] < 0.7 * errs[0], errs


def test_low_rank_correction_end_to_end(quantized, tiny_export, float_logits):
    """--low-rank on int4_rtn: each quantized linear gets int8 factors A [K, r], B [r, N] (scale per
    column) in a (x @ A) @ B branch added to its output; the logit error against the float graph drops."""
    import onnx

    errs = {}
    for r, name in ((0, "int4_rtn"), (8, "int4_rtn_lr8")):
        path, rep = quantized(name)
        errs[r] = _rel_err(_logits(path, tiny_export), float_logits)
        assert rep["config"]["low_rank"] == r
        fac = {k: t for k, t in _initializers(path).items() if k.endswith(("_lowrank_a", "_lowrank_b"))}
        if r == 0:
            assert not fac and "low_rank" not in rep and "calibration" not in rep
            continue
        assert "calibration" in rep and 0 < rep["low_rank"]["calib_error_ratio_mean"] < 1
        a = [t.dims for k, t in fac.items() if k.endswith("_lowrank_a")]
        b = [t.dims for k, t in fac.items() if k.endswith("_lowrank_b")]
        assert len(a) == len(b) == 14 and all(d[1] == 8 for d in a) and all(d[0] == 8 for d in b)
        assert all(t.data_type == onnx.TensorProto.INT8 for t in fac.values())
        adds = [n for n in onnx.load(str(path), load_external_data=False).graph.node
                if n.op_type == "Add" and n.name.endswith("_lr_add")]
        assert len(adds) == 14
    assert errs[8] < 0.9 * errs[0], errs           # measured 0.406 -> 0.312


# --- real builds: what TensorRT-RTX must accept ------------------------------------------------

# name in QUANT -> target. Together they cover every node form the rewrite writes: AWQ's Mul, int8
# per-column DQ and outlier rows; blockwise int4 DQ, group sums and int8 low-rank factors; FP8
# activation Q/DQ (sm_89+); 8-bit K/V Q/DQ before the cache write; FP4 weights with FP8 block scales.
BUILDS = {"int8_awq": "sm_80", "int4_awq": "sm_80", "fp8": "sm_89", "kv_int8": "sm_80", "kv_fp8": "sm_89",
          "nvfp4": "sm_120"}


@pytest.mark.parametrize("name", BUILDS)
def test_quantized_graph_builds(name, quantized, tiny_export, tmp_path):
    """The build stage alone on the quantized graph, with the real builder, for the target."""
    from trtc.compiler.build import build_engine

    path, _ = quantized(name)
    cfg = art.BuildConfig(TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ, (BUILDS[name],))
    build_engine(path, art.read_export_config(tiny_export).spec, cfg, RTX, tmp_path / art.rank_engine(0))
    assert (tmp_path / art.rank_engine(0)).stat().st_size > 0


def _build(export_dir: Path, out: Path, target: str, **quant) -> Path:
    from trtc.compiler.pipeline import build_model

    build_model(str(export_dir), out, RTX, (target,), max_batch_size=TINY_MAX_BATCH,
                max_input_len=TINY_MAX_INPUT, keep_onnx=True, quant=make_quant_config(**quant))
    return out


def _session_logits(engine_dir: Path) -> np.ndarray:
    """The prompt's logits [S, vocab] from the engine dir on the reference backend."""
    from factories import PROMPTS
    from transformers import AutoTokenizer

    from trtc.runtime.api import open_session
    from trtc.runtime.engine_dir import load_engine_dir

    s = open_session(load_engine_dir(engine_dir), "onnxruntime")
    s.allocate(1)
    ids = AutoTokenizer.from_pretrained(engine_dir)(PROMPTS[3])["input_ids"]
    return s.step(np.array([ids]), np.arange(len(ids))[None])[0]


@pytest.mark.slow     # a second export, then a pipeline build: 9-17 s here
def test_quantized_export_dir_builds_once(tiny_model, tmp_path):
    """A dir exported with --quant builds without re-quantizing (a second --quant is refused), and
    the engine dir's reference backend runs its graph as the helper above does."""
    from trtc.compiler.pipeline import export_model

    out = tmp_path / "qexport"
    export_model(str(tiny_model("llama")), out, max_seq_len=TINY_MAX_SEQ, quant=make_quant_config("int8_wo"))
    assert art.read_export_config(out).quantization["quant_algo"] == "int8_wo"
    with pytest.raises(TrtcError, match="was quantized at export"):
        _build(out, tmp_path / "e", "sm_89", algo="int4_awq")
    eng = _build(out, tmp_path / "e2", "sm_89")          # no --quant: the export's quantization carries over
    assert art.read_engine_config(eng).quantization["quant_algo"] == "int8_wo"
    np.testing.assert_allclose(_session_logits(eng), _logits(eng / art.rank_onnx(0), out), rtol=0, atol=1e-5)


def test_nvfp4_engine_dir_is_refused_by_the_reference_backend(tiny_export, tmp_path):
    from trtc.runtime.api import open_session
    from trtc.runtime.engine_dir import load_engine_dir

    eng = _build(tiny_export, tmp_path / "nvfp4", "sm_120", algo="nvfp4")
    with pytest.raises(TrtcError, match=r"cannot run .*--quant nvfp4.*DequantizeLinear.*--backend tensorrt"):
        open_session(load_engine_dir(eng), "onnxruntime")


# --- bad input through the command: exit 2, one line, nothing written ---------------------------

def test_cli_bad_quant_input(tmp_path, tiny_model):
    from test_errors import assert_nothing_written, assert_user_error, trtc

    m = tiny_model("llama")
    res = trtc("build", "--model", m, "--output", tmp_path / "o1", "--quant", "int3")
    assert res.code == 2 and "Invalid value for '--quant'" in res.stderr
    res = trtc("build", "--model", m, "--output", tmp_path / "o2", "--quant", "nvfp4", "--target", "sm_89",
               "--flavour", "tensorrt_rtx")
    assert_user_error(res, "nvfp4", "sm_89", "--target sm_120")
    res = trtc("build", "--model", m, "--output", tmp_path / "o3", "--quant", "fp8",
               "--calib-data", tmp_path / "missing.txt")
    assert_user_error(res, "missing.txt", "no such file")
    (tmp_path / "empty.txt").write_text("")
    res = trtc("export", "--model", m, "--output", tmp_path / "o4", "--quant", "int4_awq",
               "--calib-data", tmp_path / "empty.txt")
    assert_user_error(res, "empty")
    res = trtc("build", "--model", m, "--output", tmp_path / "o5", "--quant", "int4_awq", "--group-size", "48")
    assert_user_error(res, "--group-size 48 does not divide the hidden size 64")
    res = trtc("build", "--model", m, "--output", tmp_path / "o6", "--quant", "fp8", "--outlier-channels", "40")
    assert_user_error(res, "--outlier-channels 40 is too many for the hidden size 64")
    res = trtc("build", "--model", m, "--output", tmp_path / "o7", "--quant", "int4_awq", "--low-rank", "16")
    assert_user_error(res, "--low-rank 16 is too large for the hidden size 64")
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
        assert_nothing_written(tmp_path, name)
