"""Bad input to `trtc`: one line `trtc: error: ...` naming the problem and the fix, exit code 2,
and nothing half-written. Most cases run the command in-process (click's test runner, which lets
any other exception escape and fail the test); the `*_process` ones run the real `trtc` process
and also check that stderr carries no traceback and no second error line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from factories import PROMPTS
from trtc.cli import main


@dataclass(frozen=True)
class Outcome:
    code: int
    stderr: str


def trtc(*args) -> Outcome:
    """In-process: an exception other than the CLI's own exit propagates into the test."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Outcome(res.exit_code, res.stderr)


def trtc_process(*args) -> Outcome:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "trtc.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, stdin=subprocess.DEVNULL, timeout=600)
    return Outcome(res.returncode, res.stderr)


def assert_user_error(res: Outcome, *needles):
    assert res.code == 2, (res.code, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("trtc: error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def assert_nothing_written(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def test_process_missing_model_dir(tmp_path):
    res = trtc_process("build", "--model", tmp_path / "nope", "--output", tmp_path / "out")
    assert_user_error(res, "no such file or directory")
    assert_nothing_written(tmp_path, "out")


def test_incomplete_model_dir(tmp_path, tiny_model):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    res = trtc("build", "--model", d, "--output", tmp_path / "out")
    assert_user_error(res, "no weights")
    assert_nothing_written(tmp_path, "out")


def test_process_truncated_weights(tmp_path, tiny_model):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    w = next(d.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    res = trtc_process("build", "--model", d, "--output", tmp_path / "out")
    assert_user_error(res, "cannot load the weights")
    assert_nothing_written(tmp_path, "out")


def test_unsupported_architecture(tmp_path, tiny_model):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    res = trtc("build", "--model", d, "--output", tmp_path / "out")
    assert_user_error(res, "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM",
                      "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    assert_nothing_written(tmp_path, "out")


def test_output_dir_not_ours_is_left_alone(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = trtc("build", "--model", tiny_model("llama"), "--output", out, "--max-seq-len", "64")
    assert_user_error(res, "not written by trtc")
    assert (out / "precious.txt").read_text() == "keep me"


def test_process_unknown_target_for_rtx(tmp_path, tiny_model):
    res = trtc_process("build", "--model", tiny_model("llama"), "--target", "sm_90", "--flavour", "tensorrt_rtx",
               "--output", tmp_path / "out")
    assert_user_error(res, "sm_90", "sm_89")


def test_engine_dir_without_config(tmp_path):
    (tmp_path / "e").mkdir()
    assert_user_error(trtc("run", tmp_path / "e", "--prompt", "hi"), "no config.json", "trtc build")


@pytest.fixture()
def engine_copy(tmp_path, tiny_engine):
    d = tmp_path / "engine"
    shutil.copytree(tiny_engine("llama"), d)
    return d


def test_process_corrupted_engine(engine_copy):
    e = engine_copy / "rank0.engine"
    data = bytearray(e.read_bytes())
    data[len(data) // 2] ^= 0xFF
    e.write_bytes(bytes(data))
    # `run --backend tensorrt` verifies the engine only once a GPU has picked it; `inspect --verify` on CPU.
    assert_user_error(trtc_process("inspect", engine_copy, "--verify"), "rank0.engine", "corrupted")


def test_truncated_onnx_data(engine_copy):
    f = engine_copy / "rank0.onnx.data"
    f.write_bytes(f.read_bytes()[:1000])
    assert_user_error(trtc("run", engine_copy, "--backend", "onnxruntime", "--prompt", "hi"), "rank0.onnx.data", "truncated")


@pytest.mark.parametrize("field,value,needle", [
    ("flavour", "tensorrt", "built with tensorrt "),
    ("version", "1.0.0.1", "built with tensorrt_rtx 1.0.0.1"),
])
def test_engine_for_other_tensorrt(engine_copy, field, value, needle):
    cfg = json.loads((engine_copy / "config.json").read_text())
    cfg["tensorrt"][field] = value
    (engine_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(trtc("run", engine_copy, "--backend", "tensorrt", "--prompt", "hi"), needle)


def test_engine_for_other_gpu_target(tiny_engine):
    import tensorrt_rtx

    from trtc.errors import TrtcError
    from trtc.runtime.engine_dir import check_tensorrt_compat, load_engine_dir

    ed = load_engine_dir(tiny_engine("llama"))           # built for sm_89
    check_tensorrt_compat(ed, tensorrt_rtx, "tensorrt_rtx", 89)
    with pytest.raises(TrtcError, match="built for sm_89 but this GPU is sm_120; rebuild with --target sm_120"):
        check_tensorrt_compat(ed, tensorrt_rtx, "tensorrt_rtx", 120)
    with pytest.raises(TrtcError, match="no CUDA GPU"):
        check_tensorrt_compat(ed, tensorrt_rtx, "tensorrt_rtx", None)


def test_prompt_longer_than_max_input_len(tiny_engine):
    long_prompt = " ".join([PROMPTS[3]] * 4)
    assert_user_error(trtc("run", tiny_engine("llama"), "--backend", "onnxruntime", "--prompt", long_prompt),
                      "max-input-len 48", "--max-input-len")


def test_no_engine_backend_available(engine_copy):
    cfg = json.loads((engine_copy / "config.json").read_text())
    cfg["onnx"] = []
    (engine_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(trtc("run", engine_copy, "--prompt", "hi"), "TensorRT is not usable here", "--keep-onnx")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"not a gguf file at all")
    assert_user_error(trtc("build", "--model", f, "--output", tmp_path / "out"), "not a readable GGUF")


def test_chat_without_template(tiny_engine):
    assert_user_error(trtc("run", tiny_engine("llama"), "--backend", "onnxruntime", "--chat", "--prompt", "hi"),
                      "no chat template", "--chat")


@pytest.mark.slow
def test_process_sigterm_during_export_leaves_nothing(tmp_path, tiny_model):
    """A CI runner cancelling the job sends SIGTERM: the build stops with one line, exit 2, and
    neither the output's temp dir nor the scratch work dir (TRTC_WORK_DIR) is left behind."""
    import signal
    import time

    scratch = tmp_path / "scratch"
    env = dict(os.environ, TRTC_WORK_DIR=str(scratch))
    proc = subprocess.Popen([sys.executable, "-m", "trtc.cli", "build", "--model", str(tiny_model("llama")),
                             "--target", "sm_89", "--no-cache", "--output", str(tmp_path / "out")],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:               # wait until the export stage runs
        lines.append(line)
        if line.startswith("[trtc] export"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 2, "".join(lines) + rest
    assert "trtc: error: interrupted" in rest and "Traceback" not in rest
    assert list(scratch.iterdir()) == []
    assert_nothing_written(tmp_path, "out")


@pytest.mark.slow
def test_build_terminal_holds_only_trtc_lines(tmp_path, tiny_model):
    """A user's `trtc build` (a real process, stderr a pipe as in CI logs): every line on stderr is
    trtc's own ([trtc] stage and progress lines), none from torch, the exporter, transformers or
    TensorRT; stdout holds only the output dir. The CLI no longer imports transformers to silence
    it (environment variables do, before its first import): this checks they still do."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "trtc.cli", "build", "--model", str(tiny_model("llama")),
                          "--target", "sm_89", "--no-cache", "--output", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    foreign = [ln for ln in res.stderr.splitlines() if not ln.startswith("[trtc]")]
    assert not foreign, res.stderr
    assert res.stdout.strip() == str(out), res.stdout
