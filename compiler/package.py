"""Stage 5, package: write dirs atomically, with checksums, and read them back safely.

Both the engine dir (`trtc build`) and the export dir (`trtc export`) are written into a temp dir
next to the destination and renamed into place only when complete; a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from trtc.errors import TrtcError

ENGINE_CONFIG = "config.json"
EXPORT_CONFIG = "trtc_export.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(d: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"sha256": sha256_file(d / n), "size": (d / n).stat().st_size} for n in sorted(names)}


def verify_files(d: Path, table: dict[str, dict], names: list[str] | None = None,
                 rebuild_hint: str = "rebuild it") -> None:
    """Check size and sha256 of `names` (default: all) against `table`; TrtcError on mismatch."""
    for n in names if names is not None else list(table):
        entry = table.get(n)
        if entry is None:
            raise TrtcError(f"{d / ENGINE_CONFIG} lists no checksum for {n}; {rebuild_hint}")
        p = d / n
        if not p.is_file():
            raise TrtcError(f"{p} is missing; {rebuild_hint}")
        size = p.stat().st_size
        if size != entry["size"]:
            raise TrtcError(f"{p} is {size} bytes, expected {entry['size']} (truncated or replaced); {rebuild_hint}")
        if sha256_file(p) != entry["sha256"]:
            raise TrtcError(f"{p} does not match its sha256 in the dir's config (corrupted); {rebuild_hint}")


def check_output_dir(final: Path, marker: str) -> None:
    """An output dir may be replaced only when missing, empty, or written by trtc before."""
    final = final.resolve()
    if final.exists():
        if not final.is_dir():
            raise TrtcError(f"--output {final} exists and is not a directory; choose another path")
        if any(final.iterdir()) and not (final / marker).is_file():
            raise TrtcError(f"--output {final} exists, is not empty and was not written by trtc; "
                            f"choose another path or remove it")


@contextlib.contextmanager
def atomic_dir(final: Path, marker: str):
    """Yield a temp dir; on success replace `final` with it. `final` may only be replaced when it
    is missing, empty, or a dir trtc wrote before (it holds `marker`)."""
    final = final.resolve()
    check_output_dir(final, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)   # mkdtemp makes it 0700; the result is an ordinary dir
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o644)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtcError(f"{path} is not valid JSON ({e}); rebuild the {what}") from e


def copy_files(src: Path, dst: Path, names) -> list[str]:
    for n in names:
        shutil.copy2(src / n, dst / n)
    return list(names)
