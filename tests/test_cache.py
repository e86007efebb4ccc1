"""Engine artifacts for CI (issue 12, the build side): the content-addressed engine cache, byte-
reproducible builds, per-target engines and the provenance statement, with the real TensorRT-RTX
builder on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from factories import TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ
from trtc import artifact as art
from trtc.cli import main

LIMITS = ["--max-batch-size", str(TINY_MAX_BATCH), "--max-input-len", str(TINY_MAX_INPUT),
          "--max-seq-len", str(TINY_MAX_SEQ), "--target", "sm_89"]


def digests(d):
    return {p.name: art.sha256_file(p) for p in sorted(d.iterdir()) if p.is_file()}


def cli(*args, env=None):
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRTC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


@pytest.mark.slow
def test_rebuild_is_a_cache_hit_with_identical_files(tiny_model, tmp_path, cache_env):
    model = tiny_model("llama")
    cli("build", "--model", model, *LIMITS, "-o", tmp_path / "a")
    fp = art.read_engine_config(tmp_path / "a").fingerprint
    assert (cache_env / "entries" / fp / "rank0.engine").is_file()
    t0 = time.perf_counter()
    res = cli("build", "--model", model, *LIMITS, "-o", tmp_path / "b")
    assert time.perf_counter() - t0 < 2.0 and "cache hit" in res.output
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    # --no-cache builds again: same bytes (TensorRT-RTX builds are reproducible)
    res = cli("build", "--model", model, *LIMITS, "-o", tmp_path / "c", "--no-cache")
    assert "cache hit" not in res.output and digests(tmp_path / "c") == digests(tmp_path / "a")
    assert art.read_engine_config(tmp_path / "c").tensorrt.reproducible is True
    # a damaged entry is detected by its checksums, removed and rebuilt, never handed out
    engine = cache_env / "entries" / fp / "rank0.engine"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    res = cli("build", "--model", model, *LIMITS, "-o", tmp_path / "d")
    assert "damaged" in res.output and "cache hit" not in res.output
    assert digests(tmp_path / "d") == digests(tmp_path / "a")
    assert art.sha256_file(engine) == digests(tmp_path / "a")["rank0.engine"]     # stored again, intact
    # another mode of the same model reuses the cached float export: no export stage
    res = cli("build", "--model", model, *LIMITS, "-o", tmp_path / "q", "--quant", "int8_wo", "--calib-samples", "2")
    assert "reusing the cached export" in res.output and "[trtc] export:" not in res.output
    assert art.read_engine_config(tmp_path / "q").quantization["quant_algo"] is not None


@pytest.mark.slow
def test_two_concurrent_builds_of_one_key_build_once(tiny_model, tmp_path, cache_env):
    env = dict(os.environ, TRTC_CACHE_DIR=str(cache_env.parent))
    cmd = [sys.executable, "-m", "trtc.cli", "build", "--model", str(tiny_model("qwen2")), *LIMITS]
    procs = [subprocess.Popen([*cmd, "-o", str(tmp_path / f"out{i}")], env=env, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("cache hit" in log for log in logs) == 1, logs        # one built, the other waited and hit
    assert sum("[trtc] export" in log for log in logs) == 1
    assert digests(tmp_path / "out0") == digests(tmp_path / "out1")
    assert len(list((cache_env / "entries").iterdir())) == 1


def test_eviction_keeps_the_cache_under_its_limit(tmp_path):
    from trtc.compiler.cache import EngineCache, parse_size

    assert parse_size("20G") == 20 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("1000") == 1000
    cache = EngineCache(tmp_path, max_bytes=10**9)
    for i, key in enumerate(["old", "mid", "new"]):
        src = tmp_path / f"src-{key}"
        src.mkdir()
        (src / "rank0.engine").write_bytes(b"x" * 1000)
        cache.store(key, src)
        os.utime(cache.entries / key / ".used", (1000 + i, 1000 + i))   # distinct last-use times
    os.utime(cache.entries / "old" / ".used", (2000, 2000))             # "old" was used most recently
    cache.max_bytes = 2500
    assert cache.evict() == ["mid"]
    assert sorted(p.name for p in cache.entries.iterdir()) == ["new", "old"]


@pytest.mark.slow
def test_check_reproducible_and_per_target_engines(tiny_model, tmp_path, cache_env):
    out = tmp_path / "e"
    res = cli("build", "--model", tiny_model("llama"), *LIMITS[:-1], "sm_89,sm_120", "--engine-per-target",
              "--check-reproducible", "-o", out)
    assert "reproducible: two builds gave identical bytes" in res.output
    cfg = art.read_engine_config(out)
    assert [(e.file, e.targets) for e in cfg.engines] == [("rank0.sm_89.engine", ["sm_89"]),
                                                          ("rank0.sm_120.engine", ["sm_120"])]
    assert cfg.engine_for(0, 120).file == "rank0.sm_120.engine" and cfg.engine_for(0, 86) is None
    text = cli("inspect", out).output
    assert "rank0.sm_89.engine" in text and "rank0.sm_120.engine" in text


def test_provenance_statement_and_inspect_verify(tiny_engine, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(tiny_engine("llama"), d)
    st = json.loads((d / art.PROVENANCE).read_text())
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
    assert subjects == {n: h for n, h in digests(d).items() if n != art.PROVENANCE}
    assert "config.json" in subjects
    cfg = art.read_engine_config(d)
    pred = st["predicate"]
    assert pred["buildDefinition"]["internalParameters"]["fingerprint"] == cfg.fingerprint
    assert pred["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"] == cfg.source.weights_sha256
    assert "trtc" in pred["runDetails"]["builder"]["version"]
    assert CliRunner().invoke(main, ["inspect", str(d), "--verify"]).exit_code == 0
    # config.json edited (its own digest is only in the statement), a stray file, a flipped byte
    cases = []
    c = json.loads((d / "config.json").read_text())
    c["build_config"]["max_batch_size"] = 64
    cases.append(("config.json", lambda e: (e / "config.json").write_text(json.dumps(c, indent=2))))
    cases.append(("extra.bin", lambda e: (e / "extra.bin").write_bytes(b"?")))
    cases.append(("rank0.onnx.data", lambda e: (e / "rank0.onnx.data").write_bytes(
        bytes(b ^ (i == 100) for i, b in enumerate((e / "rank0.onnx.data").read_bytes())))))
    for needle, damage in cases:
        e = tmp_path / f"damaged-{needle}"
        shutil.copytree(d, e)
        damage(e)
        res = CliRunner().invoke(main, ["inspect", str(e), "--verify"])
        assert res.exit_code == 2 and needle in res.output, (needle, res.output)
