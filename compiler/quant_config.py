"""`--quant` configuration and target policy: which options are valid, their per-mode defaults,
which compute capabilities can run a mode, and the per-model adjustments (group size, low rank).

Everything here runs before any expensive work, so a bad option fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from trtc.bundled import CALIB_TEXT, data_file
from trtc.errors import TrtcError
from trtc.flavour import Flavour, sm_number
from trtc.log import info
from trtc.spec import ModelSpec, fingerprint_of

from .quant_recipes import RECIPES

ALGOS = ("none", "fp8", "int8_wo", "int8_awq", "int4_awq", "int4_rtn", "nvfp4")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
BUNDLED_CALIB = CALIB_TEXT      # Python docs topics (pydoc_data, CPython 3.11) except those in eval.txt
DEFAULT_CALIB_SAMPLES = 128     # windows of 128 tokens: 16k tokens (GPTQ's Hessians need them)
DEFAULT_GROUP_SIZE = 128
# Per mode, the input channels per linear whose weight rows stay in the model dtype (outlier
# decomposition, quant_rewrite.py); only modes whose grid stores an exact zero can take it.
# int8_awq: 0 - AWQ's scaling already protects the salient channels (SmolLM2: 98.82% top-1 without,
# 98.77% with 16; bench/RESULTS-quant.md).
DEFAULT_OUTLIER_CHANNELS = {"fp8": 16, "int8_wo": 16, "int8_awq": 0}
# Per mode, the rank of the correction (x @ A) @ B added to each quantized linear: the best
# rank-r approximation of the rounding error for the calibration activations (quant_algos.low_rank).
# int4_awq: 64 (SmolLM2 g64: 87.2% -> 90.4% top-1 agreement, engine 220 -> 246 MB). A default
# that is not well under a quarter of the smallest layer input (tiny models) becomes an eighth of it.
DEFAULT_LOW_RANK: dict[str, int] = {"int4_awq": 64}


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


# --- target policy ------------------------------------------------------------------------------

def _min_sm(q: QuantConfig, flavour: Flavour) -> tuple[int, str] | None:
    """(minimum compute capability, the option that needs it) for `q` on `flavour`, or None.
    The weight format's need is the larger one where both options set one (FP4 > FP8)."""
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


def _alternative(what: str, bad: list[str], flavour: Flavour) -> str:
    """An option of the same kind that every target in `bad` can run."""
    if what == "--quant nvfp4":
        return ("--quant fp8 or int4_awq" if all(sm_number(t) >= flavour.fp8_min_sm for t in bad)
                else "--quant int4_awq")
    return {"--quant fp8": "--quant int8_wo", "--kv-cache-dtype fp8": "--kv-cache-dtype int8"}[what]


def check_targets(q: QuantConfig | None, flavour: Flavour, targets: tuple[str, ...]) -> None:
    """Before any work: every target must run the precision `q` stores (FP8 from sm_89, FP4 from
    sm_120 on TensorRT-RTX / sm_100 on TensorRT; TensorRT's build fails otherwise, late and
    obscurely). TrtcError names the option, the targets too old for it and two fixes."""
    need = None if q is None else _min_sm(q, flavour)
    if need is None:
        return
    min_sm, what = need
    bad = [t for t in targets if sm_number(t) < min_sm]
    if not bad:
        return
    ok = [t for t in targets if sm_number(t) >= min_sm] or [t for t in flavour.targets if sm_number(t) >= min_sm]
    where = f"--target {','.join(ok)}" if ok else f"a flavour with sm_{min_sm}+ targets"
    raise TrtcError(f"{what} needs compute capability {min_sm // 10}.{min_sm % 10}+ on {flavour.name}, "
                    f"but target {', '.join(bad)} is older; build for {where}, or use "
                    f"{_alternative(what, bad, flavour)}")


# --- per-model adjustments ----------------------------------------------------------------------

def _in_features(spec: ModelSpec) -> dict[str, int]:
    return {"hidden size": spec.hidden_size, "attention output size": spec.num_heads * spec.head_dim,
            "intermediate size": spec.intermediate_size}


def resolve_for_model(q: QuantConfig, spec: ModelSpec) -> QuantConfig:
    """Check --outlier-channels, --low-rank and the group size against every linear layer's input
    size. Defaults the model is too small for shrink (group size: the largest power of two that
    divides all inputs, e.g. 64 for hidden size 576; low rank: an eighth of the smallest input);
    a value the user named is never changed."""
    if spec.num_experts and q.algo != "none":
        raise TrtcError(f"--quant {q.algo}: the {spec.num_experts} experts per layer of this {spec.family} model are "
                        f"batched MatMuls over grouped weights [experts, in, out], which trtc's quantizer does not "
                        f"handle yet (it finds [in, out] linear layers); build without --quant "
                        f"(--kv-cache-dtype alone works)")
    feats = _in_features(spec)
    smallest_name, smallest = min(feats.items(), key=lambda kv: kv[1])
    if q.outlier_channels >= smallest // 2:
        raise TrtcError(f"--outlier-channels {q.outlier_channels} is too many for the {smallest_name} {smallest} "
                        f"of this model: keep it well under half of it (default "
                        f"{DEFAULT_OUTLIER_CHANNELS[q.algo]}, 0 for none)")
    if q.low_rank >= smallest // 4:
        if q.low_rank_explicit:
            raise TrtcError(f"--low-rank {q.low_rank} is too large for the {smallest_name} {smallest} of this "
                            f"model: keep it well under a quarter of it (default {DEFAULT_LOW_RANK.get(q.algo, 0)}, "
                            f"0 for none)")
        info(f"[trtc] --quant {q.algo}: default low rank {q.low_rank} is too large for the {smallest_name} "
             f"{smallest}; using {smallest // 8}")
        q = dataclasses.replace(q, low_rank=smallest // 8)
    if not q.algo.startswith("int4"):
        return q
    bad = {k: v for k, v in feats.items() if v % q.group_size}
    if not bad:
        return q
    g = q.group_size
    while g > 1 and any(v % g for v in feats.values()):
        g //= 2
    name, val = next(iter(bad.items()))
    if q.group_size_explicit or g < 16:
        raise TrtcError(f"--group-size {q.group_size} does not divide the {name} {val} of this model; "
                        f"use a divisor of {', '.join(str(v) for v in feats.values())}, e.g. {g}")
    info(f"[trtc] --quant {q.algo}: group size {q.group_size} does not divide the {name} {val}; using {g}")
    return dataclasses.replace(q, group_size=g)
