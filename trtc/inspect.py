"""`trtc inspect`: say what an engine dir or export dir is, from its config alone (no GPU, no
TensorRT needed), and optionally verify every file's checksum."""

from __future__ import annotations

from pathlib import Path

from trtc.compiler.package import ENGINE_CONFIG, EXPORT_CONFIG, read_json, verify_files
from trtc.errors import TrtcError


def describe(path: Path, verify: bool = False) -> dict:
    if (path / ENGINE_CONFIG).is_file():
        kind, cfg = "engine dir", read_json(path / ENGINE_CONFIG, "engine dir")
    elif (path / EXPORT_CONFIG).is_file():
        kind, cfg = "export dir", read_json(path / EXPORT_CONFIG, "export dir")
    else:
        raise TrtcError(f"{path} has neither {ENGINE_CONFIG} (engine dir) nor {EXPORT_CONFIG} (export dir); "
                        f"pass a dir written by trtc build or trtc export")
    if verify:
        verify_files(path, cfg["files"], rebuild_hint=f"rebuild the {kind}")
    spec = cfg["pretrained_config"]
    out = {
        "path": str(path), "kind": kind, "trtc_version": cfg.get("trtc_version"),
        "fingerprint": cfg.get("fingerprint"),
        "model": {k: spec.get(k) for k in ("family", "architecture", "num_layers", "hidden_size", "num_heads",
                                           "num_kv_heads", "head_dim", "vocab_size", "rope_type", "sliding_window")},
        "dtype": spec.get("dtype") or cfg.get("export_config", {}).get("dtype"),
        "quantization": cfg.get("quantization"),
        "attention": cfg.get("attention", cfg.get("export_config", {}).get("attention", "native")),
        "tensorrt": cfg.get("tensorrt"),
        "limits": {k: cfg["build_config"][k] for k in ("max_batch_size", "max_input_len", "max_seq_len")}
        if "build_config" in cfg else {"max_seq_len": cfg["export_config"]["max_seq_len"]},
        "source": cfg.get("source"),
        "files": {n: e["size"] for n, e in cfg["files"].items()},
        "verified": verify,
    }
    return out


def format_text(d: dict) -> str:
    m = d["model"]
    lines = [
        f"{d['path']}: trtc {d['kind']} (trtc {d['trtc_version']}, fingerprint {d['fingerprint']})",
        f"  model      {m['architecture']} ({m['family']}): {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"heads {m['num_heads']}/{m['num_kv_heads']} kv, head_dim {m['head_dim']}, vocab {m['vocab_size']}, "
        f"rope {m['rope_type']}" + (f", sliding window {m['sliding_window']}" if m.get("sliding_window") else ""),
        f"  dtype      {d['dtype']}",
        f"  quant      {d['quantization']}",
        f"  attention  {d['attention']}",
        f"  limits     " + ", ".join(f"{k} {v}" for k, v in d["limits"].items()),
    ]
    if d["tensorrt"]:
        t = d["tensorrt"]
        lines.append(f"  tensorrt   {t['flavour']} {t['version']}, targets {', '.join(t['targets'])}")
    if d["source"]:
        lines.append(f"  source     {d['source'].get('model')} (weights sha256 {str(d['source'].get('weights_sha256'))[:16]}...)")
    for n, size in d["files"].items():
        lines.append(f"  file       {n} ({size / 2**20:.1f} MiB)")
    lines.append("  checksums  " + ("all files verified" if d["verified"] else "not checked (use --verify)"))
    return "\n".join(lines)
