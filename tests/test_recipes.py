"""Build recipes (trtc/recipes.py): every shipped recipe parses and expands; `trtc matrix` lists a
2 x 2 matrix; bad keys, bad values and impossible jobs are one-line errors before anything is
built; `trtc build --config --job` builds one job with the real TensorRT-RTX builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from factories import TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ
from trtc.cli import main
from trtc.errors import TrtcError
from trtc.recipes import expand, load_jobs, recipe_keys, run_options

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.toml"))
# Shipped examples that cannot validate in this version, with the reason the error must give.
EXPECTED_INVALID: dict[str, str] = {}

TINY_2X2 = """\
model = "@MODEL@"
flavour = "tensorrt_rtx"
dtype = "float16"
max_batch_size = %d
max_input_len = %d
max_seq_len = %d
calib_samples = 4

[matrix]
target = ["sm_86", "sm_89"]
quant = ["none", "int8_wo"]
""" % (TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ)


def tiny_recipe(d: Path, model: Path | str = "tiny-model", text: str = TINY_2X2, name: str = "tiny.toml") -> Path:
    p = d / name
    p.write_text(text.replace("@MODEL@", str(model)))
    return p


def trtc(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res


def assert_one_error(res, *needles) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    # one error line, last; anything before it is trtc's own progress (e.g. preparing the bundled
    # model on a fresh machine), never a traceback
    lines = res.stderr.splitlines()
    assert lines and lines[-1].startswith("trtc: error: "), res.stderr
    assert all(ln.startswith("[trtc] ") for ln in lines[:-1]), res.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def test_keys_are_the_build_options():
    keys = recipe_keys()
    assert {"model", "dtype", "quant", "target", "max_batch_size", "tp_size", "output", "keep_onnx"} <= set(keys)
    assert {"recipe", "job_name"}.isdisjoint(keys)                  # --config/--job select jobs
    assert "no_cache" in run_options()                              # applies to every job, not in recipes
    assert set(run_options()).isdisjoint(keys)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_parses_expands_and_validates(path):
    import tomllib

    names = [n for n, _, _ in expand(path, tomllib.loads(path.read_text()))[1]]
    assert names and len(set(names)) == len(names)
    if path.name in EXPECTED_INVALID:
        with pytest.raises(TrtcError, match=EXPECTED_INVALID[path.name]):
            load_jobs(path)
        return
    jobs = load_jobs(path)
    assert [j.name for j in jobs] == names
    assert all(j.targets for j in jobs)


def test_shipped_recipes_cover_the_issue():
    names = {p.name for p in SHIPPED}
    assert {"smollm2.toml", "tiny-ci.toml", "llama-3.1-8b-fp8-tp2.toml"} <= names
    smollm2 = load_jobs(ROOT / "configs" / "smollm2.toml")
    assert [j.params["quant"] for j in smollm2] == ["none", "int8_wo", "int4_awq"]
    assert {j.params["dtype"] for j in smollm2} == {"float16"} and {j.flavour for j in smollm2} == {"tensorrt_rtx"}


def test_matrix_2x2_lists_four_jobs(tmp_path):
    recipe = tiny_recipe(tmp_path)
    res = trtc("matrix", recipe, "--json")
    assert res.exit_code == 0, res.stderr
    jobs = json.loads(res.stdout)
    names = ["tiny-sm_86-none", "tiny-sm_86-int8_wo", "tiny-sm_89-none", "tiny-sm_89-int8_wo"]
    assert [j["name"] for j in jobs] == names
    assert [j["output"] for j in jobs] == [f"engines/{n}" for n in names]
    assert [j["targets"] for j in jobs] == [["sm_86"], ["sm_86"], ["sm_89"], ["sm_89"]]
    assert jobs[1]["options"] == {"model": "tiny-model", "flavour": "tensorrt_rtx", "dtype": "float16",
                                  "max_batch_size": TINY_MAX_BATCH, "max_input_len": TINY_MAX_INPUT,
                                  "max_seq_len": TINY_MAX_SEQ, "calib_samples": 4, "target": "sm_86",
                                  "quant": "int8_wo"}
    table = trtc("matrix", recipe).stdout.splitlines()
    assert table[0].startswith(f"{recipe}: 4 jobs") and len(table) == 6
    assert table[4].split() == ["tiny-sm_89-none", "engines/tiny-sm_89-none", "sm_89", "sm_89", "none"]


def test_name_and_output_templates(tmp_path):
    text = TINY_2X2.replace('flavour =', 'name = "t-{quant}-{target}"\noutput = "out/{name}"\nflavour =')
    jobs = load_jobs(tiny_recipe(tmp_path, text=text))
    assert [(j.name, str(j.output)) for j in jobs][1] == ("t-int8_wo-sm_86", "out/t-int8_wo-sm_86")
    # a comma-separated target becomes part of a name CI artifact stores accept
    text = TINY_2X2.replace('["sm_86", "sm_89"]', '["sm_86,sm_89", "sm_120"]')
    assert load_jobs(tiny_recipe(tmp_path, text=text))[0].name == "tiny-sm_86+sm_89-none"


@pytest.mark.parametrize("change, needles", [
    (("max_batch_size =", "max_batch ="), ["unknown key 'max_batch'", "did you mean 'max_batch_size'"]),
    (("quant = [", "quantization = ["), ["unknown key 'matrix.quantization'", "did you mean 'quant'"]),
    (("calib_samples = 4", "no_cache = true"), ["no_cache says how to build", "--no-cache"]),
    ((f"max_batch_size = {TINY_MAX_BATCH}", 'max_batch_size = "four"'),
     ["job tiny-sm_86-none", "max_batch_size = 'four'", "not a valid integer"]),
    (('dtype = "float16"', 'dtype = "fp16"'), ["dtype = 'fp16'", "'float16'"]),
    (('dtype = "float16"', 'keep_onnx = "yes"'), ["--keep-onnx is a flag"]),
    (('dtype = "float16"', 'dump_after = "cleanup"'), []),     # a single value for a repeatable option: fine
    (('dtype = "float16"', 'model = "again"'), ["not valid TOML"]),   # a key twice: TOML's own error
    (('dtype = "float16"', 'tp_size = 2\nattention = "plugin"'), ["job tiny-sm_86-none", "--attention plugin with --tp-size 2"]),
    (('"none", "int8_wo"', '"none", "fp8"'), ["job tiny-sm_86-fp8", "--quant fp8", "sm_86"]),
    (('"sm_86", "sm_89"', '"sm_86", "sm_90"'), ["job tiny-sm_90-none", "sm_90 is not supported by tensorrt_rtx"]),
    (('["sm_86", "sm_89"]', '"sm_89"'), ["matrix.target", "non-empty list"]),
    (('flavour =', 'name = "same"\nflavour ='), ["two jobs have the job name same"]),
    (('flavour =', 'name = "{quant}-{group_size}"\nflavour ='), ["{group_size}"]),
])
def test_bad_recipe_is_one_line_and_nothing_built(tmp_path, monkeypatch, change, needles):
    """`trtc matrix` and `trtc build --config` both refuse the recipe before any work."""
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, model=tmp_path / "no-model-needed", text=TINY_2X2.replace(*change))
    if not needles:
        assert trtc("matrix", recipe).exit_code == 0
        return
    line = assert_one_error(trtc("matrix", recipe, "--json"), *needles)
    assert assert_one_error(trtc("build", "--config", recipe)) == line
    assert not (tmp_path / "engines").exists()


def test_build_config_refuses_other_options(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert_one_error(trtc("build", "--config", recipe, "--quant", "fp8", "--dtype", "auto"),
                     "--dtype, --quant were given too", "set them in the recipe")
    assert_one_error(trtc("build", "--job", "tiny-sm_86-none"), "--job tiny-sm_86-none needs --config")
    assert_one_error(trtc("build", "--config", recipe, "--job", "tiny-sm_86-int8"),
                     "has no such job", "did you mean tiny-sm_86-int8_wo?")
    assert_one_error(trtc("build", "--config", tmp_path / "missing.toml"), "missing.toml: no such file")
    assert_one_error(trtc("build", "--tp-size", "2"), "--tp-size 2", "valid tp sizes for this model: 1, 3")


@pytest.mark.slow
def test_build_one_job_of_a_recipe(tmp_path, monkeypatch, tiny_model):
    """One job of the 2 x 2 matrix, through the same build_job as `trtc build`, with the real
    TensorRT-RTX builder; --no-cache (an option of the run) is allowed next to --config."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRTC_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tiny_recipe(tmp_path, model=tiny_model("llama"))
    res = trtc("build", "--config", recipe, "--job", "tiny-sm_89-int8_wo", "--no-cache")
    assert res.exit_code == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[-1] == "engines/tiny-sm_89-int8_wo"
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["tiny-sm_89-int8_wo"]
    out = tmp_path / "engines" / "tiny-sm_89-int8_wo"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tensorrt"]["targets"] == ["sm_89"]
    assert cfg["quantization"]["quant_algo"] == "int8_wo"
    assert cfg["export_config"]["dtype"] == "float16"
    assert cfg["build_config"]["max_batch_size"] == TINY_MAX_BATCH
    assert cfg["build_config"]["max_seq_len"] == TINY_MAX_SEQ
    job = json.loads((out / "provenance.intoto.json").read_text())["predicate"]["buildDefinition"][
        "externalParameters"]["job"]
    assert job["name"] == "tiny-sm_89-int8_wo" and job["options"]["quant"] == "int8_wo"
    assert job["recipe_sha256"] == load_jobs(recipe)[0].recipe_sha256
