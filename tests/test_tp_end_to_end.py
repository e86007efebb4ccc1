"""Tensor parallelism end to end: `trtc build --tp-size N` with the real TensorRT-RTX builder (rank
engines with the all-reduces inside), then `trtc run --backend onnxruntime` (every rank on CPU,
collectives executed between them) == transformers greedy generate; quantized rank graphs compute
the one-rank quantized graph; the one-line errors of build, inspect and run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from factories import FAMILIES, PROMPTS, TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ, family_config, hf_greedy, run_json, \
    make_tokenizer
from test_errors import assert_nothing_written, assert_user_error, trtc
from trtc.cli import main

NEW_TOKENS = 32
# query heads 8; KV heads per family: split at tp 2 and 4 (llama 4), one KV head replicated on every
# rank (mistral), split at 2 and replicated at 4 (qwen2); qwen3 (head_dim 32 != hidden / heads) as llama
KV_HEADS = {"llama": 4, "mistral": 1, "qwen2": 2, "qwen3": 4}


def make_tp_model(out: Path, family: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(out)
    base = family_config(family, vocab_size=len(tok))
    d = base.to_dict()
    d.update(num_attention_heads=8, num_key_value_heads=KV_HEADS[family],
             head_dim=32 if family == "qwen3" else base.hidden_size // 8)
    cfg = type(base).from_dict(d)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tp_model(tmp_path_factory.mktemp(f"tp-{family}"), family)
        return made[family]

    return get


def build_args(model, out, *extra) -> list[str]:
    return ["build", "--model", str(model), "--output", str(out), "--keep-onnx", "--target", "sm_89",
            "--max-batch-size", str(TINY_MAX_BATCH), "--max-input-len", str(TINY_MAX_INPUT),
            "--max-seq-len", str(TINY_MAX_SEQ), *map(str, extra)]


@pytest.fixture(scope="module")
def tp_engine(tp_model, tmp_path_factory):
    built: dict[tuple[str, int], Path] = {}

    def get(family: str, tp: int) -> Path:
        if (family, tp) not in built:
            out = tmp_path_factory.mktemp(f"tp{tp}-{family}") / "engine"
            res = CliRunner().invoke(main, build_args(tp_model(family), out, "--tp-size", tp))
            assert res.exit_code == 0, res.output
            built[family, tp] = out
        return built[family, tp]

    return get


def dist_collective_layers(onnx_path: Path) -> list[int]:
    """num_ranks of every DIST_COLLECTIVE layer TensorRT-RTX's parser makes of a rank graph."""
    import tensorrt_rtx as trt

    from trtc.flavour import make_logger

    logger = make_logger(trt)
    net = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(net, logger).parse_from_file(str(onnx_path))
    out = []
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        if layer.type == trt.LayerType.DIST_COLLECTIVE:
            layer.__class__ = trt.IDistCollectiveLayer
            out.append(layer.num_ranks)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_tp_greedy_tokens_match_transformers(family, tp, tp_model, tp_engine):
    engine = tp_engine(family, tp)
    cfg = json.loads((engine / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert [e["file"] for e in cfg["engines"]] == [f"rank{r}.engine" for r in range(tp)]
    assert [g["file"] for g in cfg["onnx"]] == [f"rank{r}.onnx" for r in range(tp)]
    assert cfg["pretrained_config"]["num_kv_heads"] == KV_HEADS[family]
    past = next(i for i in cfg["io"]["inputs"] if i["name"] == "past_key_values.0.key")
    assert past["shape"][1] == max(1, KV_HEADS[family] // tp)            # the rank's KV heads
    assert dist_collective_layers(engine / "rank1.onnx") == [tp] * (2 * cfg["pretrained_config"]["num_layers"])
    ours = run_json(engine, PROMPTS, NEW_TOKENS)
    ref = hf_greedy(tp_model(family), PROMPTS, NEW_TOKENS)
    assert all(len(r) == NEW_TOKENS for r in ref), "reference stopped early: pick decisive weights"
    assert ours == ref


def session_logits(d: Path) -> np.ndarray:
    """Prefill of two rows, then one decode step, through open_session's onnxruntime backend."""
    from trtc.runtime.api import open_session
    from trtc.runtime.engine_dir import load_engine_dir

    s = open_session(load_engine_dir(d), "onnxruntime")
    s.allocate(2)
    ids = np.array([[5, 17, 33, 9, 60, 2], [7, 8, 100, 3, 1, 1]])
    first = s.step(ids, np.broadcast_to(np.arange(6), ids.shape))
    return np.concatenate([first, s.step(np.array([[11], [12]]), np.array([[6], [6]]))], axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("quant, tp", [
    (["--quant", "int8_wo", "--outlier-channels", "1"], 4),   # 3 of 4 ranks hold no outlier channel of a row split
    (["--quant", "int4_awq", "--group-size", "16"], 2),        # AWQ, int4 groups, offsets, low-rank factors
    (["--quant", "fp8", "--kv-cache-dtype", "fp8"], 2),
])
def test_quantized_rank_graphs_compute_the_one_rank_graph(quant, tp, tp_model, tmp_path):
    """Calibrated once (one export), sharded at build: the tp ranks' logits equal the one-rank
    quantized graph's up to float summation order; TensorRT-RTX builds every quantized rank engine."""
    exported = tmp_path / "export"
    res = CliRunner().invoke(main, ["export", "--model", str(tp_model("llama")), "--output", str(exported),
                                    "--max-seq-len", str(TINY_MAX_SEQ), "--calib-samples", "8", *quant])
    assert res.exit_code == 0, res.output
    engine = tmp_path / "engine"
    res = CliRunner().invoke(main, build_args(exported, engine, "--tp-size", tp))
    assert res.exit_code == 0, res.output
    one, many = session_logits(exported), session_logits(engine)
    assert np.abs(many - one).max() <= 1e-5 * np.abs(one).max() * 10, np.abs(many - one).max()
    assert json.loads((engine / "config.json").read_text())["quantization"]["quant_algo"] is not None


@pytest.mark.slow
def test_smollm2_tp3_matches_transformers(tmp_path):
    """The bundled SmolLM2-135M: 9 query / 3 KV heads, one KV head per rank at tp 3."""
    from test_smollm2 import NEW_TOKENS as N
    from test_smollm2 import PROMPTS as SMOL_PROMPTS

    from trtc.compiler.load import DEFAULT_MODEL, resolve_source

    out = tmp_path / "smollm2-tp3"
    res = CliRunner().invoke(main, ["build", "--dtype", "float32", "--output", str(out), "--keep-onnx", "--tp-size", "3",
                                    "--max-batch-size", "4", "--max-input-len", "32", "--max-seq-len", "96",
                                    "--target", "sm_89"])
    assert res.exit_code == 0, res.output
    ours = run_json(out, SMOL_PROMPTS, N)
    assert ours == hf_greedy(resolve_source(DEFAULT_MODEL), SMOL_PROMPTS, N, dtype="float32")


def test_smollm2_tp2_is_one_line_naming_the_valid_sizes(tmp_path):
    res = trtc("build", "--tp-size", "2", "--output", tmp_path / "out")
    assert_user_error(res, "--tp-size 2 cannot split LlamaForCausalLM", "9 query heads",
                      "valid tp sizes for this model: 1, 3")
    assert_nothing_written(tmp_path, "out")
    res = trtc("export", "--tp-size", "2", "--output", tmp_path / "exp")
    assert_user_error(res, "valid tp sizes for this model: 1, 3")
    assert_nothing_written(tmp_path, "exp")


@pytest.mark.slow
def test_build_inspect_and_run_errors(tp_model, tp_engine, tmp_path):
    """tp not dividing, a missing rank file, a rank file of another build, more ranks than GPUs: one
    line each, exit 2, nothing written."""
    res = trtc(*build_args(tp_model("llama"), tmp_path / "tp3", "--tp-size", "3"))
    assert_user_error(res, "--tp-size 3", "8 query heads are not divisible by 3", "valid tp sizes for this model: 1, 2, 4, 8")
    assert_nothing_written(tmp_path, "tp3")

    engine = tp_engine("llama", 2)
    res = trtc("run", engine, "--backend", "tensorrt", "--prompt", "One")
    assert_user_error(res, "has 2 ranks (tp 2), each needing its own GPU, but 0 GPUs are visible")

    missing = tmp_path / "missing"
    shutil.copytree(engine, missing)
    (missing / "rank1.onnx").unlink()
    assert_user_error(trtc("run", missing, "--backend", "onnxruntime", "--prompt", "One"),
                      "rank1.onnx (rank 1 of 2) is missing")
    assert_user_error(trtc("inspect", missing), "rank1.onnx (rank 1 of 2) is missing")

    mixed = tmp_path / "mixed"
    shutil.copytree(engine, mixed)
    other = tp_engine("qwen2", 2)
    for n in ("rank1.onnx", "rank1.onnx.data"):
        shutil.copy2(other / n, mixed / n)
    other_fp = json.loads((other / "config.json").read_text())["fingerprint"]
    for cmd in (("run", mixed, "--backend", "onnxruntime", "--prompt", "One"), ("inspect", mixed)):
        assert_user_error(trtc(*cmd), f"carries the stamp of build {other_fp}, rank 1 of 2",
                          "rank files of different builds cannot be mixed")
    shutil.copy2(other / "rank1.engine", mixed / "rank1.engine")
    assert_user_error(trtc("inspect", mixed, "--verify"), "rank1")

    res = trtc("inspect", engine, "--json")
    assert res.code == 0

    exported = tmp_path / "export-tp2"             # an export dir's rank graph swapped for another build's
    assert trtc("export", "--model", tp_model("llama"), "--output", exported, "--tp-size", 2,
                "--max-seq-len", TINY_MAX_SEQ).code == 0
    for n in ("rank1.onnx", "rank1.onnx.data"):
        shutil.copy2(other / n, exported / n)
    assert_user_error(trtc(*build_args(exported, tmp_path / "from-mixed")),
                      f"carries the stamp of build {other_fp}, rank 1 of 2", "re-run trtc export")
    assert_nothing_written(tmp_path, "from-mixed")
