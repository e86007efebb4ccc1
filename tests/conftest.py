"""Shared fixtures: tiny models per family and engine dirs built from them (once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests/ is on sys.path through pyproject's `pythonpath = ["tests"]`: factories is imported under
# that one name by this file and by the tests.
from factories import TINY_MAX_BATCH, TINY_MAX_INPUT, TINY_MAX_SEQ, make_tiny_model

os.environ["TRTC_CHECK_PASSES"] = "1"      # graph check after every pass, in every test build
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _isolated_cache_dir() -> None:
    """Builds through the CLI use the engine cache under TRTC_CACHE_DIR: give the test session its
    own (no hits from earlier runs, nothing left in the user's cache), sharing only the prepared
    bundled models (dequantizing the GGUF once is enough)."""
    import atexit
    import shutil
    import tempfile

    shared = Path(os.environ.get("TRTC_CACHE_DIR") or Path.home() / ".cache" / "trtc") / "models"
    shared.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="trtc-test-cache-"))
    (d / "models").symlink_to(shared, target_is_directory=True)
    os.environ["TRTC_CACHE_DIR"] = str(d)
    atexit.register(shutil.rmtree, d, True)       # the symlink goes, the shared models stay


_isolated_cache_dir()


def _keep_export_server() -> None:
    """Every export of the session forks from one server that imported torch and transformers once
    (~100 exports: minutes of imports saved). Tests of the server's own lifecycle run the CLI in a
    subprocess, where the default (stopped after each export) applies."""
    from trtc.compiler import export_worker

    export_worker.keep_server(True)


_keep_export_server()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def rtx_flavour():
    from trtc.flavour import resolve_flavour

    return resolve_flavour("tensorrt_rtx")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, rtx_flavour, tmp_path_factory):
    """Engine dir (with --keep-onnx) of a tiny model, built with the real TensorRT-RTX builder."""
    from trtc.compiler.pipeline import build_model

    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, dtype: str = "float32") -> Path:
        key = (family, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"engine-{family}-{dtype}") / "engine"
            build_model(str(tiny_model(family)), out, rtx_flavour, ("sm_89",), dtype=dtype,
                        max_batch_size=TINY_MAX_BATCH, max_input_len=TINY_MAX_INPUT,
                        max_seq_len=TINY_MAX_SEQ, keep_onnx=True)
            cache[key] = out
        return cache[key]

    return get
