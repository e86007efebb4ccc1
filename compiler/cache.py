"""Content-addressed cache of engine dirs, keyed on the build fingerprint.

Layout under the root (default `$TRTC_CACHE_DIR/engines`, TRTC_CACHE_DIR default ~/.cache/trtc):
    entries/<fingerprint>/     a complete engine dir (config.json lists every file's sha256)
    entries/<fingerprint>/.used  touched on every hit: least recently used entries go first
    exports/<key>/             the float rank graphs after the passes, as an export dir: builds of
                               one model in several quant modes or for several targets share them
    locks/<fingerprint>.lock   flock held while one process looks up, builds and stores that key

A hit copies the entry into the output dir (atomically, like a build) after checking every file
against its config.json: a corrupted entry is removed and rebuilt, never handed out. Entries are
written to a temp dir and renamed into place, so a crash leaves no half entry. Two processes
building the same key serialize on its lock: the second one finds the first one's entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from trtc import artifact as art
from trtc.errors import TrtcError
from trtc.log import info

from . import package

DEFAULT_MAX_BYTES = 20 * 2**30
_USED = ".used"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'20G', '512M', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise TrtcError(f"TRTC_CACHE_MAX_SIZE={text!r} is not a size; write e.g. 20G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def default_root() -> Path:
    return Path(os.environ.get("TRTC_CACHE_DIR") or Path.home() / ".cache" / "trtc") / "engines"


class EngineCache:
    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_root()
        env = os.environ.get("TRTC_CACHE_MAX_SIZE")
        self.max_bytes = max_bytes if max_bytes is not None else parse_size(env) if env else DEFAULT_MAX_BYTES
        self.entries = self.root / "entries"
        self.exports = self.root / "exports"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        locks = self.root / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            f = open(locks / f"{key}.lock", "a+")
        except OSError as e:
            raise TrtcError(f"cannot use the engine cache at {self.root} ({e.strerror}); set TRTC_CACHE_DIR to a "
                            f"writable dir, or pass --no-cache") from e
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)    # released when f closes, also if this process dies
            yield

    def recall(self, request: str) -> str | None:
        """The fingerprint an identical build request produced before (see pipeline.request_key)."""
        try:
            return (self.root / "requests" / request).read_text().strip() or None
        except OSError:
            return None

    def remember(self, request: str, key: str) -> None:
        try:
            d = self.root / "requests"
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".req-", dir=d)
            with os.fdopen(fd, "w") as f:
                f.write(key)
            os.replace(tmp, d / request)
        except OSError:
            pass           # only the fast path is lost; the fingerprint lookup still works

    def fetch(self, key: str, output: Path, finish: Callable[[Path], object] | None = None) -> bool:
        """Copy entry `key` to `output` if it is there and intact; `finish(tmp_dir)` runs on the copy
        before it is renamed into place (e.g. to write this job's provenance statement)."""
        entry = self.entries / key
        if not (entry / art.ENGINE_CONFIG).is_file():
            return False
        try:
            cfg = art.read_engine_config(entry)
            art.verify_files(entry, cfg.files, rebuild_hint="rebuilding it")
            if cfg.fingerprint != key:
                raise TrtcError(f"{entry} holds fingerprint {cfg.fingerprint}, not {key}")
        except TrtcError as e:
            info(f"[trtc] cache entry {key} is damaged ({e}); removing it and building")
            shutil.rmtree(entry, ignore_errors=True)
            return False
        with package.atomic_dir(output, art.ENGINE_CONFIG) as tmp:
            for n in [art.ENGINE_CONFIG, *cfg.files]:
                shutil.copyfile(entry / n, tmp / n)     # the user's files: never linked to the cache
            if finish is not None:
                finish(tmp)
        (entry / _USED).touch()
        info(f"[trtc] cache hit {key}: {output}")
        return True

    def store(self, key: str, built: Path) -> None:
        """Add a finished engine dir under `key` (atomically), then evict down to the size limit.
        Copied: the dir becomes the user's output, and a tool that rewrites a file in place (`cp`
        onto it) must not reach into the cache."""
        self._store(self.entries, key, built, link=False)

    def fetch_export(self, key: str, dest: Path) -> bool:
        """Copy (hard-link where possible) export entry `key` into the new dir `dest` if it is intact."""
        entry = self.exports / key
        if not (entry / art.EXPORT_CONFIG).is_file():
            return False
        try:
            cfg = art.read_export_config(entry)
            art.verify_files(entry, cfg.files, rebuild_hint="re-exporting", config_name=art.EXPORT_CONFIG)
        except TrtcError as e:
            info(f"[trtc] cached export {key} is damaged ({e}); removing it and exporting again")
            shutil.rmtree(entry, ignore_errors=True)
            return False
        dest.mkdir(parents=True)
        for n in [art.EXPORT_CONFIG, *cfg.files]:
            _link_or_copy(entry / n, dest / n)
        (entry / _USED).touch()
        info(f"[trtc] reusing the cached export {key} (no re-export)")
        return True

    def store_export(self, key: str, export_dir: Path) -> None:
        """Add the float export in trtc's own work dir: hard-linked, no copy (see _link_or_copy)."""
        self._store(self.exports, key, export_dir, link=True)

    def _store(self, where: Path, key: str, src: Path, link: bool) -> None:
        where.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=where))
        try:
            for p in src.iterdir():
                if p.is_file() and p.name != art.PROVENANCE:
                    (_link_or_copy if link else shutil.copyfile)(p, tmp / p.name)
            (tmp / _USED).touch()
            shutil.rmtree(where / key, ignore_errors=True)
            os.replace(tmp, where / key)
        except OSError as e:
            info(f"[trtc] could not store {key} in the engine cache ({e.strerror}); the build itself is complete")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=key)

    def _size(self, entry: Path) -> int:
        return sum(p.stat().st_size for p in entry.iterdir() if p.is_file())

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the cache fits max_bytes (never `keep`)."""
        entries = [e for where in (self.entries, self.exports) if where.is_dir()
                   for e in where.iterdir() if e.is_dir() and not e.name.startswith(".")]
        sizes = {e: self._size(e) for e in entries}
        total = sum(sizes.values())
        removed = []

        def used(e: Path) -> float:
            return (e / _USED).stat().st_mtime if (e / _USED).exists() else 0.0

        for e in sorted(entries, key=used):
            if total <= self.max_bytes:
                break
            if e.name == keep:
                continue
            shutil.rmtree(e, ignore_errors=True)
            total -= sizes[e]
            removed.append(e.name)
        return removed


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (an 8B model's float export is 15 GB: a copy doubles
    its disk use and takes minutes), else a copy. Only between the cache and trtc's own work dirs:
    trtc never writes into a finished file (it writes new files and renames them), and a cached
    export is checked against its sha256s before reuse."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
