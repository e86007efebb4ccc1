"""compiler/direct_io.py: the engine's writer. Whatever the chunking and whether or not the file
system takes O_DIRECT, the file holds exactly the bytes written; a full disk is an OSError naming
it, not a misleading EINVAL from an unaligned O_DIRECT retry."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trtc.compiler.direct_io import DirectWriter


def _chunks() -> list[bytes]:
    rnd = os.urandom(40000)
    # empty, unaligned, exactly one block, larger than a block, a short tail
    return [b"", rnd[:100], rnd[:8192], rnd[:20000], b"x", rnd[:12288], rnd[:7]]


@pytest.mark.parametrize("block", [8192, 1 << 20])
def test_bytes_and_size_exact(tmp_path, block):
    chunks = _chunks()
    path = tmp_path / "engine.plan"
    w = DirectWriter(path, block=block)
    assert [w.write(c) for c in chunks] == [len(c) for c in chunks]
    w.close()
    assert path.read_bytes() == b"".join(chunks)
    assert w.size == path.stat().st_size


def test_aligned_total_needs_no_truncate(tmp_path):
    path = tmp_path / "e"
    w = DirectWriter(path, block=8192)
    w.write(bytes(range(256)) * 64)          # 16384 bytes: two whole blocks, no tail
    w.close()
    assert path.read_bytes() == bytes(range(256)) * 64


def test_memory_backed_dir_falls_back_to_buffered():
    """tmpfs (/dev/shm) refuses O_DIRECT on most kernels: the writer must still produce the bytes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm on this machine")
    path = shm / f"trtc-direct-io-test-{os.getpid()}"
    try:
        chunks = _chunks()
        w = DirectWriter(path, block=8192)
        for c in chunks:
            w.write(c)
        w.close()
        assert path.read_bytes() == b"".join(chunks)
    finally:
        path.unlink(missing_ok=True)


_FULL = """
import errno, resource, signal, sys
from trtc.compiler.direct_io import DirectWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000))   # a 'disk' that is full after 30000 bytes
w = DirectWriter(sys.argv[1], block=8192)
try:
    for _ in range(10):
        w.write(b"y" * 5000)
    w.close()
except OSError as e:
    print(errno.errorcode[e.errno], w.direct)
    sys.exit(0)
print("no error")
"""


def test_full_disk_is_reported_as_such(tmp_path):
    """RLIMIT_FSIZE makes a write short, then fail, like a full disk: the error is EFBIG (or
    ENOSPC), never EINVAL from retrying an unaligned O_DIRECT write."""
    out = subprocess.run([sys.executable, "-c", _FULL, str(tmp_path / "e")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    code = out.stdout.split()[0]
    assert code in ("EFBIG", "ENOSPC"), out.stdout
    assert errno.errorcode[errno.EINVAL] not in out.stdout
