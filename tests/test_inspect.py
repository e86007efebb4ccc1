from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from trtc.cli import main


def test_inspect_engine_dir(tiny_engine):
    res = CliRunner().invoke(main, ["inspect", str(tiny_engine("mistral")), "--verify", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["kind"] == "engine dir" and d["verified"] is True
    assert d["model"]["family"] == "mistral" and d["model"]["sliding_window"] == 12
    assert d["tensorrt"]["flavour"] == "tensorrt_rtx" and d["limits"]["max_seq_len"] == 96
    text = CliRunner().invoke(main, ["inspect", str(tiny_engine("mistral"))]).stdout
    assert "MistralForCausalLM" in text and "not checked" in text


def test_inspect_verify_catches_corruption(tiny_engine, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(tiny_engine("mistral"), d)
    (d / "tokenizer.json").write_text("{}")
    res = CliRunner().invoke(main, ["inspect", str(d), "--verify"])
    assert res.exit_code == 2 and "tokenizer.json" in res.output


def test_inspect_not_a_trtc_dir(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and "neither" in res.output
