"""The whole path per family: HF dir -> trtc build (real TensorRT-RTX) -> trtc run on the
reference backend (ONNX Runtime on the kept rank graph) == transformers greedy generate."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from factories import FAMILIES, PROMPTS, hf_greedy, run_json
from trtc.cli import main

NEW_TOKENS = 32


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers(family, tiny_model, tiny_engine):
    ours = run_json(tiny_engine(family), PROMPTS, NEW_TOKENS)
    ref = hf_greedy(tiny_model(family), PROMPTS, NEW_TOKENS)
    assert all(len(r) == NEW_TOKENS for r in ref), "reference stopped early: pick decisive weights"
    assert ours == ref


def test_engine_dir_says_what_it_is(tiny_engine):
    from trtc.artifact import read_engine_config, sha256_file

    d = tiny_engine("llama")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["pretrained_config"]["family"] == "llama"
    assert cfg["pretrained_config"]["tie_word_embeddings"] is True
    assert cfg["pretrained_config"]["rope_type"] == "llama3"
    assert cfg["format_version"] == 2
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert cfg["tensorrt"]["flavour"] == "tensorrt_rtx" and cfg["tensorrt"]["targets"] == ["sm_89"]
    assert cfg["engines"] == [{"rank": 0, "targets": ["sm_89"], "file": "rank0.engine"}]
    assert cfg["onnx"] == [{"rank": 0, "file": "rank0.onnx", "data": "rank0.onnx.data"}]
    assert [p["name"] for p in cfg["profiles"]] == ["prefill", "decode"]
    assert cfg["profiles"][1]["shapes"]["input_ids"][2] == [4, 1]
    assert len(cfg["fingerprint"]) == 16
    names = {i["name"] for i in cfg["io"]["inputs"]}
    assert names == {"input_ids", "position_ids"} | {f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    for name, entry in cfg["files"].items():
        assert sha256_file(d / name) == entry["sha256"], name
    assert {"rank0.engine", "rank0.onnx", "rank0.onnx.data", "tokenizer.json"} <= set(cfg["files"])
    assert set(cfg["tokenizer_files"]) == {n for n in cfg["files"] if not n.startswith("rank")}
    assert read_engine_config(d).pretrained_config.family == "llama"     # the typed reader accepts it


def test_streaming_single_prompt(tiny_engine):
    engine = tiny_engine("llama")
    res = CliRunner().invoke(main, ["run", str(engine), "--backend", "onnxruntime", "--prompt", PROMPTS[0],
                                    "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert res.stdout.endswith("\n") and len(res.stdout.strip()) > 0


def test_python_api_sampling_is_seeded(tiny_engine, tiny_model):
    """The same seed repeats its tokens, another seed draws others (sampling is not silently
    greedy), and temperature 0 is transformers' greedy decoding whatever the seed."""
    from trtc.runtime import LLM

    llm = LLM(tiny_engine("qwen3"), backend="onnxruntime")

    def tokens(seed: int, temperature: float) -> list[list[int]]:
        return [c.token_ids for c in llm.generate(PROMPTS[:2], max_new_tokens=8, temperature=temperature,
                                                   top_k=20, top_p=0.95, seed=seed)]

    a = tokens(7, 2.0)
    assert tokens(7, 2.0) == a
    assert tokens(8, 2.0) != a
    assert tokens(7, 0.0) == tokens(8, 0.0) == hf_greedy(tiny_model("qwen3"), PROMPTS[:2], 8)


def test_more_prompts_than_max_batch(tiny_engine, tiny_model):
    from trtc.runtime import LLM

    prompts = PROMPTS + PROMPTS[:2]          # 6 prompts, engine max batch 4: two batches
    llm = LLM(tiny_engine("llama"), backend="onnxruntime")
    ours = [c.token_ids for c in llm.generate(prompts, max_new_tokens=6)]
    assert ours == hf_greedy(tiny_model("llama"), prompts, 6)
