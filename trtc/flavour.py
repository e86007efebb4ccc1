"""The one place that imports TensorRT: resolves `tensorrt` (datacenter) or `tensorrt_rtx`.

Capability differences between the flavours are data here (targets, plugin support, minimum
compute capability per precision) and are checked before a build starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from trtc.errors import TrtcError

if TYPE_CHECKING:
    # The type check (tests/test_typecheck.py) reads `tensorrt`'s stubs for both flavours: TensorRT-RTX
    # has the same Python API. Code that uses the module from import_trt() writes
    #     if TYPE_CHECKING: import tensorrt as trt
    #     else: trt = import_trt(flavour)
    # so its TensorRT calls are checked against the stubs.
    import tensorrt

    _ILogger = tensorrt.ILogger
else:
    _ILogger = object    # the flavour's ILogger is mixed in by make_logger()


@dataclass(frozen=True)
class Flavour:
    name: str                      # "tensorrt_rtx" or "tensorrt"
    module: str                    # import name
    pip_extra: str                 # how to install it with trtc
    targets: tuple[str, ...]       # compute capabilities it can build for
    default_targets: tuple[str, ...]
    plugins: bool                  # custom plugin layers (trtc's attention plugins)
    fp8_min_sm: int
    fp4_min_sm: int
    multi_target: bool             # one engine can hold kernels for several compute capabilities
    reproducible: bool             # same inputs -> byte-identical engines (no autotuning; see build.py)


FLAVOURS = {
    # TensorRT-RTX: ahead-of-time builds on CPU for the listed consumer/workstation GPUs.
    # No Hopper (sm_90) or sm_100 target exists in its ComputeCapability enum.
    "tensorrt_rtx": Flavour("tensorrt_rtx", "tensorrt_rtx", 'pip install -e ".[rtx]"',
                            ("sm_75", "sm_80", "sm_86", "sm_89", "sm_120", "sm_121"),
                            ("sm_80", "sm_86", "sm_89", "sm_120"), plugins=False,
                            fp8_min_sm=89, fp4_min_sm=120, multi_target=True, reproducible=True),
    # Full TensorRT: builds on (and for) the datacenter GPU it runs on; needs that GPU. It times
    # tactics on that GPU (autotuning), so two builds of one network may differ: not reproducible.
    "tensorrt": Flavour("tensorrt", "tensorrt", 'pip install -e ".[tensorrt]" (NVIDIA index)',
                        ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"),
                        ("sm_90",), plugins=True, fp8_min_sm=89, fp4_min_sm=100, multi_target=False,
                        reproducible=False),
}


def sm_number(target: str) -> int:
    return int(target.removeprefix("sm_"))


def parse_targets(text: str | None, flavour: Flavour) -> tuple[str, ...]:
    if not text:
        return flavour.default_targets
    out = []
    for raw in text.split(","):
        t = raw.strip().lower().replace("sm", "sm_").replace("sm__", "sm_")
        if not t.startswith("sm_") or not t[3:].isdigit():
            raise TrtcError(f"--target {raw.strip()!r} is not a compute capability; write e.g. sm_89,sm_120")
        if t not in flavour.targets:
            raise TrtcError(f"--target {t} is not supported by {flavour.name}; "
                            f"it builds for {', '.join(flavour.targets)}")
        out.append(t)
    return tuple(dict.fromkeys(out))


def resolve_flavour(name: str = "auto") -> Flavour:
    """`auto`: full TensorRT when importable (datacenter), else TensorRT-RTX."""
    if name != "auto":
        if name not in FLAVOURS:
            raise TrtcError(f"--flavour {name!r} is unknown; use auto, {', '.join(FLAVOURS)}")
        import_trt(FLAVOURS[name])
        return FLAVOURS[name]
    for fl in (FLAVOURS["tensorrt"], FLAVOURS["tensorrt_rtx"]):
        try:
            import_trt(fl)
            return fl
        except TrtcError:
            continue
    raise TrtcError('no TensorRT found: install TensorRT-RTX with `pip install -e ".[rtx]"` '
                    '(builds on CPU) or full TensorRT with `pip install -e ".[tensorrt]"`')


def import_trt(flavour: Flavour) -> ModuleType:
    try:
        module = importlib.import_module(flavour.module)
    except (ImportError, OSError) as e:  # not installed, or a missing/mismatched libnvinfer
        raise TrtcError(f"{flavour.name} is not importable ({type(e).__name__}: {e}); "
                        f"install it with {flavour.pip_extra}") from e
    if getattr(module, "__file__", None) is None:
        # A namespace package: a directory of that name without the library, e.g. the .pyi files
        # of tensorrt-stubs (installed for the type check) without TensorRT itself.
        raise TrtcError(f"{flavour.name} is not installed (`import {flavour.module}` finds only "
                        f"{', '.join(getattr(module, '__path__', []))}, no library); install it with {flavour.pip_extra}")
    return module


def trt_version(flavour: Flavour) -> str:
    return import_trt(flavour).__version__


class TrtLogger(_ILogger):
    """A TensorRT logger that keeps messages for error reports and drops one known false alarm.
    Its base at run time is the flavour's ILogger (make_logger); for the type checker, tensorrt's."""

    def __init__(self) -> None:
        super().__init__()      # the flavour's ILogger.__init__: TensorRT's trampoline needs it
        self.messages: list[tuple[str, str]] = []

    def log(self, severity: tensorrt.ILogger.Severity, msg: str) -> None:
        # Logged once per process on machines without a GPU; harmless for building.
        if "cudaError 35" in msg or "CUDA driver version is insufficient" in msg:
            return
        self.messages.append((str(severity), msg))

    def errors(self) -> list[str]:
        return [m for s, m in self.messages if "ERROR" in s]


def make_logger(trt: ModuleType, min_severity: object = None) -> TrtLogger:
    logger: TrtLogger = type("TrtLogger", (TrtLogger, trt.ILogger), {})()
    return logger
