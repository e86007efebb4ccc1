"""Load and validate an engine dir before anything in it is used.

Checks, in order: config.json exists and is readable, the format version is ours, and (per
backend, just before use) the sha256 of each file that backend will read. For the TensorRT
backend, also the installed TensorRT flavour/version and the GPU's compute capability against what
the engine was built for, before deserializing (a mismatched engine otherwise fails deep inside
TensorRT, or not at all).

An export dir (`trtc export`) loads too, for the onnxruntime backend only: it holds the rank graph
but no engine, so its limits are the export's (max_seq_len; prompts up to max_seq_len; batches of
EXPORT_DIR_BATCH sequences).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtc.compiler.package import ENGINE_CONFIG, EXPORT_CONFIG, FORMAT_VERSION, verify_files
from trtc.spec import ModelSpec
from trtc.errors import TrtcError


EXPORT_DIR_BATCH = 8   # sequences per batch when running an export dir (it has no build limits)


@dataclass(frozen=True)
class EngineDir:
    path: Path
    config: dict
    spec: ModelSpec

    @property
    def dtype(self) -> str:
        return self.config["pretrained_config"]["dtype"]

    @property
    def build(self) -> dict:
        return self.config["build_config"]

    @property
    def max_batch_size(self) -> int:
        return int(self.build["max_batch_size"])

    @property
    def max_input_len(self) -> int:
        return int(self.build["max_input_len"])

    @property
    def max_seq_len(self) -> int:
        return int(self.build["max_seq_len"])

    @property
    def is_export(self) -> bool:
        """An export dir: ONNX rank graphs only, no engine."""
        return not self.config.get("engines")

    @property
    def attention(self) -> str:
        """"native" (per-layer KV caches) or "plugin" (trtc plugins, paged KV cache)."""
        return self.config.get("export_config", {}).get("attention", "native")

    @property
    def kv_block_size(self) -> int:
        return int(self.config.get("export_config", {}).get("kv_block_size", 16))

    @property
    def onnx_file(self) -> str | None:
        onnx = self.config.get("onnx")
        return onnx["0"] if onnx else None

    @property
    def engine_file(self) -> str:
        return self.config["engines"]["0"]

    def verify(self, names: list[str]) -> None:
        verify_files(self.path, self.config["files"], names, rebuild_hint="rebuild the engine dir with trtc build")

    def tokenizer_files(self) -> list[str]:
        return [n for n in self.config["files"] if not n.startswith("rank")]


def load_engine_dir(path: str | Path) -> EngineDir:
    p = Path(path)
    if not p.is_dir():
        raise TrtcError(f"{p} is not a directory; pass the engine dir written by trtc build")
    cfg_path = p / ENGINE_CONFIG
    if not cfg_path.is_file() and (p / EXPORT_CONFIG).is_file():
        return _load_export_dir(p)
    if not cfg_path.is_file():
        raise TrtcError(f"{p} has no {ENGINE_CONFIG}: it is not a trtc engine dir; "
                        f"build one with `trtc build --output {p}`")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise TrtcError(f"{cfg_path} is not valid JSON ({e}); rebuild the engine dir") from e
    if config.get("format_version") != FORMAT_VERSION or "fingerprint" not in config:
        raise TrtcError(f"{cfg_path} is not a trtc engine config of format {FORMAT_VERSION}; "
                        f"rebuild the engine dir with this trtc")
    return EngineDir(path=p, config=config, spec=ModelSpec.from_dict(config["pretrained_config"]))


def _load_export_dir(p: Path) -> EngineDir:
    try:
        meta = json.loads((p / EXPORT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise TrtcError(f"{p / EXPORT_CONFIG} is not valid JSON ({e}); re-run trtc export") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise TrtcError(f"{p} was exported by another trtc format ({meta.get('format_version')}); "
                        f"re-run trtc export with this version")
    ecfg = meta["export_config"]
    seq = int(ecfg["max_seq_len"])
    onnx = sorted(n for n in meta["files"] if n.startswith("rank") and n.endswith(".onnx"))
    config = {**meta, "pretrained_config": {**meta["pretrained_config"], "dtype": ecfg["dtype"]},
              "build_config": {"max_batch_size": EXPORT_DIR_BATCH, "max_input_len": seq, "max_seq_len": seq},
              "onnx": {"0": onnx[0]} if onnx else None, "engines": None}
    return EngineDir(path=p, config=config, spec=ModelSpec.from_dict(config["pretrained_config"]))


def check_tensorrt_compat(ed: EngineDir, trt_module, flavour: str, gpu_sm: int | None) -> None:
    """Raise TrtcError when this machine cannot run the engine (before deserializing it)."""
    built = ed.config["tensorrt"]
    if built["flavour"] != flavour:
        raise TrtcError(f"{ed.path} was built with {built['flavour']} but this machine has {flavour}; "
                        f"rebuild it here, or install {built['flavour']} {built['version']}")
    have = trt_module.__version__
    if have != built["version"]:
        raise TrtcError(f"{ed.path} was built with {flavour} {built['version']} but {have} is installed; "
                        f"engines only load in the version that built them: rebuild, or install "
                        f"{flavour}=={built['version']}")
    if gpu_sm is None:
        raise TrtcError("no CUDA GPU is visible (torch.cuda.is_available() is False); the TensorRT backend "
                        "needs one: use --backend onnxruntime with an engine dir built with --keep-onnx")
    targets = [int(t.removeprefix("sm_")) for t in built["targets"]]
    if gpu_sm not in targets:
        raise TrtcError(f"{ed.path} was built for {', '.join(built['targets'])} but this GPU is sm_{gpu_sm}; "
                        f"rebuild with --target sm_{gpu_sm}")
