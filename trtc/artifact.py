"""The artifact contract: everything trtc writes into an engine dir or an export dir and reads back.

This module is the only place where config.json / trtc_export.json fields, rank file names, graph
I/O names, the KV block arithmetic and the file checksums are spelled. The compiler writes through
it, the runtime and `trtc inspect` read through it; neither imports the other's internals.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtc import typed_json
from trtc.errors import TrtcError
from trtc.spec import ModelSpec, fingerprint_of

# --- file names ---------------------------------------------------------------------------------

ENGINE_CONFIG = "config.json"          # engine dir (trtc build)
EXPORT_CONFIG = "trtc_export.json"     # export dir (trtc export)
FORMAT_VERSION = 2                     # of both configs; 1: trtc 0.1 before the typed contract


def rank_engine(rank: int, target: str | None = None) -> str:
    """Engine file of one rank; `target` names a per-target engine where one engine cannot serve
    all targets of an artifact (full TensorRT: one compute capability per engine)."""
    return f"rank{rank}.engine" if target is None else f"rank{rank}.{target}.engine"


def rank_onnx(rank: int) -> str:
    return f"rank{rank}.onnx"


def onnx_data(onnx_file: str) -> str:
    """External-data file of a rank graph (its weights)."""
    return onnx_file + ".data"


def is_rank_file(name: str) -> bool:
    return name.startswith("rank")


# Stamp in every rank graph's metadata_props: which build it belongs to (engine dir: config.json's
# fingerprint; export dir: one fingerprint shared by its ranks), its rank and the world size.
GRAPH_FINGERPRINT, GRAPH_RANK, GRAPH_WORLD_SIZE = "trtc.fingerprint", "trtc.rank", "trtc.world_size"


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads one tensor-parallel rank holds: its share, or one (replicated) when tp exceeds them."""
    return num_kv_heads // tp if tp <= num_kv_heads else 1


def rank_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The model as one rank's graph of a tp-way split sees it: its query heads, the KV heads it
    holds (cache shapes), its slice of the MLP. tp 1: the spec itself."""
    import dataclasses

    if tp == 1:
        return spec
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp, intermediate_size=spec.intermediate_size // tp,
                               num_kv_heads=kv_heads_per_rank(spec.num_kv_heads, tp))


# --- graph I/O names ----------------------------------------------------------------------------
# Native form: input_ids, position_ids int64 [batch, seq]; one cache per layer and K/V,
# [batch, kv_heads, max_seq_len, head_dim], as `past_key_values.{i}.{key,value}` in and
# `present.{i}.{key,value}` out (the same buffer: the KV-cache update writes in place).
# Plugin form: `past_kv_pool.{i}` [num_blocks, 2, kv_heads, block_size, head_dim] in,
# `present_kv_pool.{i}` out (aliased), `block_tables` int32 [batch, max_blocks], and the tokens PACKED:
# input_ids/position_ids [1, tokens] hold the sequences back to back, `cu_seqlens_q` says where each
# starts (no padding is computed).

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"      # exported by HF's forward, removed by the cleanup pass
LOGITS = "logits"
BLOCK_TABLES = "block_tables"
CU_SEQLENS = "cu_seqlens_q"            # plugin form: int32 [batch+1], sequence b = tokens cu[b]..cu[b+1]-1
PAST_PREFIX = "past_key_values."
POOL_PREFIX = "past_kv_pool."
TOKEN_INPUTS = (INPUT_IDS, POSITION_IDS)


def past_name(layer: int, kv: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kv}"


def present_name(layer: int, kv: str) -> str:
    return f"present.{layer}.{kv}"


def cache_names(num_layers: int) -> list[tuple[str, str]]:
    """(graph input, graph output) name pairs of the native KV cache, in layer order, key first."""
    return [(past_name(i, kv), present_name(i, kv)) for i in range(num_layers) for kv in ("key", "value")]


def pool_names(num_layers: int) -> list[tuple[str, str]]:
    """(graph input, graph output) name pairs of the plugin form's per-layer block pools."""
    return [(f"{POOL_PREFIX}{i}", f"present_kv_pool.{i}") for i in range(num_layers)]


def is_cache_input(name: str) -> bool:
    return name.startswith(PAST_PREFIX) or name.startswith(POOL_PREFIX)


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, numpy dtype name, shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class IOTable:
    """The rank graph's inputs and outputs, as the engine was built from it."""

    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        return next((t for t in self.outputs if t.name == name), None)


# --- KV cache arithmetic ------------------------------------------------------------------------

DEFAULT_KV_BLOCK_SIZE = 16             # tokens per KV block of the paged (plugin) cache


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-int(tokens) // block_size)


def max_blocks(max_seq_len: int, block_size: int) -> int:
    """Block-table width: blocks of one sequence of max_seq_len tokens."""
    return blocks_for(max_seq_len, block_size)


def cache_shape(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int) -> tuple[int, int, int, int]:
    """Native per-layer K or V cache: [batch, kv_heads, max_seq_len, head_dim]."""
    return (batch, num_kv_heads, max_seq_len, head_dim)


def pool_shape(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int) -> tuple[int, ...]:
    """Plugin-form per-layer block pool: [num_blocks, 2 (K, V), kv_heads, block_size, head_dim]."""
    return (num_blocks, 2, num_kv_heads, block_size, head_dim)


# --- typed records of config.json / trtc_export.json ---------------------------------------------
# Each record is a frozen dataclass: typed_json writes it, reads it back checking every field, and
# generates the JSON Schema shipped as trtc/data/engine-config.schema.json (`trtc schema`).

DTYPES = ("float16", "bfloat16", "float32")
ATTENTIONS = ("native", "plugin")
KV_BLOCK_SIZES = (16, 32, 64)          # what trtc's plugin kernels support (plugins/schema.py)


@dataclass(frozen=True)
class ExportConfig:
    """What the rank graphs were exported as: dtype, KV cache length, attention lowering."""

    dtype: str            # float16 | bfloat16 | float32
    max_seq_len: int      # KV cache length and rotary cache rows; prompt + generated tokens
    opset: int = 23       # exporter fuses Attention/RotaryEmbedding/RMSNormalization at 23; passes add TensorScatter-24
    attention: str = "native"          # "native": ONNX Attention/RotaryEmbedding/TensorScatter, per-layer caches;
                                       # "plugin": trtc::RopeKvAppend/PagedAttention, paged KV (block pools)
    kv_block_size: int | None = None   # tokens per KV block (plugin form only)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TrtcError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTIONS:
            raise TrtcError(f"--attention {self.attention!r} is unknown; use one of {', '.join(ATTENTIONS)}")
        if self.attention == "native" and self.kv_block_size is not None:
            raise TrtcError(f"--kv-block-size {self.kv_block_size} applies to the paged KV cache of "
                            f"--attention plugin; drop it or add --attention plugin")
        if self.attention == "plugin" and self.kv_block_size not in KV_BLOCK_SIZES:
            raise TrtcError(f"--kv-block-size {self.kv_block_size} is not supported by trtc's plugins; use one "
                            f"of {', '.join(map(str, KV_BLOCK_SIZES))}")
        if self.max_seq_len < 2:
            raise TrtcError(f"--max-seq-len {self.max_seq_len} is too small; use at least 2")

    def fingerprint(self) -> str:
        return fingerprint_of(self)


@dataclass(frozen=True)
class BuildConfig:
    """The engine's limits and the GPUs it is built for."""

    max_batch_size: int
    max_input_len: int    # longest prompt (prefill profile upper bound on sequence length)
    max_seq_len: int      # prompt + generated tokens (KV cache length)
    targets: tuple[str, ...]  # compute capabilities, e.g. ("sm_89", "sm_120")
    opt_batch_size: int = 1
    engine_per_target: bool = False   # one engine per target (full TensorRT: always) instead of one for all

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_len", "max_seq_len"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise TrtcError(f"{flag} {getattr(self, name)} must be at least 1")
        if self.max_input_len > self.max_seq_len:
            raise TrtcError(
                f"--max-input-len {self.max_input_len} exceeds --max-seq-len {self.max_seq_len}; "
                f"raise --max-seq-len or lower --max-input-len"
            )
        if not self.targets:
            raise TrtcError("no --target given; name at least one compute capability, e.g. sm_89")

    def fingerprint(self) -> str:
        return fingerprint_of(self)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per graph input, [min, opt, max] shapes."""

    name: str                                  # "prefill" (index 0) or "decode" (index 1)
    shapes: dict[str, list[list[int]]]


PREFILL, DECODE = 0, 1                          # profile indices in every engine


@dataclass(frozen=True)
class Mapping:
    """How the model is split over GPUs: tp_size ranks of tensor parallelism (pp reserved)."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size != self.tp_size * self.pp_size or self.tp_size < 1 or self.pp_size < 1:
            raise TrtcError(f"mapping world_size {self.world_size} != tp_size {self.tp_size} x pp_size "
                            f"{self.pp_size}")

    @property
    def ranks(self) -> range:
        return range(self.world_size)


@dataclass(frozen=True)
class TensorRTInfo:
    """The TensorRT that built the engines; engines load only in that flavour and version."""

    flavour: str               # "tensorrt_rtx" or "tensorrt"
    version: str
    targets: list[str]         # every compute capability some engine of the dir serves
    reproducible: bool         # the flavour's builds are byte-identical for identical inputs (no autotuning)


@dataclass(frozen=True)
class EngineFile:
    """One engine: the rank it runs and the compute capabilities it holds kernels for."""

    rank: int
    targets: list[str]
    file: str


@dataclass(frozen=True)
class RankGraph:
    """One rank's ONNX graph and its external weights (what the reference backend runs)."""

    rank: int
    file: str
    data: str


@dataclass(frozen=True)
class Source:
    """Where the model came from: the name given to trtc and the sha256 of its weight files."""

    model: str
    weights_sha256: str | None = None
    files_sha256: str | None = None     # the model dir's other files: config, tokenizer, generation config
    hf_dir: str | None = None           # the HF dir it was read from on the build machine (eval's reference)


@dataclass(frozen=True)
class FileEntry:
    """sha256 (hex) and size in bytes of one file of the dir."""

    sha256: str
    size: int


# --- checksums ----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# sha256 of files whose bytes trtc hashed as it wrote them (an engine, hashed while the builder
# streamed it: reading a 2 GiB engine back twice cost the package stage seconds), keyed by the
# file's identity: device, inode, size and mtime. A file renamed since keeps its identity; one
# rewritten or copied gets a new one and is read again. Only the writer's process records.
_WRITTEN: dict[tuple[int, int, int, int], str] = {}


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns) of path: what changes when its bytes may have."""
    import os

    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def record_sha256(path: Path, digest: str, identity: tuple[int, int, int, int]) -> bool:
    """Remember `digest` as path's sha256 when path still has the identity its writer saw after
    the last byte (its file_identity then); False (nothing remembered) when it changed since."""
    now = file_identity(path)
    if now != tuple(identity):
        return False
    _WRITTEN[now] = digest
    return True


def written_sha256(path: Path) -> str:
    """path's sha256: the digest recorded when trtc wrote it, if the file is unchanged since, else
    read from disk. For checksums of files trtc has just written; verify_files always reads."""
    known = _WRITTEN.get(file_identity(path))
    return known if known is not None else sha256_file(path)


def file_table(d: Path, names: list[str]) -> dict[str, FileEntry]:
    """{name: FileEntry(sha256, size)} of files in d, sorted by name."""
    return {n: FileEntry(written_sha256(d / n), (d / n).stat().st_size) for n in sorted(names)}


def verify_files(d: Path, table: dict[str, FileEntry], names: list[str] | None = None,
                 rebuild_hint: str = "rebuild it", config_name: str = ENGINE_CONFIG) -> None:
    """Check size and sha256 of `names` (default: all) against `table`; TrtcError naming the file."""
    for n in names if names is not None else list(table):
        entry = table.get(n)
        if entry is None:
            raise TrtcError(f"{d / config_name} lists no checksum for {n}; {rebuild_hint}")
        p = d / n
        if not p.is_file():
            raise TrtcError(f"{p} is missing; {rebuild_hint}")
        size = p.stat().st_size
        if size != entry.size:
            raise TrtcError(f"{p} is {size} bytes, expected {entry.size} (truncated or replaced); {rebuild_hint}")
        if sha256_file(p) != entry.sha256:
            raise TrtcError(f"{p} does not match its sha256 in {config_name} (corrupted); {rebuild_hint}")


def check_rank_stamps(d: Path, cfg: "EngineConfig | ExportDirConfig", hint: str) -> list[RankGraph]:
    """Every rank's ONNX graph: listed, on disk (graph and data), and stamped (GRAPH_*) with this
    dir's build and its own rank: rank files of different builds are refused by name before any
    weight is read. Engine dirs: the build is config.json's fingerprint; export dirs: rank 0's."""
    import onnx

    world = cfg.mapping.world_size
    expected = cfg.fingerprint if isinstance(cfg, EngineConfig) else None
    graphs = []
    for r in range(world):
        g = cfg.rank_graph(r)
        if g is None:
            raise TrtcError(f"{d} lists no ONNX graph for rank {r} of {world}; {hint}")
        for n in (g.file, g.data):
            if not (d / n).is_file():
                raise TrtcError(f"{d / n} (rank {r} of {world}) is missing; {hint}")
        try:
            stamp = {p.key: p.value for p in onnx.load(str(d / g.file), load_external_data=False).metadata_props}
        except Exception:      # noqa: BLE001  (a damaged file: its checksum names it)
            stamp = {}
        fp = stamp.get(GRAPH_FINGERPRINT)
        expected = expected or fp
        if fp is None or fp != expected or stamp.get(GRAPH_RANK) != str(r) or stamp.get(GRAPH_WORLD_SIZE) != str(world):
            what = "no trtc build stamp" if fp is None else \
                f"the stamp of build {fp}, rank {stamp.get(GRAPH_RANK)} of {stamp.get(GRAPH_WORLD_SIZE)}"
            raise TrtcError(f"{d / g.file} carries {what}, but this dir is build {expected}, rank {r} of {world}: "
                            f"rank files of different builds cannot be mixed; {hint}")
        graphs.append(g)
    return graphs


@dataclass(frozen=True)
class _Common:
    """Fields both dirs carry."""

    format_version: int
    trtc_version: str
    pretrained_config: ModelSpec
    export_config: ExportConfig
    mapping: Mapping
    quantization: dict[str, Any]        # quant_algo, kv_cache_quant_algo, and the quantizer's report
    io: IOTable
    onnx: list[RankGraph]               # rank graphs kept in the dir (engine dir: with --keep-onnx)
    tokenizer_files: list[str]
    source: Source
    passes: dict[str, int]              # rewrites per graph pass
    files: dict[str, FileEntry]         # sha256 + size of every other file in the dir

    def __post_init__(self) -> None:
        for key in ("quant_algo", "kv_cache_quant_algo"):
            if key not in self.quantization:
                raise TrtcError(f"quantization has no {key!r}")

    def rank_graph(self, rank: int = 0) -> RankGraph | None:
        return next((g for g in self.onnx if g.rank == rank), None)

    @property
    def spec(self) -> ModelSpec:
        return self.pretrained_config


@dataclass(frozen=True)
class EngineConfig(_Common):
    """config.json of a trtc engine dir: what the engines are and how they were built."""

    fingerprint: str                    # of everything that changes the engines (the cache key)
    build_config: BuildConfig
    profiles: list[Profile]             # index PREFILL, then DECODE
    tensorrt: TensorRTInfo
    engines: list[EngineFile]           # one per rank (and per target where one engine cannot serve all)

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [r for r in self.mapping.ranks if self.engine_for(r) is None]
        if missing:
            raise TrtcError(f"engines lists no engine for rank {missing[0]} of world_size {self.mapping.world_size}")

    def engine_for(self, rank: int, sm: int | None = None) -> EngineFile | None:
        """The engine of `rank` that holds kernels for compute capability `sm` (any when None)."""
        for e in self.engines:
            if e.rank == rank and (sm is None or f"sm_{sm}" in e.targets):
                return e
        return None


@dataclass(frozen=True)
class ExportDirConfig(_Common):
    """trtc_export.json of an export dir: ONNX rank graphs that `trtc build --model DIR` builds."""


def _version_check(data: Any, where: Path) -> None:
    v = data.get("format_version") if isinstance(data, dict) else None
    if v == FORMAT_VERSION:
        return
    if isinstance(v, int) and v > FORMAT_VERSION:
        raise TrtcError(f"{where} has format_version {v}, newer than this trtc understands ({FORMAT_VERSION}); "
                        f"upgrade trtc to read it")
    raise TrtcError(f"{where} has format_version {v!r}, an older trtc format (this trtc reads "
                    f"{FORMAT_VERSION}); rebuild the dir with this trtc")


def _read(cls: type, path: Path):
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtcError(f"{path} is not valid JSON ({e}); rebuild the dir with this trtc") from e
    except OSError as e:
        raise TrtcError(f"cannot read {path} ({e.strerror}); check the path") from e
    _version_check(data, path)
    return typed_json.from_json(cls, data, str(path), path="")


def read_engine_config(d: Path) -> EngineConfig:
    return _read(EngineConfig, Path(d) / ENGINE_CONFIG)


def read_export_config(d: Path) -> ExportDirConfig:
    return _read(ExportDirConfig, Path(d) / EXPORT_CONFIG)


def read_dir_config(d: Path) -> EngineConfig | ExportDirConfig:
    """An engine dir's or an export dir's config; TrtcError when `d` is neither."""
    d = Path(d)
    if not d.is_dir():
        raise TrtcError(f"{d} is not a directory; pass an engine dir (trtc build) or an export dir (trtc export)")
    if (d / ENGINE_CONFIG).is_file():
        return read_engine_config(d)
    if (d / EXPORT_CONFIG).is_file():
        return read_export_config(d)
    raise TrtcError(f"{d} has neither {ENGINE_CONFIG} (engine dir) nor {EXPORT_CONFIG} (export dir): it was "
                    f"not written by trtc; build one with `trtc build --output {d}`")


def write_config(d: Path, cfg: EngineConfig | ExportDirConfig) -> Path:
    """Write cfg as the dir's config file (the name follows the record type)."""
    path = Path(d) / (ENGINE_CONFIG if isinstance(cfg, EngineConfig) else EXPORT_CONFIG)
    path.write_text(json.dumps(typed_json.to_json(cfg), indent=2) + "\n")
    return path


def engine_config_schema() -> dict:
    """JSON Schema of an engine dir's config.json (shipped as trtc/data/engine-config.schema.json)."""
    schema = typed_json.json_schema(EngineConfig, f"trtc engine dir config.json, format {FORMAT_VERSION}",
                                    "Written by `trtc build`; generated from trtc.artifact.EngineConfig.")
    schema["properties"]["format_version"] = {"const": FORMAT_VERSION}
    schema["properties"]["quantization"]["required"] = ["quant_algo", "kv_cache_quant_algo"]
    return schema


SCHEMA_FILE = "engine-config.schema.json"
PROVENANCE = "provenance.intoto.json"   # in-toto Statement over every file of the dir (config.json included)
