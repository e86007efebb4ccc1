"""`trtc inspect`: say what an engine dir or export dir is, from its config alone (no GPU, no
TensorRT needed), and optionally verify every file's checksum."""

from __future__ import annotations

from pathlib import Path

from trtc import artifact as art
from trtc.artifact import EngineConfig
from trtc.typed_json import to_json

_MODEL_FIELDS = ("family", "architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "rope_type", "sliding_window")


def describe(path: Path, verify: bool = False) -> dict:
    cfg = art.read_dir_config(path)
    engine = isinstance(cfg, EngineConfig)
    kind = "engine dir" if engine else "export dir"
    ranks = _ranks(Path(path), cfg, kind)
    if verify:
        art.verify_files(path, cfg.files, rebuild_hint=f"rebuild the {kind}",
                         config_name=art.ENGINE_CONFIG if engine else art.EXPORT_CONFIG)
        _verify_dir(path, cfg, kind)
    spec = cfg.pretrained_config
    if isinstance(cfg, EngineConfig):
        b = cfg.build_config
        limits = {"max_batch_size": b.max_batch_size, "max_input_len": b.max_input_len, "max_seq_len": b.max_seq_len}
    else:
        limits = {"max_seq_len": cfg.export_config.max_seq_len}
    sizes = {n: e.size for n, e in cfg.files.items()}
    return {
        "path": str(path), "kind": kind, "format_version": cfg.format_version, "trtc_version": cfg.trtc_version,
        "fingerprint": cfg.fingerprint if isinstance(cfg, EngineConfig) else None,
        "model": {k: getattr(spec, k) for k in _MODEL_FIELDS},
        "dtype": cfg.export_config.dtype,
        "quantization": cfg.quantization,
        "attention": cfg.export_config.attention,
        "tensorrt": to_json(cfg.tensorrt) if isinstance(cfg, EngineConfig) else None,
        "mapping": to_json(cfg.mapping),
        "ranks": ranks,
        "engines": [{**to_json(e), "size": sizes.get(e.file)} for e in cfg.engines]
        if isinstance(cfg, EngineConfig) else [],
        "limits": limits,
        "source": to_json(cfg.source),
        "files": sizes,
        "verified": verify,
    }


def _ranks(path: Path, cfg, kind: str) -> list[dict]:
    """Per rank: its engine and graph files with their sizes. Cheap checks without --verify: every
    rank file is there, (tensor-parallel dirs) each rank graph carries this build's stamp and its own
    rank, and every rank file has its listed size."""
    from trtc.errors import TrtcError

    per_rank = []
    for r in cfg.mapping.ranks:
        files = [e.file for e in cfg.engines if e.rank == r] if isinstance(cfg, EngineConfig) else []
        g = cfg.rank_graph(r)
        files += [g.file, g.data] if g is not None else []
        for n in files:
            if not (path / n).is_file():
                raise TrtcError(f"{path / n} (rank {r} of {cfg.mapping.world_size}) is missing; rebuild the {kind}")
        per_rank.append(files)
    if cfg.mapping.world_size > 1 and cfg.rank_graph(0) is not None:
        art.check_rank_stamps(path, cfg, f"rebuild the {kind}")
    out = []
    for r, files in enumerate(per_rank):
        for n in files:
            entry, size = cfg.files.get(n), (path / n).stat().st_size
            if entry is not None and size != entry.size:
                raise TrtcError(f"{path / n} is {size} bytes, but the {kind}'s config lists {entry.size} for rank {r}: "
                                f"a rank file of another build, or damaged; rebuild the {kind}")
        out.append({"rank": r, "files": {n: cfg.files[n].size if n in cfg.files else None for n in files},
                    "size": sum(cfg.files[n].size for n in files if n in cfg.files)})
    return out


def _verify_dir(path: Path, cfg, kind: str) -> None:
    """Beyond config.json's table: no unlisted files, and every subject of the provenance statement
    (config.json included) matches its digest."""
    import json

    from trtc.errors import TrtcError

    config_name = art.ENGINE_CONFIG if isinstance(cfg, EngineConfig) else art.EXPORT_CONFIG
    known = {config_name, art.PROVENANCE, *cfg.files}
    extra = sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in known)
    if extra:
        raise TrtcError(f"{path / extra[0]} is not listed in {config_name} (added after the build?); "
                        f"remove it or rebuild the {kind}")
    prov = path / art.PROVENANCE
    if not prov.is_file():
        if isinstance(cfg, EngineConfig):
            raise TrtcError(f"{path} has no {art.PROVENANCE}; rebuild the {kind} with this trtc")
        return
    try:
        subjects = {s["name"]: s["digest"]["sha256"] for s in json.loads(prov.read_text())["subject"]}
    except (ValueError, KeyError, TypeError) as e:
        raise TrtcError(f"{prov} is not an in-toto statement trtc wrote ({e}); rebuild the {kind}") from e
    on_disk = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != art.PROVENANCE)
    missing = sorted(set(on_disk) ^ set(subjects))
    if missing:
        raise TrtcError(f"{prov} and the dir disagree about {missing[0]}; rebuild the {kind}")
    for name, digest in subjects.items():
        if art.sha256_file(path / name) != digest:
            raise TrtcError(f"{path / name} does not match its digest in {art.PROVENANCE} (modified after "
                            f"the build); rebuild the {kind}")


def format_text(d: dict) -> str:
    m = d["model"]
    mp = d["mapping"]
    lines = [
        f"{d['path']}: trtc {d['kind']} (format {d['format_version']}, trtc {d['trtc_version']}"
        + (f", fingerprint {d['fingerprint']})" if d["fingerprint"] else ")"),
        f"  model      {m['architecture']} ({m['family']}): {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"heads {m['num_heads']}/{m['num_kv_heads']} kv, head_dim {m['head_dim']}, vocab {m['vocab_size']}, "
        f"rope {m['rope_type']}" + (f", sliding window {m['sliding_window']}" if m.get("sliding_window") else ""),
        f"  dtype      {d['dtype']}",
        f"  quant      {d['quantization']}",
        f"  attention  {d['attention']}",
        f"  limits     " + ", ".join(f"{k} {v}" for k, v in d["limits"].items()),
        f"  mapping    world size {mp['world_size']} (tp {mp['tp_size']}, pp {mp['pp_size']})",
    ]
    if d["tensorrt"]:
        t = d["tensorrt"]
        lines.append(f"  tensorrt   {t['flavour']} {t['version']}, targets {', '.join(t['targets'])}")
    for e in d["engines"]:
        size = f"{e['size'] / 2**20:.1f} MiB" if e["size"] is not None else "size unknown"
        lines.append(f"  engine     rank {e['rank']}: {e['file']} ({size}), targets {', '.join(e['targets'])}")
    if mp["world_size"] > 1:
        for rk in d["ranks"]:
            lines.append(f"  rank {rk['rank']:<5} {rk['size'] / 2**20:.1f} MiB: " + ", ".join(rk["files"]))
    src = d["source"]
    lines.append(f"  source     {src.get('model')} (weights sha256 {str(src.get('weights_sha256'))[:16]}...)")
    for n, size in d["files"].items():
        lines.append(f"  file       {n} ({size / 2**20:.1f} MiB)")
    lines.append("  checksums  " + ("all files verified" if d["verified"] else "not checked (use --verify)"))
    return "\n".join(lines)
