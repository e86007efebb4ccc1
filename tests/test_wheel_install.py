"""trtc as users install it: a built wheel (not the editable checkout) in a scratch virtual
environment, run from a directory outside the checkout. `trtc build --quant int8_wo` must calibrate
on the bundled calibration text and `trtc eval` must score the bundled eval text, both found
inside the installed package (trtc/bundled.py, importlib.resources).

Kept cheap: the wheel is built with --no-deps from a clean copy of the source files; the scratch
venv installs nothing but the wheel, and a .pth line appends the test venv's site-packages for
the dependencies (torch, TensorRT-RTX, ...). Python does not process .pth files in a directory
added that way, so the test venv's editable-install hook stays inactive in the scratch venv."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=timeout)
    assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _source_copy(dst: Path) -> Path:
    """The files git would commit (tracked + untracked, not ignored), so no stale build/ or
    egg-info of the checkout can leak into the wheel."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():                       # tracked but deleted in the working tree: skip
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _scratch_venv(root: Path, wheel: Path) -> tuple[Path, Path]:
    """venv without pip + the wheel (no deps) + a .pth line to this venv's site-packages.
    Returns (its python, its site-packages)."""
    _run([sys.executable, "-m", "venv", "--without-pip", root], root.parent)
    py = root / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_trtc_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", "--no-index", wheel],
         root)
    return py, site


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(scratch python, its site-packages, the wheel, a work dir outside the checkout, env)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    # Build isolation fetches setuptools (pyproject's build-system) from the package index.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp / "dist", src], tmp)
    wheel = next((tmp / "dist").glob("trtc-*.whl"))
    py, site = _scratch_venv(tmp / "venv", wheel)
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRTC_CACHE_DIR=str(tmp / "cache"))
    return py, site, wheel, work, env


def test_wheel_ships_the_bundled_data(installed):
    _, _, wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"trtc/data/calib.txt", "trtc/data/eval.txt"} <= names, sorted(names)
    assert {"trtc/compiler/pipeline.py", "trtc/runtime/api.py", "trtc/plugins/__init__.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_scratch_venv_imports_the_wheel_not_the_checkout(installed):
    py, site, _, work, env = installed
    out = _run([py, "-c", "import json, trtc, trtc.bundled as b; print(json.dumps("
                "[trtc.__file__, str(b.data_file(b.CALIB_TEXT)), str(b.data_file(b.EVAL_TEXT))]))"],
               work, env).stdout
    for path in map(Path, json.loads(out)):
        assert path.is_relative_to(site) and not path.is_relative_to(REPO), path


def test_build_and_eval_with_bundled_texts(installed, tiny_model):
    """From outside the checkout: build int8_wo (calibrated on the bundled calib.txt), then eval
    on the bundled eval.txt against the source model."""
    from transformers import AutoTokenizer

    py, _, wheel, work, env = installed
    trtc = py.parent / "trtc"                         # the wheel's console script
    model = tiny_model("llama")
    _run([trtc, "build", "--model", model, "--output", "eng", "--quant", "int8_wo", "--calib-samples", "8",
          "--target", "sm_89", "--keep-onnx", "--max-batch-size", "4", "--max-input-len", "64",
          "--max-seq-len", "64"], work, env)
    with zipfile.ZipFile(wheel) as z:
        calib_sha = hashlib.sha256(z.read("trtc/data/calib.txt")).hexdigest()
        eval_text = z.read("trtc/data/eval.txt").decode("utf-8")
    assert calib_sha in (work / "eng" / "config.json").read_text(), "the engine dir does not record calib.txt"

    row = json.loads(_run([trtc, "eval", "eng", "--backend", "onnxruntime", "--json"], work, env)
                     .stdout.strip().splitlines()[-1])
    # Windows of W tokens score W-1 positions each; a 1-token tail is dropped: so the counts add up
    # to the token count of eval.txt (or one less).
    n_ids = len(AutoTokenizer.from_pretrained(model)(eval_text)["input_ids"])
    assert row["tokens"] + row["windows"] in (n_ids, n_ids - 1), (row, n_ids)
    assert row["perplexity"] > 1 and row["reference_perplexity"] > 1
    assert row["top1_agreement"] >= 0.9, row         # int8_wo vs its float source: 0.956 measured
