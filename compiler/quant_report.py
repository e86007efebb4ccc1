"""The `quantization` record of config.json: what was quantized, how, why, and what calibration
measured while doing it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trtc.log import info

from .quant_config import QuantConfig
from .quant_recipes import RECIPES

EXCLUDED = {
    "lm_head": "kept in the model dtype: the logits' precision decides the next token, and the "
               "layer is tied to the token embedding in many models",
    "embedding": "a Gather, not a MatMul: nothing to gain in compute, kept in the model dtype",
}
OUTLIER_WHY = {
    "fp8": "FP8 e4m3 keeps 3 mantissa bits whatever the scale: rounding the few large-magnitude activation "
           "channels costs more accuracy than all the others (bench/RESULTS-quant.md)",
    "int8": "the weight rows of the largest activation channels carry most of the rounding error's effect "
            "on the output (AWQ's salient channels; bench/RESULTS-quant.md)",
}
LOW_RANK_WHY = ("the rounding error of a quantized weight is not white in the metric of the layer's "
                "inputs: a few directions of the activations carry most of its effect on the output, and "
                "a rank-r correction removes exactly those (bench/RESULTS-quant.md)")
KV_WHY_NOT_8BIT = ("TensorRT-RTX 1.7 IKVCacheUpdateLayer (TensorScatter) rejects 8-bit "
                   "caches: 'cache has type Int8 but must have type Float, Half, or BFloat16'")


@dataclass
class QuantLog:
    """What the rewrite measured, for the report."""
    linears: int = 0                                   # quantized MatMuls
    awq: list = field(default_factory=list)            # per activation: (alpha, calib loss / RTN's)
    outliers: list = field(default_factory=list)       # per activation: amax / amax of the channels left in the GEMM
    low_rank: list = field(default_factory=list)       # per linear: output error with / without the correction
    kv_scales: dict = field(default_factory=dict)      # cache output name -> scale
    storage_dtype: str = "float32"                     # numpy name of the model dtype


def _mean(xs: list, digits: int) -> float | None:
    return round(float(np.mean(xs)), digits) if xs else None


def _activations(q: QuantConfig) -> str | None:
    if q.algo == "nvfp4":
        return "model dtype (weight-only: dynamic FP4 activation quantization has no standard ONNX op)"
    if q.algo != "fp8":
        return None
    text = "fp8 e4m3, per-tensor scales from calibration amax"
    if q.outlier_channels:
        text += (f"; per linear, the {q.outlier_channels} input channels with the largest calibration amax "
                 "skip the quantizer (zeroed before it)")
    return text


def quant_report(q: QuantConfig, log: QuantLog) -> dict:
    """config.json `quantization` (also logs the calibration-side measurements)."""
    report = {
        "quant_algo": None if q.algo == "none" else q.algo,
        "kv_cache_quant_algo": None if q.kv_cache_dtype == "auto" else q.kv_cache_dtype,
        "config": q.to_dict(),
        "fingerprint": q.fingerprint(),
        "quantized_linears": log.linears if q.algo != "none" else 0,
        "excluded": dict(EXCLUDED) if q.algo != "none" else {},
    }
    if q.algo in RECIPES:
        report["weights"] = RECIPES[q.algo].weights
    if q.algo.startswith("int4"):
        report["group_size"] = q.group_size
    if q.algo == "nvfp4":
        report["weights"] = "fp4 e2m1, blocks of 16 with fp8 e4m3 scales and an fp32 global scale"
    if _activations(q) is not None:
        report["activations"] = _activations(q)
    if q.outlier_channels:
        report["outlier_channels"] = {
            "per_linear": q.outlier_channels,
            "what": "per linear, the input channels with the largest calibration amax: their weight rows are "
                    "exact zeros in the quantized weight and kept in the model dtype in a small extra MatMul",
            "why": OUTLIER_WHY[RECIPES[q.algo].grid],
            "amax_ratio_mean": _mean(log.outliers, 2)}
    if q.low_rank:
        report["low_rank"] = {
            "rank": q.low_rank,
            "what": "per linear, a correction (x @ A) @ B, A [K, r], B [r, N] stored as int8 with a scale per "
                    "column, added to the quantized MatMul: the best rank-r approximation of its rounding error "
                    "for the calibration activations (SVD in the metric of E[x^T x])",
            "why": LOW_RANK_WHY,
            "calib_error_ratio_mean": _mean(log.low_rank, 4)}
        if log.low_rank:
            info(f"[trtc]   low rank {q.low_rank}: calibration output error x{np.mean(log.low_rank):.3f} of the "
                 f"rounding error alone (mean over {len(log.low_rank)} linears)")
    if log.awq:
        alphas = [a for a, _ in log.awq]
        ratios = [r for _, r in log.awq]
        report["awq"] = {"groups": len(log.awq), "alpha_mean": _mean(alphas, 3),
                         "calib_loss_vs_rtn_mean": _mean(ratios, 4)}
        info(f"[trtc]   awq: {len(log.awq)} groups, mean alpha {np.mean(alphas):.2f}, "
             f"calibration loss vs RTN {np.mean(ratios):.3f}")
    if log.kv_scales:
        report["kv_cache"] = {
            "values": f"{q.kv_cache_dtype}, one calibrated scale per layer and K/V",
            "storage_dtype": log.storage_dtype,
            "why_not_8bit_storage": KV_WHY_NOT_8BIT,
        }
    if q.needs_calibration:
        report["calibration"] = {"source": q.calib_source, "sha256": q.calib_sha256,
                                 "samples": q.calib_samples, "seq_len": q.calib_seq_len}
    return report
