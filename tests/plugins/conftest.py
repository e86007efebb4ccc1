"""Make `trtc.plugins` importable from a bare checkout (e.g. on a GPU machine where trtc is not
installed): map it onto plugins/ without executing trtc/__init__.py."""
import importlib.util
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _bootstrap() -> None:
    try:
        import trtc.plugins  # noqa: F401  (installed, e.g. pip install -e .)
        return
    except ImportError:
        pass
    if "trtc" not in sys.modules:
        pkg = types.ModuleType("trtc")
        pkg.__path__ = [str(ROOT / "trtc")]
        sys.modules["trtc"] = pkg
    spec = importlib.util.spec_from_file_location("trtc.plugins", ROOT / "plugins" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "plugins")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trtc.plugins"] = mod
    spec.loader.exec_module(mod)


_bootstrap()
