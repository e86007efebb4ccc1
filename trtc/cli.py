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


def _terminate(signum, frame) -> None:
    """SIGTERM (a CI runner cancelling the job) unwinds like Ctrl-C: temp and work dirs are removed."""
    raise KeyboardInterrupt


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trtc")
@click.option("--verbose", "-v", is_flag=True, help="Let third-party warnings and log lines through.")
def main(verbose: bool) -> None:
    """Compile Hugging Face causal LMs into TensorRT engine dirs and run them."""
    import signal

    from trtc.log import quiet_third_party

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_third_party(verbose)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def _model_option(f):
    return click.option("--model", "-m", default=None, metavar="M",
                        help="HF model dir, .gguf file, bundled model name or trtc export dir "
                             "(default: the bundled SmolLM2-135M-Instruct).")(f)


def _quant_options(f):
    """--quant and friends, shared by build and export (compiler/quantize.py)."""
    from trtc.compiler.quantize import ALGOS, KV_CACHE_DTYPES

    opts = [
        click.option("--quant", type=click.Choice(ALGOS), default="none", show_default=True,
                     help="Weight (and activation) quantization: fp8 (sm_89+), int8_wo, int8_awq, int4_awq, "
                          "int4_rtn (plain round-to-nearest), nvfp4 (sm_120, FP4 weights)."),
        click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True,
                     help="KV cache values rounded to 8 bits with calibrated scales (storage stays in the "
                          "model dtype: TensorRT-RTX 1.7 rejects 8-bit caches)."),
        click.option("--calib-data", default=None, metavar="FILE",
                     help="Calibration text (UTF-8) [default: bundled trtc/data/calib.txt]."),
        click.option("--calib-samples", type=int, default=None, help="Calibration windows of 128 tokens, spread over the text [default: 128]."),
        click.option("--group-size", type=int, default=None,
                     help="int4: input rows per scale [default: 128, or the largest power of two dividing the layer sizes]."),
        click.option("--outlier-channels", type=int, default=None,
                     help="fp8, int8_wo, int8_awq: per linear, input channels with the largest calibration amax kept in "
                          "the model dtype (a small extra MatMul); 0 for none [default: 16, int8_awq 0]."),
        click.option("--low-rank", type=int, default=None, metavar="R",
                     help="Per quantized linear, a rank-R correction (x @ A) @ B of its rounding error (int8 factors), "
                          "fitted to the calibration activations; 0 for none [default: per mode, see README]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _attention_options(f):
    """--attention and --kv-block-size, shared by build and export (compiler/passes/plugin_attention.py)."""
    f = click.option("--kv-block-size", type=click.Choice(["16", "32", "64"]), default=None,
                     help="Tokens per KV block with --attention plugin [default: 16].")(f)
    return click.option("--attention", type=click.Choice(["native", "plugin"]), default=None,
                        help="native: ONNX Attention/RotaryEmbedding/KV-cache-update ops (TensorRT's own layers); "
                             "plugin: trtc's RopeKvAppend/PagedAttention plugins with a paged KV cache (full "
                             "TensorRT only) [default: native, or the export dir's].")(f)


def _quant_config(quant, kv_cache_dtype, calib_data, calib_samples, group_size, outlier_channels, low_rank):
    from trtc.compiler.quantize import make_quant_config

    return make_quant_config(quant, kv_cache_dtype, calib_data, calib_samples, group_size, outlier_channels,
                             low_rank)


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
@click.option("--tp-size", type=click.IntRange(min=1), default=None,
              help="Tensor-parallel ranks: one engine per rank, each with its shard of the weights and the "
                   "all-reduces inside [default: 1, or the export dir's].")
@click.option("--target", default=None, metavar="sm_89,sm_120",
              help="Compute capabilities to build for [default: per TensorRT flavour].")
@click.option("--flavour", type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]), default="auto", show_default=True,
              help="TensorRT flavour: full TensorRT (datacenter) or TensorRT-RTX; auto prefers full TensorRT.")
@click.option("--keep-onnx", is_flag=True, help="Keep the rank ONNX graphs in the engine dir (for --backend onnxruntime).")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Write the graph structure after this pass to <output>.dump/ (repeatable; large weights are not copied).")
@click.option("--engine-per-target", is_flag=True,
              help="One engine per --target instead of one holding all targets' kernels (full TensorRT: always).")
@click.option("--no-cache", is_flag=True,
              help="Build even if the engine cache ($TRTC_CACHE_DIR/engines) holds this fingerprint, and do not store it.")
@click.option("--check-reproducible", is_flag=True,
              help="Build twice (no cache) and fail unless every file of the two engine dirs is byte-identical.")
@click.option("--config", "recipe", type=click.Path(path_type=Path), default=None, metavar="RECIPE",
              help="Build the jobs of a recipe (configs/*.toml; `trtc matrix RECIPE` lists them) instead of "
                   "options given here.")
@click.option("--job", "job_name", default=None, metavar="NAME", help="With --config: build only this job.")
@_quant_options
@_attention_options
def build(model, output, dtype, max_batch_size, max_input_len, max_seq_len, target, flavour, keep_onnx, dump_after,
          engine_per_target, no_cache, check_reproducible, attention, kv_block_size,
          quant, kv_cache_dtype, calib_data, calib_samples, group_size, outlier_channels, low_rank,
          tp_size, recipe, job_name):
    """Build a TensorRT engine dir from a model."""
    if recipe is not None or job_name is not None:   # a recipe's jobs, each through build_job as below
        from trtc.recipes import jobs_to_build

        jobs, run = jobs_to_build(click.get_current_context())
        for j in jobs:
            click.echo(str(build_job(j.build_options(), job=j.provenance(), **run)))
        return
    opts = dict(model=model, output=output, dtype=dtype, max_batch_size=max_batch_size, max_input_len=max_input_len,
                max_seq_len=max_seq_len, target=target, flavour=flavour, keep_onnx=keep_onnx, dump_after=dump_after,
                engine_per_target=engine_per_target, attention=attention, kv_block_size=kv_block_size, quant=quant,
                kv_cache_dtype=kv_cache_dtype, calib_data=calib_data, calib_samples=calib_samples,
                group_size=group_size, outlier_channels=outlier_channels, low_rank=low_rank, tp_size=tp_size)
    path = build_job(opts, no_cache=no_cache, check_reproducible=check_reproducible)
    click.echo(str(path))


def build_job(opts: dict, no_cache: bool = False, check_reproducible: bool = False, job: dict | None = None) -> Path:
    """One `trtc build` with these options (the build command's parameter names): resolve the
    options, build (or fetch from the engine cache), print the stage times; returns the engine dir."""
    from trtc.compiler.cache import EngineCache
    from trtc.compiler.pipeline import build_model, check_reproducible_build, default_output
    from trtc.compiler.quantize import check_targets, default_targets
    from trtc.flavour import parse_targets, resolve_flavour

    o = dict(opts)
    qcfg = _quant_config(o.pop("quant"), o.pop("kv_cache_dtype"), o.pop("calib_data"), o.pop("calib_samples"),
                         o.pop("group_size"), o.pop("outlier_channels"), o.pop("low_rank"))
    fl = resolve_flavour(o.pop("flavour"))
    target = o.pop("target")
    targets = parse_targets(target, fl) if target else default_targets(qcfg, fl)
    check_targets(qcfg, fl, targets)
    out = o.pop("output") or default_output(o["model"])
    kv_block_size = o.pop("kv_block_size")
    kw = dict(o, dump_after=tuple(o["dump_after"]), quant=qcfg,
              kv_block_size=int(kv_block_size) if kv_block_size else None, job=job)
    if check_reproducible:
        path, times = check_reproducible_build(o["model"], out, fl, targets, **{k: v for k, v in kw.items() if k != "model"})
    else:
        path, times = build_model(o["model"], out, fl, targets, cache=None if no_cache else EngineCache(),
                                  **{k: v for k, v in kw.items() if k != "model"})
    _print_times(times)
    return path


@main.command()
@_model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Export dir to write.")
@click.option("--dtype", type=DTYPE_CHOICES, default="auto", show_default=True)
@click.option("--max-seq-len", type=int, default=None, help="KV cache length [default: min(2048, model max)].")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Write the graph structure after this pass to <output>.dump/ (repeatable; large weights are not copied).")
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel ranks: one rank graph per rank, each with its shard of the weights.")
@_quant_options
@_attention_options
def export(model, output, dtype, max_seq_len, dump_after, tp_size, attention, kv_block_size, quant, kv_cache_dtype,
           calib_data, calib_samples, group_size, outlier_channels, low_rank):
    """Export a model to ONNX rank graphs (no TensorRT); `trtc build --model DIR` takes the dir."""
    from trtc.compiler.pipeline import export_model

    qcfg = _quant_config(quant, kv_cache_dtype, calib_data, calib_samples, group_size, outlier_channels, low_rank)
    path, times = export_model(model, output, dtype=dtype, max_seq_len=max_seq_len, dump_after=tuple(dump_after),
                               quant=qcfg, attention=attention,
                               kv_block_size=int(kv_block_size) if kv_block_size else None, tp_size=tp_size)
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


@main.command(name="eval")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--text", "text_file", default=None, metavar="FILE",
              help="Text to score [default: bundled trtc/data/eval.txt, disjoint from the calibration text].")
@click.option("--reference", default=None, metavar="MODEL",
              help="Unquantized model for top-1 agreement (run in transformers fp32) [default: the engine dir's source].")
@click.option("--no-reference", is_flag=True, help="Perplexity only.")
@click.option("--window", type=int, default=None, help="Tokens per prefill window [default: min(256, max-input-len)].")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"perplexity", "reference_perplexity", "top1_agreement", ...}.')
def eval_(engine_dir, text_file, reference, no_reference, window, backend, as_json):
    """Perplexity of an engine dir's model on a text, and top-1 agreement with its source model."""
    from trtc.eval import evaluate

    r = evaluate(engine_dir, text_file, reference=reference, backend=backend, window=window,
                 no_reference=no_reference)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"perplexity           {r.perplexity:.4f}   ({r.tokens} tokens, {r.windows} windows, {r.backend})")
    if r.reference_perplexity is not None:
        click.echo(f"reference perplexity {r.reference_perplexity:.4f}   ({r.reference}, transformers fp32)")
        click.echo(f"top-1 agreement      {r.top1_agreement:.4f}")



@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON list of jobs (name, output, options, ...) for a CI matrix.")
def matrix(recipe, as_json):
    """List (and validate) the build jobs of a recipe: configs/*.toml; nothing is built."""
    from trtc.recipes import format_table, load_jobs

    jobs = load_jobs(recipe)
    click.echo(json.dumps([j.to_json() for j in jobs]) if as_json else format_table(jobs))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check the sha256 of every file against the dir's config.")
@click.option("--json", "as_json", is_flag=True)
def inspect(path, verify, as_json):
    """Say what an engine dir or export dir is (no GPU or TensorRT needed)."""
    from trtc.inspect import describe, format_text

    d = describe(path, verify=verify)
    click.echo(json.dumps(d, indent=2) if as_json else format_text(d))


@main.command()
def schema():
    """Print the JSON Schema of an engine dir's config.json (validate artifacts in your own CI)."""
    from trtc.artifact import SCHEMA_FILE
    from trtc.bundled import read_text

    click.echo(read_text(SCHEMA_FILE), nl=False)


if __name__ == "__main__":
    main()
