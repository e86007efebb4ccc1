"""Stage 5, package: write dirs atomically, with checksums, and read them back safely.

Both the engine dir (`trtc build`) and the export dir (`trtc export`) are written into a temp dir
next to the destination and renamed into place only when complete; a failed run leaves nothing.
What goes into them (config records, file names, checksums) is defined by trtc/artifact.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from trtc.errors import TrtcError

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


def copy_files(src: Path, dst: Path, names) -> list[str]:
    for n in names:
        shutil.copy2(src / n, dst / n)
    return list(names)


# Tools whose versions the provenance statement records (those that shape the artifact's bytes).
_TOOLS = ("trtc", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnx-graphsurgeon",
          "tensorrt-rtx-cu13", "tensorrt-cu13", "numpy")
BUILD_TYPE = "https://trtc.readthedocs.io/build/v1"   # identifies trtc's build process in the statement


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_provenance(d: Path, job: dict | None = None) -> Path:
    """An in-toto Statement (SLSA provenance v1 predicate) over every file of the engine dir,
    config.json included: what standard attestation tooling signs (cosign attest, GitHub's
    attest-build-provenance). No timestamps or host names: two identical builds write identical bytes."""
    import json

    from trtc import artifact as art

    cfg = art.read_engine_config(d)
    names = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != art.PROVENANCE)
    deps = [{"name": cfg.source.model, "digest": {"sha256": cfg.source.weights_sha256}}] \
        if cfg.source.weights_sha256 else []
    calib = (cfg.quantization.get("calibration") or {}).get("sha256")
    if calib:
        deps.append({"name": "calibration-text", "digest": {"sha256": calib}})
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": n, "digest": {"sha256": art.written_sha256(d / n)}} for n in names],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"job": job or {}},
                "internalParameters": {"fingerprint": cfg.fingerprint,
                                       "tensorrt": {"flavour": cfg.tensorrt.flavour,
                                                    "version": cfg.tensorrt.version,
                                                    "targets": cfg.tensorrt.targets}},
                "resolvedDependencies": deps,
            },
            "runDetails": {"builder": {"id": BUILD_TYPE, "version": _tool_versions()}},
        },
    }
    path = d / art.PROVENANCE
    path.write_text(json.dumps(statement, indent=2) + "\n")
    return path


def work_dir(output: Path, need_bytes: int = 0) -> Path:
    """Scratch dir for a build's large intermediates (traced and quantized graphs: about the model's
    size each): under $TRTC_WORK_DIR when set, else next to the output (the system temp dir is often
    small or memory-backed on CI runners). Checks free space first; the caller removes it (also on
    SIGTERM/Ctrl-C, which unwind through its `finally`)."""
    base = Path(os.environ["TRTC_WORK_DIR"]) if os.environ.get("TRTC_WORK_DIR") else final_parent(output)
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if need_bytes and free < need_bytes:
        raise TrtcError(f"the build needs about {need_bytes / 2**30:.1f} GiB of scratch space in {base} and "
                        f"{free / 2**30:.1f} GiB is free; free space there, or set TRTC_WORK_DIR to a larger disk")
    return Path(tempfile.mkdtemp(prefix=f".trtc-work-{output.name}-", dir=base))


def final_parent(output: Path) -> Path:
    return output.resolve().parent
