"""sha256 digests of model files, memoized by (path, size, mtime) so that an unchanged multi-GB
model is hashed once, not on every build (a warm cache hit must not cost a full read).

The memo lives in $TRTC_CACHE_DIR/digests.json; a changed size or modification time recomputes.
Concurrent writers may lose each other's entries (recomputed next time), never corrupt the file:
it is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _memo_file() -> Path:
    return Path(os.environ.get("TRTC_CACHE_DIR") or Path.home() / ".cache" / "trtc") / "digests.json"


def _stamp(paths: list[Path]) -> str:
    parts = []
    for p in sorted(paths):
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def memoized(kind: str, paths: list[Path], compute: Callable[[list[Path]], str]) -> str:
    """compute(paths), or the value remembered for exactly these files at their size and mtime."""
    key = f"{kind}:{_stamp(paths)}"
    memo_file = _memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    value = compute(paths)
    memo[key] = value
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=memo_file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_file)
    except OSError:
        pass            # a read-only cache dir: the digest is still right, only not remembered
    return value


def sha256_files(paths: list[Path]) -> str:
    """One digest over the files' names and contents, in name order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def dir_digest(d: Path) -> str:
    """Digest of every regular file directly in `d` (config, tokenizer, weights): what a build reads."""
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return memoized("dir", files, sha256_files)
