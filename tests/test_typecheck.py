"""Static type check of the code that only runs with TensorRT on a GPU (mypy against `tensorrt-stubs`).

That code cannot execute on trtc's machines (no GPU; full TensorRT is not installable), so mypy is
what checks its TensorRT calls: method names, argument counts and types, against the stubs of
TensorRT 10.13's Python API (TensorRT-RTX has the same API; newer calls carry precise ignores).

Two things stand between mypy and this code, and `layout()` bridges both in .cache/mypy/layout:
- pyproject maps compiler/, runtime/, plugins/ to trtc.compiler, trtc.runtime, trtc.plugins; the
  editable install does it with an import hook, which mypy does not run. The layout holds a
  `trtc` package of symlinks arranged as installed.
- tensorrt-stubs 10.13.0.35.1 installs `tensorrt/__init__.pyi` without a py.typed marker (mypy
  refuses it from site-packages), and its generated tensorrt.pyi does not parse (parameters named
  `in`; a parameter without default after defaults) and shadows the builtin `bool` with the
  DataType constant `tensorrt.bool`, so every `-> bool` in it means nothing. The layout holds a
  copy with exactly those repaired; mypy.ini ignores the stubs' remaining internal errors.

Run by hand: `.venv/bin/python tests/test_typecheck.py` (prints mypy's report).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO / ".cache" / "mypy" / "layout"    # mypy.ini's mypy_path (.cache/ is git-ignored)
PACKAGE_DIRS = {"compiler": "compiler", "runtime": "runtime", "plugins": "plugins"}   # trtc.<name> -> repo dir

# Every module that touches TensorRT.
CHECKED = ["trtc.flavour", "trtc.compiler.build", "trtc.runtime.tensorrt_plan", "trtc.runtime.tensorrt_session",
           "trtc.runtime.launcher",
           "trtc.plugins.tensorrt_plugin"]


def _repair_stub(text: str) -> str:
    """tensorrt_bindings/tensorrt.pyi of tensorrt-stubs 10.13.0.35.1, made parseable, `bool` meaning bool."""
    text = re.sub(r"([(,] *)in: ", r"\1in_: ", text)                      # `in` is a keyword
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    tree = ast.parse(text)        # SyntaxError here: a stubs version with other defects
    # Annotations that say `bool`: point them at builtins.bool (the module-level `bool: DataType` shadows it).
    spots = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            annotations += [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
                            if x is not None and x.annotation is not None]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign) and not (isinstance(node.target, ast.Name) and node.target.id == "bool"):
            annotations.append(node.annotation)
        for ann in annotations:
            if ann is not None:
                spots += [(n.lineno, n.col_offset) for n in ast.walk(ann) if isinstance(n, ast.Name) and n.id == "bool"]
    lines = text.splitlines(keepends=True)
    for lineno, col in sorted(set(spots), reverse=True):
        line = lines[lineno - 1]
        lines[lineno - 1] = line[:col] + "_bool" + line[col + len("bool"):]
    return "from builtins import bool as _bool\n" + "".join(lines)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def layout(root: Path = LAYOUT) -> None:
    """The search path mypy.ini names: the trtc package as installed (symlinks into the checkout)
    and the repaired TensorRT stubs. Updated in place, so mypy's cache stays valid between runs."""
    pkg = root / "trtc"
    pkg.mkdir(parents=True, exist_ok=True)
    wanted = {e.name: e for e in (REPO / "trtc").iterdir() if e.name != "__pycache__"}
    wanted.update({name: REPO / repo_dir for name, repo_dir in PACKAGE_DIRS.items()})
    for stale in set(p.name for p in pkg.iterdir()) - set(wanted):
        (pkg / stale).unlink()
    for name, target in wanted.items():
        _link(pkg / name, target)
    for f in importlib.metadata.files("tensorrt-stubs") or []:
        if f.suffix == ".pyi":
            text = Path(str(f.locate())).read_text()
            _write(root / str(f), _repair_stub(text) if f.name == "tensorrt.pyi" else text)


def run_mypy() -> subprocess.CompletedProcess[str]:
    layout()
    args = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "mypy.ini")]
    for m in CHECKED:
        args += ["-m", m]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def report(r: subprocess.CompletedProcess[str]) -> str:
    """mypy's output with the layout's paths turned back into repo paths."""
    text = r.stdout + r.stderr
    for root in (f"{LAYOUT}/", f"{LAYOUT.relative_to(REPO)}/"):
        for name, repo_dir in PACKAGE_DIRS.items():
            text = text.replace(f"{root}trtc/{name}/", f"{repo_dir}/")
        text = text.replace(root, "")
    return text


def test_tensorrt_code_type_checks():
    r = run_mypy()
    assert r.returncode == 0, f"mypy found problems in the TensorRT code:\n{report(r)}"


if __name__ == "__main__":
    r = run_mypy()
    print(report(r), end="")
    sys.exit(r.returncode)
