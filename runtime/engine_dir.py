"""Load and validate an engine dir (or an export dir) before anything in it is used.

Checks, in order: the config file exists, its format version is one this trtc reads, every field
has the type the contract (trtc/artifact.py) says, and (per backend, just before use) the sha256 of
each file that backend will read. For the TensorRT backend, also the installed TensorRT
flavour/version and the GPU's compute capability against what the engine was built for, before
deserializing (a mismatched engine otherwise fails deep inside TensorRT, or not at all).

An export dir (`trtc export`) runs on the onnxruntime backend only: it holds the rank graphs but
no engine and no build limits, so it runs with RunLimits of its own (prompts up to max_seq_len,
batches of EXPORT_DIR_BATCH sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtc import artifact as art
from trtc.artifact import EngineConfig, ExportDirConfig, IOTable
from trtc.errors import TrtcError
from trtc.spec import ModelSpec

EXPORT_DIR_BATCH = 8   # sequences per batch when running an export dir (it has no build limits)


@dataclass(frozen=True)
class RunLimits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int


@dataclass(frozen=True)
class EngineDir:
    path: Path
    config: EngineConfig | ExportDirConfig

    @property
    def spec(self) -> ModelSpec:
        return self.config.pretrained_config

    @property
    def io(self) -> IOTable:
        return self.config.io

    @property
    def dtype(self) -> str:
        return self.config.export_config.dtype

    @property
    def is_export(self) -> bool:
        """An export dir: ONNX rank graphs only, no engine."""
        return isinstance(self.config, ExportDirConfig)

    @property
    def limits(self) -> RunLimits:
        if isinstance(self.config, EngineConfig):
            b = self.config.build_config
            return RunLimits(b.max_batch_size, b.max_input_len, b.max_seq_len)
        seq = self.config.export_config.max_seq_len
        return RunLimits(EXPORT_DIR_BATCH, seq, seq)

    @property
    def max_batch_size(self) -> int:
        return self.limits.max_batch_size

    @property
    def max_input_len(self) -> int:
        return self.limits.max_input_len

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    @property
    def attention(self) -> str:
        """"native" (per-layer KV caches) or "plugin" (trtc plugins, paged KV cache)."""
        return self.config.export_config.attention

    @property
    def kv_block_size(self) -> int:
        return self.config.export_config.kv_block_size or art.DEFAULT_KV_BLOCK_SIZE

    @property
    def quantized(self) -> bool:
        return bool(self.config.quantization.get("config"))

    @property
    def onnx_file(self) -> str | None:
        g = self.config.rank_graph(0)
        return g.file if g else None

    def engine(self, rank: int = 0, sm: int | None = None) -> art.EngineFile | None:
        if not isinstance(self.config, EngineConfig):
            return None
        return self.config.engine_for(rank, sm)

    @property
    def engine_file(self) -> str:
        e = self.engine(0)
        if e is None:
            raise TrtcError(f"{self.path} holds no engine (an export dir); build one with `trtc build --model {self.path}`")
        return e.file

    def verify(self, names: list[str]) -> None:
        hint = "re-run trtc export" if self.is_export else "rebuild the engine dir with trtc build"
        art.verify_files(self.path, self.config.files, names, rebuild_hint=hint,
                         config_name=art.EXPORT_CONFIG if self.is_export else art.ENGINE_CONFIG)

    def tokenizer_files(self) -> list[str]:
        return list(self.config.tokenizer_files)


def load_engine_dir(path: str | Path) -> EngineDir:
    p = Path(path)
    if not p.is_dir():
        raise TrtcError(f"{p} is not a directory; pass the engine dir written by trtc build")
    if not (p / art.ENGINE_CONFIG).is_file() and not (p / art.EXPORT_CONFIG).is_file():
        raise TrtcError(f"{p} has no {art.ENGINE_CONFIG}: it is not a trtc engine dir; "
                        f"build one with `trtc build --output {p}`")
    return EngineDir(path=p, config=art.read_dir_config(p))


def check_tensorrt_compat(ed: EngineDir, trt_module, flavour: str, gpu_sm: int | None) -> art.EngineFile:
    """The engine (rank 0) this machine can run; TrtcError saying why when it cannot (before deserializing)."""
    if not isinstance(ed.config, EngineConfig):
        raise TrtcError(f"{ed.path} is an export dir and holds no engine; build one with `trtc build --model {ed.path}`")
    built, trt_version = ed.config.tensorrt, trt_module.__version__
    if built.flavour != flavour:
        raise TrtcError(f"{ed.path} was built with {built.flavour} but this machine has {flavour}; "
                        f"rebuild it here, or install {built.flavour} {built.version}")
    if trt_version != built.version:
        raise TrtcError(f"{ed.path} was built with {flavour} {built.version} but {trt_version} is installed; "
                        f"engines only load in the version that built them: rebuild, or install "
                        f"{flavour}=={built.version}")
    if gpu_sm is None:
        raise TrtcError("no CUDA GPU is visible (torch.cuda.is_available() is False); the TensorRT backend "
                        "needs one: use --backend onnxruntime with an engine dir built with --keep-onnx")
    engine = ed.engine(0, gpu_sm)
    if engine is None:
        raise TrtcError(f"{ed.path} was built for {', '.join(built.targets)} but this GPU is sm_{gpu_sm}; "
                        f"rebuild with --target sm_{gpu_sm}")
    return engine
