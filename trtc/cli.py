"""`trtc` command line: build, export, run.

User errors (TrtcError) print one line `trtc: error: ...` and exit with code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from trtc.errors import TrtcError

DTYPE_CHOICES = click.Choice(["auto", "float16", "bfloat16", "float32"])


def _fail(msg: str) -> None:
    click.echo(f"trtc: error: {msg}", err=True)
    sys.exit(2)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrtcError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trtc")
def main() -> None:
    """Compile Hugging Face causal LMs into TensorRT engine dirs and run them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _model_option(f):
    return click.option("--model", "-m", default=None, metavar="M",
                        help="HF model dir, .gguf file, bundled model name or trtc export dir "
                             "(default: the bundled SmolLM2-135M-Instruct).")(f)


def _print_times(times) -> None:
    from trtc.log import info

    info("[trtc] stage      wall s   peak RSS MiB")
    for name, dt, rss in times.rows:
        info(f"[trtc] {name:<10} {dt:7.1f}   {rss:8.0f}")


@main.command()
@_model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Engine dir to write (default: engines/<model name>).")
@click.option("--dtype", type=DTYPE_CHOICES, default="auto", show_default=True)
@click.option("--max-batch-size", type=int, default=8, show_default=True)
@click.option("--max-input-len", type=int, default=None, help="Longest prompt [default: min(1024, max-seq-len)].")
@click.option("--max-seq-len", type=int, default=None, help="Prompt + generated tokens [default: min(2048, model max)].")
@click.option("--target", default=None, metavar="sm_89,sm_120",
              help="Compute capabilities to build for [default: per TensorRT flavour].")
@click.option("--flavour", type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]), default="auto", show_default=True,
              help="TensorRT flavour: full TensorRT (datacenter) or TensorRT-RTX; auto prefers full TensorRT.")
@click.option("--keep-onnx", is_flag=True, help="Keep the rank ONNX graphs in the engine dir (for --backend onnxruntime).")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Write the graph structure after this pass to <output>.dump/ (repeatable; large weights are not copied).")
def build(model, output, dtype, max_batch_size, max_input_len, max_seq_len, target, flavour, keep_onnx, dump_after):
    """Build a TensorRT engine dir from a model."""
    from trtc.compiler.backend import parse_targets, resolve_flavour
    from trtc.compiler.pipeline import build_model, default_output

    fl = resolve_flavour(flavour)
    targets = parse_targets(target, fl)
    out = output or default_output(model)
    path, times = build_model(model, out, fl, targets, dtype=dtype, max_batch_size=max_batch_size,
                              max_input_len=max_input_len, max_seq_len=max_seq_len, keep_onnx=keep_onnx,
                              dump_after=tuple(dump_after))
    _print_times(times)
    click.echo(str(path))


@main.command()
@_model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Export dir to write.")
@click.option("--dtype", type=DTYPE_CHOICES, default="auto", show_default=True)
@click.option("--max-seq-len", type=int, default=None, help="KV cache length [default: min(2048, model max)].")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Write the graph structure after this pass to <output>.dump/ (repeatable; large weights are not copied).")
def export(model, output, dtype, max_seq_len, dump_after):
    """Export a model to ONNX rank graphs (no TensorRT); `trtc build --model DIR` takes the dir."""
    from trtc.compiler.pipeline import export_model

    path, times = export_model(model, output, dtype=dtype, max_seq_len=max_seq_len, dump_after=tuple(dump_after))
    _print_times(times)
    click.echo(str(path))


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", "prompts", multiple=True, help="Prompt text (repeatable: one batch).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt per line.")
def run(engine_dir, prompts, max_new_tokens, temperature, top_k, top_p, seed, chat, backend, as_json):
    """Generate text from an engine dir."""
    from trtc.runtime.api import LLM

    prompts = list(prompts)
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise TrtcError("no prompt: pass --prompt TEXT (repeatable) or pipe prompts, one per line")
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            raise TrtcError("no prompt: stdin was empty; pass --prompt TEXT")
    llm = LLM(engine_dir, backend=backend)
    stream = len(prompts) == 1 and not as_json

    def on_text(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    results = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, chat=chat, on_text=on_text if stream else None)
    if stream:
        sys.stdout.write("\n")
        return
    for r in results:
        if as_json:
            click.echo(json.dumps({"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids}))
        else:
            click.echo(f"### {r.prompt}\n{r.text}\n")


if __name__ == "__main__":
    main()
