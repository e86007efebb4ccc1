"""Stage 3b, quantize: calibrate the rank graph on ONNX Runtime, store its weights in low precision.

Runs after the passes, on the rank ONNX graph (`rank0.onnx` + external data), so the same graph
feeds the TensorRT build and the reference backend: accuracy measured on ONNX Runtime is the
accuracy of the graph TensorRT compiled.

Modes (`--quant`): weights of every MatMul with a constant [K, N] weight except the lm_head (see
EXCLUDED). Each mode is a Recipe (RECIPES): a grid and the calibration-based steps that choose
the grid and the rounding (algorithms in quant_algos.py):
  int8_wo   int8 symmetric, one scale per output channel: DequantizeLinear(axis=1) -> MatMul.
            GPTQ rounding (rows rounded in order of activity, each row's error spread over the
            rows not yet rounded through the inverse Hessian of the calibration inputs).
  int8_awq  int8_wo plus the activation-aware scaling described for int4_awq.
  int4_rtn  int4 affine: per group of `group_size` input rows of each output column a scale and a
            float offset (w ~ s*u + lo, u in 0..15; Q4_1-style). TensorRT rejects non-zero zero
            points, so the int4 values (u - 8) go through a blockwise DequantizeLinear(axis=0) ->
            MatMul, and the offset is added back by a small MatMul of the per-group sums of x
            ((x @ E) @ offset, E the [K, K/G] group indicator). Plain round-to-nearest.
  int4_awq  int4_rtn's grid plus activation-aware scaling (AWQ): per input channel k, the weight
            row is multiplied by s_k and the activation divided by s_k (an explicit Mul, shared by
            the MatMuls reading the same activation: q/k/v, gate/up). s = mean|x|^alpha, alpha
            searched on the calibration activations (alpha = 0 is no scaling, so the search never
            does worse than RTN on the calibration data); then AWQ's clipping search per group,
            then GPTQ rounding on that grid.
  fp8       FP8 e4m3 weights (per output channel scales, GPTQ rounding) and activations
            (per-tensor scale from the calibration amax): QuantizeLinear -> DequantizeLinear on the
            activation, DequantizeLinear on the weight, MatMul: TensorRT fuses this into an FP8 GEMM.
            Outlier decomposition (--outlier-channels, default 16; LLM.int8()-style): per
            activation, the channels with the largest calibration amax are zeroed before the
            quantizer (their FP8 weight rows are zero) and multiplied by their float weight rows
            in a small [.., n] @ [n, N] MatMul added to the GEMM's output. FP8 keeps 3 mantissa
            bits whatever the scale, and on SmolLM2 rounding those few channels cost more top-1
            agreement than all the rest (bench/RESULTS-quant.md: 91.5% -> 95.2%).
  nvfp4     FP4 e2m1 weights in blocks of 16 input rows with FP8 e4m3 block scales and one fp32
            global scale per weight (two DequantizeLinears). Activations stay in the model dtype
            (weight-only): FP4 activations need dynamic block quantization, which standard ONNX
            cannot express (TensorRT's own op for it is a custom op ONNX Runtime cannot run).

Low-rank correction (`--low-rank R`, any mode with a weight grid): after rounding, per linear,
the rank-R matrix A @ B closest to the rounding error w - Q(w) in the metric of the calibration
inputs (SVD of H^1/2 (w - Q(w)), H = E[x^T x]; EoRA) is added back as (x @ A) @ B next to the
quantized MatMul, its factors stored as int8 with a scale per column. It targets what GPTQ cannot
remove on a coarse grid: the error along the few activation directions that carry most of the
energy. On SmolLM2 int4_awq g64 it is what moves top-1 agreement past 90% (bench/RESULTS-quant.md);
it costs R * (K + N) bytes per linear.

KV cache (`--kv-cache-dtype fp8|int8`): the new K/V entries are rounded to the 8-bit grid with a
calibrated per-layer scale (QuantizeLinear -> DequantizeLinear in front of each TensorScatter),
so attention sees exactly the values an 8-bit cache would hold. The cache *storage* stays in the
model dtype: TensorRT-RTX 1.7's KV-cache-update layer rejects 8-bit caches ("cache has type Int8
but must have type Float, Half, or BFloat16"; the same for FP8), and ONNX Runtime has no FP8
TensorScatter kernel. The accuracy is that of an 8-bit cache; the memory saving is not there yet.

Why trtc quantizes itself instead of using nvidia-modelopt: modelopt's torch quantization runs on
CPU, but its quantized torch models export only through the legacy TorchScript exporter, as
`trt::TRT_FP8QuantizeLinear`-style custom ops that ONNX Runtime cannot run (so the reference
backend could not check them) and that bypass trtc's dynamo export and passes; its `[onnx]`
extra (ONNX-level quantization) pins onnx/onnxruntime-gpu/transformers versions that conflict with
trtc's. Calibrating the rank graph itself also avoids mapping torch module names to ONNX nodes:
each weight MatMul's activation input is simply exposed as an extra graph output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtc.errors import TrtcError, TrtcInternalError
from trtc.log import info

from . import quant_algos as qa
from .quant_algos import FP8_MAX, INT8_MAX
from trtc.bundled import CALIB_TEXT, data_file
from trtc.flavour import Flavour, sm_number
from trtc.spec import ModelSpec, fingerprint_of

ALGOS = ("none", "fp8", "int8_wo", "int8_awq", "int4_awq", "int4_rtn", "nvfp4")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
BUNDLED_CALIB = CALIB_TEXT      # Python docs topics (pydoc_data, CPython 3.11) except those in eval.txt
DEFAULT_CALIB_SAMPLES = 128     # windows of 128 tokens: 16k tokens (GPTQ's Hessians need them)
DEFAULT_GROUP_SIZE = 128
NVFP4_BLOCK = 16
FP4_MAX = 6.0
AWQ_ROWS = 512                  # activation rows kept per AWQ group for the scale search
# Per mode, the input channels per linear whose weight rows stay in the model dtype (outlier
# decomposition, see the fp8 mode above); only modes whose grid stores an exact zero can take it.
# int8_awq: 0 - AWQ's scaling already protects the salient channels (SmolLM2: 98.82% top-1 without,
# 98.77% with 16; bench/RESULTS-quant.md).
DEFAULT_OUTLIER_CHANNELS = {"fp8": 16, "int8_wo": 16, "int8_awq": 0}
OUTLIER_WHY = {
    "fp8": "FP8 e4m3 keeps 3 mantissa bits whatever the scale: rounding the few large-magnitude activation "
           "channels costs more accuracy than all the others (bench/RESULTS-quant.md)",
    "int8": "the weight rows of the largest activation channels carry most of the rounding error's effect "
            "on the output (AWQ's salient channels; bench/RESULTS-quant.md)",
}

# Per mode, the rank of the correction (x @ A) @ B added to each quantized linear: the best
# rank-r approximation of the rounding error for the calibration activations (quant_algos.low_rank).
# int4_awq: 64 (SmolLM2 g64: 87.2% -> 90.4% top-1 agreement, engine 220 -> 246 MB). A default
# that is not well under a quarter of the smallest layer input (tiny models) becomes an eighth of it.
DEFAULT_LOW_RANK: dict[str, int] = {"int4_awq": 64}
LOW_RANK_WHY = ("the rounding error of a quantized weight is not white in the metric of the layer's "
                "inputs: a few directions of the activations carry most of its effect on the output, and "
                "a rank-r correction removes exactly those (bench/RESULTS-quant.md)")

EXCLUDED = {
    "lm_head": "kept in the model dtype: the logits' precision decides the next token, and the "
               "layer is tied to the token embedding in many models",
    "embedding": "a Gather, not a MatMul: nothing to gain in compute, kept in the model dtype",
}


@dataclass(frozen=True)
class QuantConfig:
    algo: str = "none"
    kv_cache_dtype: str = "auto"       # auto: the model dtype
    group_size: int = DEFAULT_GROUP_SIZE   # int4: input rows per scale (resolved per model)
    calib_source: str = "bundled:" + BUNDLED_CALIB
    calib_sha256: str = ""
    calib_samples: int = DEFAULT_CALIB_SAMPLES   # windows of calib_seq_len tokens
    calib_seq_len: int = 128
    group_size_explicit: bool = False  # the user named --group-size: never adjust it
    outlier_channels: int = 0          # per linear, input channels kept in the model dtype
    low_rank: int = 0                  # per linear, rank of the correction of the rounding error
    low_rank_explicit: bool = False    # the user named --low-rank: never adjust it

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise TrtcError(f"--quant {self.algo!r} is unknown; use one of {', '.join(ALGOS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise TrtcError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is unknown; use one of "
                            f"{', '.join(KV_CACHE_DTYPES)}")
        if self.group_size < 1:
            raise TrtcError(f"--group-size {self.group_size} must be a positive integer, e.g. 128")
        if self.calib_samples < 1:
            raise TrtcError(f"--calib-samples {self.calib_samples} must be at least 1")
        if self.outlier_channels < 0:
            raise TrtcError(f"--outlier-channels {self.outlier_channels} must be 0 (none) or more")
        if self.low_rank < 0:
            raise TrtcError(f"--low-rank {self.low_rank} must be 0 (none) or more")
        if self.low_rank and self.algo not in RECIPES:
            raise TrtcError(f"--low-rank applies to --quant {', '.join(RECIPES)}, not {self.algo}: drop it")
        if self.outlier_channels and self.algo not in DEFAULT_OUTLIER_CHANNELS:
            raise TrtcError(f"--outlier-channels applies to --quant {', '.join(DEFAULT_OUTLIER_CHANNELS)}, "
                            f"not {self.algo}: drop it")

    @property
    def enabled(self) -> bool:
        return self.algo != "none" or self.kv_cache_dtype != "auto"

    @property
    def needs_calibration(self) -> bool:
        return ((self.algo in RECIPES and (RECIPES[self.algo].calibrated or self.low_rank > 0))
                or self.kv_cache_dtype != "auto")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("group_size_explicit")
        d.pop("low_rank_explicit")
        if not self.algo.startswith("int4"):
            d.pop("group_size")
        if self.algo not in DEFAULT_OUTLIER_CHANNELS:
            d.pop("outlier_channels")
        if self.algo not in RECIPES:
            d.pop("low_rank")
        if not self.needs_calibration:
            for k in ("calib_source", "calib_sha256", "calib_samples", "calib_seq_len"):
                d.pop(k)
        return d

    def fingerprint(self) -> str:
        """Covers exactly what changes the quantized graph (calibration by content hash)."""
        d = self.to_dict()
        d.pop("calib_source", None)
        return fingerprint_of(d)


def make_quant_config(algo: str = "none", kv_cache_dtype: str = "auto", calib_data: str | None = None,
                      calib_samples: int | None = None, group_size: int | None = None,
                      outlier_channels: int | None = None, low_rank: int | None = None) -> QuantConfig:
    """Validate the CLI options and hash the calibration text (the bundled one by default)."""
    if calib_data is not None:
        p = Path(calib_data).expanduser()
        if not p.is_file():
            raise TrtcError(f"--calib-data {calib_data}: no such file; pass a UTF-8 text file")
        source = str(p)
    else:
        p = data_file(BUNDLED_CALIB)
        source = "bundled:" + BUNDLED_CALIB
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrtcError(f"--calib-data {p}: not UTF-8 text ({e}); pass a plain text file") from e
    if not text.strip():
        raise TrtcError(f"--calib-data {p} is empty; pass a file with some text (a few thousand tokens)")
    return QuantConfig(algo=algo, kv_cache_dtype=kv_cache_dtype,
                       group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size,
                       group_size_explicit=group_size is not None,
                       calib_source=source, calib_sha256=hashlib.sha256(text.encode()).hexdigest(),
                       calib_samples=DEFAULT_CALIB_SAMPLES if calib_samples is None else calib_samples,
                       outlier_channels=(DEFAULT_OUTLIER_CHANNELS.get(algo, 0) if outlier_channels is None
                                         else outlier_channels),
                       low_rank=DEFAULT_LOW_RANK.get(algo, 0) if low_rank is None else low_rank,
                       low_rank_explicit=low_rank is not None)


def _min_sm(q: QuantConfig, flavour: Flavour) -> tuple[int, str] | None:
    """(minimum compute capability, what needs it) for this config on this flavour, or None."""
    if q.algo == "nvfp4":
        return flavour.fp4_min_sm, "--quant nvfp4"
    if q.algo == "fp8":
        return flavour.fp8_min_sm, "--quant fp8"
    if q.kv_cache_dtype == "fp8":
        return flavour.fp8_min_sm, "--kv-cache-dtype fp8"
    return None


def default_targets(q: QuantConfig, flavour: Flavour) -> tuple[str, ...]:
    """The flavour's default targets that can run `q` (used only when --target is not given)."""
    need = _min_sm(q, flavour)
    if need is None:
        return flavour.default_targets
    ok = tuple(t for t in flavour.default_targets if sm_number(t) >= need[0])
    if not ok:
        ok = tuple(t for t in flavour.targets if sm_number(t) >= need[0])[:1]
    if ok and ok != flavour.default_targets:
        info(f"[trtc] {need[1]}: building for {','.join(ok)} (the default targets that support it)")
    return ok


def check_targets(q: QuantConfig, flavour: Flavour, targets: tuple[str, ...]) -> None:
    """Before any work: every requested target must support the precision."""
    need = _min_sm(q, flavour)
    if need is None:
        return
    min_sm, what = need
    bad = [t for t in targets if sm_number(t) < min_sm]
    if not bad:
        return
    ok = [t for t in targets if sm_number(t) >= min_sm] or [t for t in flavour.targets if sm_number(t) >= min_sm]
    alt = {"--quant nvfp4": "--quant fp8 or int4_awq", "--quant fp8": "--quant int8_wo",
           "--kv-cache-dtype fp8": "--kv-cache-dtype int8"}[what]
    where = f"--target {','.join(ok)}" if ok else f"a flavour with sm_{min_sm}+ targets"
    raise TrtcError(f"{what} needs compute capability {min_sm // 10}.{min_sm % 10}+ on {flavour.name}, "
                    f"but target {', '.join(bad)} is older; build for {where}, or use {alt}")


def _in_features(spec: ModelSpec) -> dict[str, int]:
    return {"hidden size": spec.hidden_size, "attention output size": spec.num_heads * spec.head_dim,
            "intermediate size": spec.intermediate_size}


def resolve_for_model(q: QuantConfig, spec: ModelSpec) -> QuantConfig:
    """Check --outlier-channels and the group size against every linear layer's input size. The
    default group size (128) falls back to the largest power of two that divides them all (e.g. 64
    for hidden size 576); a group size the user named is never changed."""
    feats = _in_features(spec)
    if q.outlier_channels >= min(feats.values()) // 2:
        name, val = min(feats.items(), key=lambda kv: kv[1])
        raise TrtcError(f"--outlier-channels {q.outlier_channels} is too many for the {name} {val} of this "
                        f"model: keep it well under half of it (default {DEFAULT_OUTLIER_CHANNELS[q.algo]}, 0 for none)")
    if q.low_rank >= min(feats.values()) // 4:
        name, val = min(feats.items(), key=lambda kv: kv[1])
        if not q.low_rank_explicit:        # the default is sized for real models; tiny ones get less
            info(f"[trtc] --quant {q.algo}: default low rank {q.low_rank} is too large for the {name} {val}; "
                 f"using {val // 8}")
            q = dataclasses.replace(q, low_rank=val // 8)
        else:
                raise TrtcError(f"--low-rank {q.low_rank} is too large for the {name} {val} of this model: keep "
                            f"it well under a quarter of it (default {DEFAULT_LOW_RANK.get(q.algo, 0)}, 0 for none)")
    if not q.algo.startswith("int4"):
        return q
    bad = {k: v for k, v in feats.items() if v % q.group_size}
    if not bad:
        return q
    g = q.group_size
    while g > 1 and any(v % g for v in feats.values()):
        g //= 2
    if q.group_size_explicit or g < 16:
        name, val = next(iter(bad.items()))
        raise TrtcError(f"--group-size {q.group_size} does not divide the {name} {val} of this model; "
                        f"use a divisor of {', '.join(str(v) for v in feats.values())}, e.g. {g}")
    info(f"[trtc] --quant {q.algo}: group size {q.group_size} does not divide the "
         f"{next(iter(bad))} {next(iter(bad.values()))}; using {g}")
    return dataclasses.replace(q, group_size=g)


# ---------------------------------------------------------------------------------------------
# Graph analysis
# ---------------------------------------------------------------------------------------------

@dataclass
class _Targets:
    matmuls: list            # onnx NodeProto, MatMul with constant [K, N] weight
    groups: dict             # activation tensor name -> [MatMul nodes reading it]
    lm_head: object | None   # the MatMul producing the logits
    scatters: list           # TensorScatter nodes (KV cache writes)


def _find_targets(model) -> _Targets:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    lm_head = None
    t = "logits"
    for _ in range(4):   # logits <- (Cast | Reshape | Identity)* <- MatMul
        n = producer.get(t)
        if n is None:
            break
        if n.op_type == "MatMul":
            lm_head = n
            break
        t = n.input[0]
    matmuls, groups = [], {}
    for n in g.node:
        if n.op_type != "MatMul" or n is lm_head:
            continue
        w = inits.get(n.input[1])
        if w is None or len(w.dims) != 2:
            continue
        matmuls.append(n)
        groups.setdefault(n.input[0], []).append(n)
    scatters = [n for n in g.node if n.op_type == "TensorScatter"]
    return _Targets(matmuls, groups, lm_head, scatters)


# ---------------------------------------------------------------------------------------------
# Calibration: run the rank graph on ONNX Runtime, activations exposed as extra outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class _ActStats:
    abs_sum: np.ndarray | None = None     # [K] sum of |x| over tokens
    count: int = 0
    rows: list = dataclasses.field(default_factory=list)   # sampled [r, K] float32 blocks
    xtx: np.ndarray | None = None          # [K, K] sum of x^T x (GPTQ's Hessian, up to 2/n)
    camax: np.ndarray | None = None        # [K] max |x| per input channel

    @property
    def amax(self) -> float:
        return 0.0 if self.camax is None else float(self.camax.max())

    def channels(self, keep: np.ndarray) -> "_ActStats":
        """These statistics restricted to the input channels `keep`."""
        return _ActStats(abs_sum=self.abs_sum[keep], count=self.count,
                         rows=[r[:, keep] for r in self.rows],
                         xtx=None if self.xtx is None else self.xtx[np.ix_(keep, keep)],
                         camax=self.camax[keep])

    @property
    def hessian(self) -> np.ndarray:
        return self.xtx / max(self.count, 1)

    def add(self, x: np.ndarray, keep_rows: int, hessian: bool = False) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        if hessian:
            xtx = x.T @ x
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        ax = np.abs(x)
        c = ax.max(0)
        self.camax = c if self.camax is None else np.maximum(self.camax, c)
        s = ax.sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        if keep_rows:
            step = max(1, x.shape[0] // keep_rows)
            self.rows.append(x[::step][:keep_rows])


def calibration_windows(tokenizer_dir: Path, q: QuantConfig, max_seq_len: int) -> list[np.ndarray]:
    """The calibration text as token windows [min(calib_seq_len, max_seq_len)], spread evenly over
    the text (fewer windows than calib_samples if the text is short; positions must stay inside
    the rotary cache)."""
    from transformers import AutoTokenizer

    text = (Path(q.calib_source) if not q.calib_source.startswith("bundled:")
            else data_file(q.calib_source.removeprefix("bundled:"))).read_text(encoding="utf-8")
    ids = np.array(AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"], dtype=np.int64)
    if len(ids) < 8:
        raise TrtcError(f"--calib-data {q.calib_source} has {len(ids)} tokens; give at least a few hundred")
    S = min(q.calib_seq_len, max_seq_len, len(ids))
    total = len(ids) // S
    n = min(q.calib_samples, total)
    starts = np.linspace(0, total - 1, n).round().astype(int) * S
    return [ids[i:i + S] for i in starts]


def calibrate(onnx_path: Path, names: list[str], awq_names: set[str], windows: list[np.ndarray],
              spec: ModelSpec, max_seq_len: int, hessian_names: set[str] = frozenset()) -> dict[str, _ActStats]:
    """Run the graph over the windows; statistics of each tensor in `names` (sampled rows for
    `awq_names`, x^T x for `hessian_names`)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(onnx_path), load_external_data=False)
    have = {o.name for o in m.graph.output}
    # Activations have the dtype of the logits (the model dtype): ONNX Runtime needs the type.
    elem = next(o.type.tensor_type.elem_type for o in m.graph.output if o.name == "logits")
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, elem, None))
    # Same dir as the rank graph: its external data references are relative to it.
    tmp = onnx_path.parent / f".calib-{os.getpid()}.onnx"
    onnx.save_model(m, str(tmp))
    del m
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)
    cache_type = {i.name: i.type for i in sess.get_inputs()}
    dt = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    stats = {n: _ActStats() for n in names}
    keep = max(1, AWQ_ROWS // max(1, len(windows)))
    for w in windows:
        feeds = {"input_ids": w[None], "position_ids": np.arange(len(w), dtype=np.int64)[None]}
        for name, t in cache_type.items():
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((1, spec.num_kv_heads, max_seq_len, spec.head_dim), dtype=dt[t])
        outs = sess.run(names, feeds)
        for n, x in zip(names, outs):
            stats[n].add(x, keep if n in awq_names else 0, n in hessian_names)
    return stats


# ---------------------------------------------------------------------------------------------
# Weight recipes: the grid of each mode and the calibration-based steps that decide it
# (algorithms in quant_algos.py)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    grid: str              # int8 (symmetric, per output channel) | int4 (affine, per group) | fp8
    awq: bool = False      # activation-aware input-channel scales, alpha searched
    clip: bool = False     # per-group range clipping, ratio searched on calibration rows
    gptq: bool = False     # GPTQ rounding with the layer's input Hessian
    weights: str = ""      # config.json description

    @property
    def calibrated(self) -> bool:      # fp8 also calibrates its activation scales
        return self.awq or self.clip or self.gptq or self.grid == "fp8"


_INT4 = "int4 affine (scale and float offset per group of input rows): int4 values in a blockwise " \
        "DequantizeLinear, the offset added back as (x summed per group) @ offset"
RECIPES = {
    "int8_wo": Recipe("int8", gptq=True,
                      weights="int8 symmetric, per-output-channel scales, GPTQ rounding"),
    "int8_awq": Recipe("int8", awq=True, gptq=True,
                       weights="int8 symmetric, per-output-channel scales, activation-aware input "
                               "scaling (AWQ), GPTQ rounding"),
    "int4_rtn": Recipe("int4", weights=_INT4 + "; round to nearest"),
    "int4_awq": Recipe("int4", awq=True, clip=True, gptq=True,
                       weights=_INT4 + "; activation-aware input scaling (AWQ), clipping search, GPTQ rounding"),
    "fp8": Recipe("fp8", gptq=True, weights="fp8 e4m3, per-output-channel scales, GPTQ rounding"),
}


def grid_of(algo: str, group_size: int) -> qa.Grid:
    kind = RECIPES[algo].grid
    if kind == "int8":
        return qa.Grid("int", -int(INT8_MAX), int(INT8_MAX), 0)
    if kind == "int4":
        return qa.Grid("int", 0, 15, group_size)
    return qa.Grid("fp8", 0, 0, 0)


def quantize_weight(w: np.ndarray, algo: str, grid: qa.Grid, st: _ActStats | None,
                    s: np.ndarray | None = None):
    """(stored values, scales [G, N], offsets [G, N] or None) of w [K, N] (already multiplied by
    the AWQ scales `s`, whose inverse the activation gets)."""
    r = RECIPES[algo]
    s = np.ones(w.shape[0], np.float32) if s is None else s
    clip = 1.0
    if r.clip:
        clip = qa.clip_search(w, np.concatenate(st.rows) / s, grid)
    if r.gptq:
        return qa.gptq(w, st.hessian / np.outer(s, s), grid, clip=None if not r.clip else clip)
    return qa.rtn(w, grid, clip)


def _int8_columns(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per column: (values int8 [.., C], scales [C])."""
    sc = np.maximum(np.abs(m).max(0), 1e-30) / INT8_MAX
    return np.clip(np.round(m / sc), -INT8_MAX, INT8_MAX).astype(np.int8), sc.astype(np.float32)


def _error_ratio(e: np.ndarray, c: np.ndarray, H: np.ndarray) -> float:
    """sqrt(tr((e-c)^T H (e-c)) / tr(e^T H e)): output error left after correcting e by c."""
    def energy(d):
        return float(np.einsum("kn,kn->", d, H @ d))
    return float(np.sqrt(energy(e - c) / max(energy(e), 1e-30)))


def qdq(algo: str, group_size: int):
    """[K, N] -> the weight as the graph will see it after round-to-nearest (for searches)."""
    grid = grid_of(algo, group_size)

    def f(w):
        q, sc, lo = qa.rtn(w, grid)
        return qa.dequantize(q, grid, sc, lo)
    return f


def quant_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """FP4 e2m1 values, FP8 e4m3 block scales [K/16, N], fp32 global scale (NVFP4 recipe)."""
    import ml_dtypes

    K, N = w.shape
    wb = w.reshape(K // NVFP4_BLOCK, NVFP4_BLOCK, N)
    block = np.maximum(np.abs(wb).max(1), 1e-12) / FP4_MAX                  # [K/16, N] float
    gscale = np.float32(max(float(block.max()), 1e-12) / FP8_MAX)
    s8 = (block / gscale).astype(ml_dtypes.float8_e4m3fn)
    s = np.maximum(s8.astype(np.float32) * gscale, 1e-12)
    q = (wb / s[:, None, :]).reshape(K, N).astype(ml_dtypes.float4_e2m1fn)
    return q, s8, gscale


# ---------------------------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantResult:
    onnx_path: Path
    model: object          # ModelProto without weights, for the io table
    report: dict           # config.json "quantization"


def quantize_rank_graph(src: Path, out: Path, spec: ModelSpec, q: QuantConfig, tokenizer_dir: Path,
                        max_seq_len: int) -> QuantResult:
    """Quantize `src` (rank graph + external data) into `out` (+ out.name + '.data').
    `out` may equal `src`: everything is read before anything is written."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    q = resolve_for_model(q, spec)
    model = onnx.load(str(src), load_external_data=False)
    tg = _find_targets(model)
    if q.algo != "none" and not tg.matmuls:
        raise TrtcInternalError("quantize: no MatMul with a constant weight in the rank graph")

    stats: dict[str, _ActStats] = {}
    kv_inputs = [n.input[1] for n in tg.scatters]
    if q.needs_calibration:
        names = []
        rows, hess = set(), set()
        r = RECIPES.get(q.algo)
        if r is not None and (r.calibrated or q.low_rank):
            names += list(tg.groups)
            if r.awq or r.clip:
                rows = set(tg.groups)
            if r.gptq or q.low_rank:
                hess = set(tg.groups)
        if q.kv_cache_dtype != "auto":
            names += kv_inputs
        windows = calibration_windows(tokenizer_dir, q, max_seq_len)
        info(f"[trtc]   calibration: {len(windows)} windows of {len(windows[0])} tokens, "
             f"{len(names)} tensors")
        stats = calibrate(src, list(dict.fromkeys(names)), rows, windows, spec, max_seq_len, hess)

    del model
    model = onnx.load(str(src), load_external_data=True)
    g = model.graph
    tg = _find_targets(model)          # node objects of the fully loaded model
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    fdtype = inits[tg.matmuls[0].input[1]].data_type if tg.matmuls else TensorProto.FLOAT
    np_f = helper.tensor_dtype_to_np_dtype(fdtype)
    before: dict[int, list] = {}       # id(node) -> nodes to insert before it
    after: dict[int, list] = {}        # id(node) -> nodes to insert after it
    new_inits = []
    drop = set()

    def const(name, arr):
        new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def insert(node, *nodes):
        before.setdefault(id(node), []).extend(nodes)

    awq_log = []
    outliers_log = []        # per activation: amax / amax of the channels left in the GEMM
    lr_log = []              # per linear: output error with / without the low-rank correction
    grid = grid_of(q.algo, q.group_size) if q.algo in RECIPES else None
    for x_name, nodes in (tg.groups.items() if q.algo != "none" else []):
        ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        st = stats.get(x_name)
        x_in = x_name
        s = None
        out_idx = None
        if q.algo in RECIPES and RECIPES[q.algo].awq:
            s, alpha, ratio = qa.awq_scales(np.concatenate(st.rows), st.abs_sum / st.count, ws,
                                            qdq(q.algo, q.group_size))
            awq_log.append((alpha, ratio))
            x_in = f"{x_name}_awq"
            insert(nodes[0], helper.make_node("Mul", [x_name, const(f"{x_name}_awq_inv_scale", (1.0 / s).astype(np_f))],
                                              [x_in], name=f"{x_name}_awq_mul"))
            ws = [w * s[:, None] for w in ws]
        x_lr, H_lr = x_in, None         # low-rank correction: float input (after AWQ) and its Hessian
        if q.low_rank:
            H_lr = st.hessian if s is None else st.hessian / np.outer(s, s)
            eig_lr = qa.hessian_eig(H_lr)
        if q.outlier_channels:
            # Outlier decomposition (LLM.int8()-style): the input channels with the largest
            # calibration amax (of the activation the MatMul sees) bypass the low-precision GEMM:
            # their weight rows are stored as exact zeros there and multiplied, in the model dtype,
            # by those channels in a small [.., n] @ [n, N] MatMul added to the GEMM's output.
            cam = st.camax if s is None else st.camax / s
            out_idx = np.sort(np.argsort(cam)[-q.outlier_channels:])
            keep = np.setdiff1d(np.arange(len(cam)), out_idx)
            x_out = f"{x_name}_outliers"
            insert(nodes[0], helper.make_node("Gather", [x_in, const(f"{x_name}_outlier_idx", out_idx.astype(np.int64))],
                                              [x_out], name=f"{x_name}_outlier_gather", axis=-1))
            outliers_log.append(float(cam.max() / max(cam[keep].max(), 1e-8)))
            st = st.channels(keep)
            s = None if s is None else s[keep]
        if q.algo == "fp8":
            x_q = x_name
            if out_idx is not None:    # the activation quantizer must not see the outliers (its scale)
                mask = np.ones(len(cam), np_f)
                mask[out_idx] = 0
                x_q = f"{x_name}_fp8_inliers"
                insert(nodes[0], helper.make_node("Mul", [x_name, const(f"{x_name}_inlier_mask", mask)], [x_q],
                                                  name=f"{x_name}_inlier_mul"))
            sa = np.array(max(st.amax, 1e-8) / FP8_MAX, dtype=np_f)
            sc = const(f"{x_name}_fp8_scale", sa)
            zp = f"{x_name}_fp8_zp"
            new_inits.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
            x_in = f"{x_name}_fp8_dq"
            insert(nodes[0],
                   helper.make_node("QuantizeLinear", [x_q, sc, zp], [f"{x_name}_fp8"], name=f"{x_name}_fp8_q"),
                   helper.make_node("DequantizeLinear", [f"{x_name}_fp8", sc], [x_in], name=f"{x_name}_fp8_dq"))
        group_sum = None                     # [.., K/G] sums of x_in per group (affine int4 offsets)
        for n, w in zip(nodes, ws):
            wname = n.input[1]
            base = f"{wname}_{q.algo}"
            extra = []       # nodes after the MatMul computing terms added to its output
            addends = []     # (their output names)
            if grid is not None:
                if out_idx is not None:        # outlier rows: float MatMul, exact zero rows in the GEMM
                    qk, sc, lo = quantize_weight(w[keep], q.algo, grid, st, s)
                    qv = np.zeros_like(w)
                    qv[keep] = qk
                    extra.append(helper.make_node("MatMul", [x_out, const(base + "_outlier_rows", w[out_idx].astype(np_f))],
                                                  [f"{base}_outl"], name=f"{base}_outlier_mm"))
                    addends.append(f"{base}_outl")
                    eff = w.copy()             # the weight the graph applies, as float
                    eff[keep] = qa.dequantize(qk, grid, sc, lo)
                else:
                    qv, sc, lo = quantize_weight(w, q.algo, grid, st, s)
                    eff = qa.dequantize(qv, grid, sc, lo)
                if q.low_rank:     # factors stored as int8 with a scale per column (a DequantizeLinear each)
                    fac = [_int8_columns(f) for f in qa.low_rank(w - eff, eig_lr, q.low_rank)]
                    (aq, asc), (bq, bsc) = fac
                    lr_log.append(_error_ratio(w - eff, (aq * asc) @ (bq * bsc), H_lr))
                    for t, (fq, fs), inp in (("a", fac[0], x_lr), ("b", fac[1], f"{base}_lr_a")):
                        qname = const(f"{base}_lowrank_{t}", fq)
                        extra += [helper.make_node("DequantizeLinear", [qname, const(f"{base}_lowrank_{t}_s", fs.astype(np_f))],
                                                   [f"{qname}_w"], name=f"{qname}_dq", axis=1),
                                  helper.make_node("MatMul", [inp, f"{qname}_w"], [f"{base}_lr_{t}" if t == "a" else f"{base}_lr"],
                                                   name=f"{qname}_mm")]
                    addends.append(f"{base}_lr")
                if grid.kind == "fp8":
                    qt = numpy_helper.from_array(qv.astype(ml_dtypes.float8_e4m3fn), base + "_q")
                elif grid.group == 0:
                    qt = numpy_helper.from_array(qv.astype(np.int8), base + "_q")
                else:
                    qt = numpy_helper.from_array((qv - 8).astype(ml_dtypes.int4), base + "_q")  # u - 8: -8..7
                if grid.group == 0:
                    deq = [helper.make_node("DequantizeLinear", [qt.name, const(base + "_s", sc.reshape(-1).astype(np_f))],
                                            [base + "_w"], name=base + "_dq", axis=1)]
                else:
                    deq = [helper.make_node("DequantizeLinear", [qt.name, const(base + "_s", sc.astype(np_f))],
                                            [base + "_w"], name=base + "_dq", axis=0, block_size=grid.group)]
                if lo is not None:
                    # w = s*u + lo = s*(u-8) + (lo + 8s):  x @ w = x @ DQ(u-8) + (x @ E) @ (lo + 8s)
                    if group_sum is None:
                        K = w.shape[0]
                        ind = np.kron(np.eye(K // grid.group, dtype=np_f), np.ones((grid.group, 1), dtype=np_f))
                        group_sum = f"{x_in}_groupsum"
                        insert(nodes[0], helper.make_node("MatMul", [x_in, const(f"{x_in}_group_ind", ind)],
                                                          [group_sum], name=f"{x_in}_groupsum"))
                    off = (lo + 8.0 * sc).astype(np_f)
                    extra.append(helper.make_node("MatMul", [group_sum, const(base + "_offset", off)],
                                                  [f"{base}_off"], name=f"{base}_offset_mm"))
                    addends.append(f"{base}_off")
            elif q.algo == "nvfp4":
                qv, s8, gs = quant_nvfp4(w)
                qt = numpy_helper.from_array(qv, base + "_q")
                s8t = numpy_helper.from_array(s8, base + "_s8")
                new_inits.append(s8t)
                deq = [helper.make_node("DequantizeLinear", [s8t.name, const(base + "_gs", np.array(gs, dtype=np_f))],
                                        [base + "_s"], name=base + "_sdq"),
                       helper.make_node("DequantizeLinear", [qt.name, base + "_s"], [base + "_w"],
                                        name=base + "_dq", axis=0, block_size=NVFP4_BLOCK)]
            else:
                raise TrtcInternalError(f"quantize: no weight rule for {q.algo}")
            if addends:      # y = (x @ W_q) + each term, the last Add writing the MatMul's old output
                acc, out_name = f"{n.output[0]}_{q.algo}_main", n.output[0]
                n.output[0] = acc
                for i, t in enumerate(addends):
                    nxt = out_name if i == len(addends) - 1 else f"{out_name}_{q.algo}_acc{i}"
                    extra.append(helper.make_node("Add", [acc, t], [nxt], name=f"{t}_add"))
                    acc = nxt
            new_inits.append(qt)
            insert(n, *deq)
            after.setdefault(id(n), []).extend(extra)
            uses[wname] -= 1
            if uses[wname] == 0:
                drop.add(wname)
            n.input[1] = base + "_w"
            n.input[0] = x_in

    kv_scales = {}
    if q.kv_cache_dtype != "auto":
        qmax, qtype = (FP8_MAX, TensorProto.FLOAT8E4M3FN) if q.kv_cache_dtype == "fp8" else (INT8_MAX, TensorProto.INT8)
        for n in tg.scatters:
            new = n.input[1]
            sv = max(stats[new].amax, 1e-8) / qmax
            kv_scales[n.output[0]] = sv
            base = f"{n.output[0]}_kv{q.kv_cache_dtype}"
            sc = const(base + "_s", np.array(sv, dtype=np_f))
            new_inits.append(helper.make_tensor(base + "_zp", qtype, [], [0]))
            insert(n, helper.make_node("QuantizeLinear", [new, sc, base + "_zp"], [base + "_q"], name=base + "_q"),
                   helper.make_node("DequantizeLinear", [base + "_q", sc], [base + "_dq"], name=base + "_dq"))
            n.input[1] = base + "_dq"

    nodes = []
    for n in g.node:
        nodes.extend(before.get(id(n), []))
        nodes.append(n)
        nodes.extend(after.get(id(n), []))
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)

    data = out.parent / (out.name + ".data")
    data.unlink(missing_ok=True)    # onnx appends to an existing data file; all is in memory now
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    # the proto now holds external references only (onnx moved the bytes out on save)
    slim = onnx.load(str(out), load_external_data=False)

    report = {
        "quant_algo": None if q.algo == "none" else q.algo,
        "kv_cache_quant_algo": None if q.kv_cache_dtype == "auto" else q.kv_cache_dtype,
        "config": q.to_dict(),
        "fingerprint": q.fingerprint(),
        "quantized_linears": len(tg.matmuls) if q.algo != "none" else 0,
        "excluded": dict(EXCLUDED) if q.algo != "none" else {},
    }
    if q.algo in RECIPES:
        report["weights"] = RECIPES[q.algo].weights
    if q.algo.startswith("int4"):
        report["group_size"] = q.group_size
    if q.algo == "fp8":
        report["activations"] = "fp8 e4m3, per-tensor scales from calibration amax"
        if q.outlier_channels:
            report["activations"] += (
                f"; per linear, the {q.outlier_channels} input channels with the largest calibration amax "
                "skip the quantizer (zeroed before it)")
    elif q.algo == "nvfp4":
        report["weights"] = "fp4 e2m1, blocks of 16 with fp8 e4m3 scales and an fp32 global scale"
        report["activations"] = "model dtype (weight-only: dynamic FP4 activation quantization has no standard ONNX op)"
    if q.outlier_channels:
        report["outlier_channels"] = {
            "per_linear": q.outlier_channels,
            "what": "per linear, the input channels with the largest calibration amax: their weight rows are "
                    "exact zeros in the quantized weight and kept in the model dtype in a small extra MatMul",
            "why": OUTLIER_WHY[RECIPES[q.algo].grid],
            "amax_ratio_mean": round(float(np.mean(outliers_log)), 2) if outliers_log else None}
    if q.low_rank:
        report["low_rank"] = {
            "rank": q.low_rank,
            "what": "per linear, a correction (x @ A) @ B, A [K, r], B [r, N] stored as int8 with a scale per "
                    "column, added to the quantized MatMul: the best rank-r approximation of its rounding error "
                    "for the calibration activations (SVD in the metric of E[x^T x])",
            "why": LOW_RANK_WHY,
            "calib_error_ratio_mean": round(float(np.mean(lr_log)), 4) if lr_log else None}
        if lr_log:
            info(f"[trtc]   low rank {q.low_rank}: calibration output error x{np.mean(lr_log):.3f} of the "
                 f"rounding error alone (mean over {len(lr_log)} linears)")
    if awq_log:
        alphas = [a for a, _ in awq_log]
        ratios = [r for _, r in awq_log]
        report["awq"] = {"groups": len(awq_log), "alpha_mean": round(float(np.mean(alphas)), 3),
                         "calib_loss_vs_rtn_mean": round(float(np.mean(ratios)), 4)}
        info(f"[trtc]   awq: {len(awq_log)} groups, mean alpha {np.mean(alphas):.2f}, "
             f"calibration loss vs RTN {np.mean(ratios):.3f}")
    if kv_scales:
        report["kv_cache"] = {
            "values": f"{q.kv_cache_dtype}, one calibrated scale per layer and K/V",
            "storage_dtype": helper.tensor_dtype_to_np_dtype(fdtype).name,
            "why_not_8bit_storage": "TensorRT-RTX 1.7 IKVCacheUpdateLayer (TensorScatter) rejects 8-bit "
                                    "caches: 'cache has type Int8 but must have type Float, Half, or BFloat16'",
        }
    if q.needs_calibration:
        report["calibration"] = {"source": q.calib_source, "sha256": q.calib_sha256,
                                 "samples": q.calib_samples, "seq_len": q.calib_seq_len}
    return QuantResult(onnx_path=out, model=slim, report=report)
