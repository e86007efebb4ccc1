"""The export's child processes, forked from one server that imported torch and transformers once.

Why a child: torch, the exporter and the traced template keep memory after an export (0.45 GiB for
TinyLlama, ~6 GiB for an 8B model) that would otherwise sit beside the TensorRT builder; a child
gives it all back when it ends. Why a server: starting Python and importing torch + transformers +
the exporter costs ~3-5 s on a 2-core machine, paid once per process that exports instead of once
per export (a test session runs ~100 exports; the CLI starts the server while it loads the model).

Protocol (`python -m trtc.compiler.export_worker`): the parent writes one JSON request per line on
the server's stdin ({"req", "res", "env", "cwd"}); the server forks a child for it, answers
"pid N" on stdout, waits for it and then writes DONE + the exit status on its stderr. The children
write their output (trtc's progress lines, tracebacks) to that same stderr pipe, which a thread of
the parent copies to the parent's sys.stderr; the status comes after everything the child wrote,
so nothing it printed is lost or reordered. The server ends when the parent closes its stdin (or
dies). It ignores SIGINT (a Ctrl-C reaches the whole process group: the child stops, the parent
handles it); the children get the default handlers back.

The server never runs a torch operation, so forking it is safe (OpenMP thread pools do not survive
a fork; only the child starts them).
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

DONE = b"\0trtc-export-done "
PRELOAD = ("torch", "torch.onnx", "onnx", "onnxscript", "transformers", "transformers.modeling_utils",
           "trtc.compiler.export", "trtc.compiler.stack")


# --- the parent's side ---------------------------------------------------------------------------

class _Server:
    def __init__(self) -> None:
        from trtc import log

        quiet, verbose = log.state()
        self.proc = subprocess.Popen([sys.executable, "-m", "trtc.compiler.export_worker", str(int(quiet)),
                                      str(int(verbose))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.lock = threading.Lock()
        self.status: list[int] = []
        self.done = threading.Condition()
        threading.Thread(target=self._relay, daemon=True, name="trtc-export-relay").start()

    def _relay(self) -> None:
        """Copy the server's stderr (its children's output) to sys.stderr; pick out the statuses."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd, buf = self.proc.stderr.fileno(), b""          # type: ignore[union-attr]
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            buf += chunk
            while DONE in buf and b"\n" in buf.partition(DONE)[2]:
                head, _, rest = buf.partition(DONE)
                line, _, buf = rest.partition(b"\n")
                self._write(dec.decode(head))
                with self.done:
                    self.status.append(int(line))
                    self.done.notify_all()
            if DONE in buf:                                   # a status line still arriving
                keep = len(buf) - buf.index(DONE)
            else:                                             # a marker split between two reads
                keep = next((k for k in range(len(DONE) - 1, 0, -1) if buf.endswith(DONE[:k])), 0)
            self._write(dec.decode(buf[:len(buf) - keep]))
            buf = buf[len(buf) - keep:]
            if not chunk:
                with self.done:
                    self.status.append(-255)                # the server is gone
                    self.done.notify_all()
                return

    @staticmethod
    def _write(text: str) -> None:
        if text:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):                # stderr closed: drop the output, keep the status
                pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, req: Path, res: Path) -> int:
        """One export in a fresh child; its exit status (negative: killed by that signal)."""
        with self.lock:
            with self.done:
                self.status.clear()
            msg = {"req": str(req), "res": str(res), "env": dict(os.environ), "cwd": os.getcwd()}
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())      # type: ignore[union-attr]
            answer = self.proc.stdout.readline().decode().split()         # type: ignore[union-attr]
            if len(answer) != 2 or answer[0] != "pid":
                return -255
            pid = int(answer[1])
            try:
                with self.done:
                    self.done.wait_for(lambda: bool(self.status))
                    return self.status[0]
            except BaseException:           # Ctrl-C / SIGTERM here: stop the child before the work dir goes
                _kill(pid)
                with self.done:
                    self.done.wait_for(lambda: bool(self.status), timeout=30)
                raise

    def stop(self) -> None:
        """End the server now: no export is in flight (run() has returned), and a server still
        importing torch (a user error right after start()) must not delay the caller's exit."""
        try:
            self.proc.stdin.close()          # type: ignore[union-attr]
        except OSError:
            pass
        self.proc.terminate()
        self.proc.wait()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


_server: _Server | None = None
_keep = False


def keep_server(keep: bool = True) -> None:
    """Keep the server between exports (a process that exports many models: a test session, a
    script building a matrix). It holds ~0.3 GiB (torch and transformers imported) until the
    process ends or stop() runs; by default it is stopped after each export, so it never sits
    beside the TensorRT builder."""
    global _keep
    _keep = keep


def start() -> None:
    """Start the server now, so its imports overlap what the caller does next (loading the model)."""
    global _server
    if _server is None or not _server.alive():
        _server = _Server()


def stop() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def release() -> None:
    """The caller's exports are over (or were not needed: a cache hit): stop the server unless it
    is kept."""
    if not _keep:
        stop()


def run_child(req: Path, res: Path) -> int:
    """Run one export (compiler/export.py trace_request) in a child forked from the server."""
    start()
    assert _server is not None
    try:
        code = _server.run(req, res)
        if code == -255:             # the server died before answering (killed?): once more, a fresh one
            stop()
            start()
            code = _server.run(req, res)
        return code
    finally:
        release()


# --- the server's side ---------------------------------------------------------------------------

def _child(msg: dict) -> None:
    """In the forked child: the parent's environment and working dir, default signals, output to
    the relayed stderr, then the export."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.dup2(2, 1)                    # stdout too: nothing of the export's may reach a --json stdout
    os.environ.clear()
    os.environ.update(msg["env"])
    os.chdir(msg["cwd"])
    from trtc.compiler.export import trace_request

    trace_request(Path(msg["req"]), Path(msg["res"]))


def serve(quiet: bool, verbose: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import importlib

    from trtc import log

    log.restore((quiet, verbose))       # before the imports: their warnings stay off the terminal too

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for line in sys.stdin.buffer:
        msg = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _child(msg)
                code = 0
            except KeyboardInterrupt:
                code = 130
            except BaseException:        # trace_request reports errors itself; this is a crash of it
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        sys.stdout.write(f"pid {pid}\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        sys.stderr.flush()
        os.write(2, DONE + f"{code}\n".encode())


if __name__ == "__main__":
    serve(sys.argv[1] == "1", sys.argv[2] == "1")
