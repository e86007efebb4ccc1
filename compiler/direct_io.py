"""Sequential writes of large files that nothing reads back soon (the engine), past the page cache.

Why: an engine is written once by the builder and then only copied to a GPU machine; through the
page cache, each written byte first costs a fresh page-cache page. On the project's VM (ext4 on a
virtio disk, 2026-12-02) buffered writes of 2 GiB ran at 224-243 MB/s, mostly kernel time (dd: 8.8 s,
of it 8.4 s sys), once a few GiB of page cache were in use; the same 2 GiB with O_DIRECT took 2.2 s
(0.3 s sys). Measured with `dd if=/dev/zero of=F bs=64M count=32 [oflag=direct]`, three runs in a row
(bench/bench_engine_write.py repeats it with this writer).

DirectWriter copies the caller's bytes into one page-aligned block and writes whole blocks with
O_DIRECT; the last, partial block is padded to the alignment and the file is truncated back to its
size. Where the file system refuses O_DIRECT (tmpfs, some FUSE and network mounts: EINVAL at open or
at the first write), it falls back to plain buffered writes: same bytes, page cache and all.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

_ALIGN = 4096            # logical block size of every Linux disk we write to; mmap blocks are page-aligned
_BLOCK = 16 << 20


class DirectWriter:
    """write(bytes-like) / close(); `direct` says whether the page cache is bypassed."""

    def __init__(self, path: str | Path, block: int = _BLOCK) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        self.direct = hasattr(os, "O_DIRECT")
        self._buf: mmap.mmap | None = None
        self._fill = 0
        if self.direct:
            import fcntl

            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
                self._buf = mmap.mmap(-1, block)
            except OSError:
                self.direct = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self._buf is None:
            _write_all(self.fd, mv)
        else:
            block = len(self._buf)
            while mv:
                k = min(len(mv), block - self._fill)
                self._buf[self._fill:self._fill + k] = mv[:k]
                self._fill += k
                mv = mv[k:]
                if self._fill == block:
                    self._flush(block)
        self.size += n
        return n

    def _flush(self, nbytes: int) -> None:
        assert self._buf is not None
        whole = memoryview(self._buf)
        try:
            _write_all(self.fd, whole[:nbytes], self)
        finally:
            whole.release()
        self._fill = 0

    def _buffered_from_here(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self, sync: bool = True) -> None:
        """Write what is left, fsync (sync=True) and close. Raises OSError (disk full...) with the fd closed."""
        try:
            if self._buf is not None:
                if self._fill:
                    tail = self._fill
                    padded = -(-tail // _ALIGN) * _ALIGN
                    self._buf[tail:padded] = bytes(padded - tail)
                    self._flush(padded)
                    os.ftruncate(self.fd, self.size)
                self._buf.close()
                self._buf = None
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._buf is not None:
            self._buf.close()
            self._buf = None


def _write_all(fd: int, mv: memoryview, w: DirectWriter | None = None) -> None:
    """All of mv or an OSError. Under O_DIRECT, EINVAL means the file system refuses it after all
    (some accept the flag at open only) or that a short write (a full disk, a file size limit) left
    an unaligned remainder: the rest is written buffered, so a full disk reports itself as such."""
    while mv:
        try:
            n = os.write(fd, mv)
        except OSError as e:
            if w is None or not w.direct or e.errno != errno.EINVAL:
                raise
            w._buffered_from_here()
            continue
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        mv = mv[n:]
