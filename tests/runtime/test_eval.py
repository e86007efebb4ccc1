"""trtc eval: perplexity through the session, top-1 agreement with transformers on the same windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from trtc.cli import main
from trtc.errors import TrtcError
from trtc.eval import evaluate, windows_of


def test_windows_cover_the_text():
    ids = list(range(10))
    assert windows_of(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows_of(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]   # a 1-token tail scores nothing


def test_unquantized_engine_matches_its_reference(tiny_engine, tmp_path):
    """The float32 graph on ORT and transformers fp32 agree: same perplexity, same argmax (up to
    a rare near-tie flipped by float32 rounding)."""
    from factories import TEXT

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    r = evaluate(tiny_engine("llama"), text, backend="onnxruntime", window=40)
    assert r.windows > 2 and r.tokens > 100
    assert r.reference_perplexity is not None
    assert abs(r.perplexity / r.reference_perplexity - 1) < 1e-4
    assert r.top1_agreement >= 0.99


def test_cli_json(tiny_engine, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 4)
    res = CliRunner().invoke(main, ["eval", str(tiny_engine("llama")), "--text", str(text), "--json",
                                    "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"perplexity", "reference_perplexity", "top1_agreement"} <= set(row)
    assert np.isfinite(row["perplexity"]) and row["top1_agreement"] >= 0.99


def test_missing_and_empty_text(tiny_engine, tmp_path):
    with pytest.raises(TrtcError, match="no such file"):
        evaluate(tiny_engine("llama"), tmp_path / "nope.txt", backend="onnxruntime")
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(TrtcError, match="is empty"):
        evaluate(tiny_engine("llama"), tmp_path / "e.txt", backend="onnxruntime")
