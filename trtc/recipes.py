"""Build recipes (`configs/*.toml`) and the jobs they expand to (`trtc matrix`, `trtc build --config`).

A recipe's keys are the long options of `trtc build` with `-` written as `_`; the set of keys,
their types and choices come from the click command itself (`recipe_keys`), and each job's values
are parsed by that command's own parser, so a recipe value is checked exactly as the same value
on the command line. A `[matrix]` table maps keys to lists; the recipe expands to their cartesian
product (first key slowest), one job per combination. Every job is validated before anything is
built: a bad value or an impossible job is a TrtcError naming the recipe and the job.

    name = "smollm2-{quant}"       # optional template; default: file stem + matrix values, joined by -
    output = "engines/{name}"      # optional template; this is the default
    dtype = "float16"
    [matrix]
    quant = ["none", "int8_wo"]
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import click
from click.core import ParameterSource

from trtc.errors import TrtcError

NAME, MATRIX = "name", "matrix"                   # recipe keys that are not build options
COMMAND_OPTIONS = ("recipe", "job_name")          # build's --config/--job: what selects the jobs
NOT_PASSED: tuple[str, ...] = ()                  # recipe keys checked here but not passed on to build_job
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _build_command() -> click.Command:
    from trtc.cli import build

    return build


def run_options() -> tuple[str, ...]:
    """Options of `trtc build` that say how to build, not what (--no-cache, ...): the keyword
    arguments of cli.build_job. They are not recipe keys; given with --config, they apply to every job."""
    from trtc.cli import build_job

    return tuple(n for n in inspect.signature(build_job).parameters if n not in ("opts", "job"))


def recipe_keys() -> dict[str, click.Option]:
    """Recipe key -> the click option of `trtc build` it stands for (its parameter name)."""
    skip = set(COMMAND_OPTIONS) | set(run_options())
    return {p.name: p for p in _build_command().params
            if isinstance(p, click.Option) and p.name is not None and p.name not in skip}


def _long_option(p: click.Option) -> str:
    return max(p.opts, key=len)


@dataclass(frozen=True)
class Job:
    """One combination of a recipe: what `trtc build --config RECIPE --job NAME` builds."""

    name: str
    output: Path
    recipe: Path
    recipe_sha256: str
    given: dict           # recipe keys of this job (base and matrix values) -> value as written
    varies: tuple[str, ...]  # the keys of the recipe's matrix
    params: dict          # every `trtc build` parameter, as the command line parser made it
    flavour: str          # resolved (auto -> what is installed)
    targets: tuple[str, ...]

    def build_options(self) -> dict:
        """The `opts` of cli.build_job: what a plain `trtc build` with these options passes."""
        keys = set(recipe_keys()) - set(NOT_PASSED)
        return {k: v for k, v in self.params.items() if k in keys}

    def options(self) -> dict:
        """The recipe's options for this job, JSON-ready (output is separate)."""
        return {k: _jsonable(self.params[k]) for k in self.given if k != "output"}

    def to_json(self) -> dict:
        return {"name": self.name, "output": str(self.output), "recipe": str(self.recipe),
                "flavour": self.flavour, "targets": list(self.targets), "options": self.options()}

    def provenance(self) -> dict:
        """The job as recorded in the engine dir's provenance statement."""
        return {"name": self.name, "recipe": str(self.recipe), "recipe_sha256": self.recipe_sha256,
                "options": self.options()}


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


# --- reading and expanding -----------------------------------------------------------------------

def _read_toml(path: Path) -> tuple[dict, str]:
    try:
        import tomllib
    except ImportError as e:   # Python 3.10
        raise TrtcError(f"recipe {path}: reading TOML needs Python 3.11+ (tomllib); use Python 3.11") from e
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TrtcError(f"recipe {path}: no such file; pass a TOML file such as configs/smollm2.toml") from None
    except IsADirectoryError:
        raise TrtcError(f"recipe {path} is a directory; pass a TOML file such as configs/smollm2.toml") from None
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrtcError(f"recipe {path} is not valid TOML ({e}); fix the file") from None
    return table, hashlib.sha256(data).hexdigest()


def _check_key(path: Path, key: str, in_matrix: bool = False) -> None:
    keys = recipe_keys()
    if key in keys:
        return
    if key in run_options():
        raise TrtcError(f"recipe {path}: {key} says how to build, not what; drop it from the recipe "
                        f"and pass --{key.replace('_', '-')} to `trtc build --config`")
    valid = sorted(keys) + ([] if in_matrix else [NAME, MATRIX])
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
    raise TrtcError(f"recipe {path}: unknown key {('matrix.' * in_matrix + key)!r}; {hint}")


def _split(path: Path, table: dict) -> tuple[str | None, dict, dict[str, list]]:
    """(name template, base options, matrix) of a parsed recipe, keys checked."""
    name = table.get(NAME)
    if name is not None and not isinstance(name, str):
        raise TrtcError(f"recipe {path}: name = {name!r} must be a string such as \"{path.stem}-{{quant}}\"")
    matrix = table.get(MATRIX, {})
    if not isinstance(matrix, dict):
        raise TrtcError(f"recipe {path}: matrix must be a table ([matrix] with key = [values])")
    base = {k: v for k, v in table.items() if k not in (NAME, MATRIX)}
    for k in base:
        _check_key(path, k)
    for k, values in matrix.items():
        _check_key(path, k, in_matrix=True)
        if k in base:
            raise TrtcError(f"recipe {path}: {k} is set both at the top and in [matrix]; keep one")
        if not isinstance(values, list) or not values:
            raise TrtcError(f"recipe {path}: matrix.{k} = {values!r} must be a non-empty list of values")
    return name, base, matrix


def _slug(v) -> str:
    """A value as part of a job name: CI artifact names allow no / : , and friends."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "+".join(_slug(x) for x in v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(v).replace(",", "+"))


def _fill(template: str, values: dict[str, str], what: str, path: Path) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise TrtcError(f"recipe {path}: {what} template {template!r} names {{{m.group(1)}}}, which is not "
                            f"set for every job; use one of {', '.join('{' + k + '}' for k in values)}")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, template)


def expand(path: Path, table: dict) -> tuple[tuple[str, ...], list[tuple[str, Path, dict]]]:
    """(the matrix keys, [(job name, output dir, given options)] per combination of the matrix, in
    order); keys checked, values not."""
    name_t, base, matrix = _split(path, table)
    jobs = []
    for combo in itertools.product(*matrix.values()):
        given = dict(base, **dict(zip(matrix, combo)))
        values = {"recipe": path.stem, **{k: _slug(v) for k, v in given.items() if k != "output"}}
        name = (_fill(name_t, values, "name", path) if name_t
                else "-".join([path.stem, *(_slug(v) for v in combo)]))
        output = _fill(str(given["output"]), dict(values, name=name), "output", path) \
            if "output" in given else str(Path("engines") / name)
        jobs.append((name, Path(output), given))
    _check_unique(path, [j[0] for j in jobs], "job name", "give a name template naming every matrix key")
    _check_unique(path, [str(j[1]) for j in jobs], "output", "use {name} in the output template")
    return tuple(matrix), jobs


def _check_unique(path: Path, items: list[str], what: str, fix: str) -> None:
    dup = sorted({x for x in items if items.count(x) > 1})
    if dup:
        raise TrtcError(f"recipe {path}: two jobs have the {what} {dup[0]}; {fix}")


# --- validating -----------------------------------------------------------------------------------

def _argv(given: dict, output: Path, label: str) -> list[str]:
    """The command line that a plain `trtc build` with these options would get."""
    keys = recipe_keys()
    argv = []
    for k, v in given.items():
        p = keys[k]
        opt = _long_option(p)
        if p.is_flag:
            if not isinstance(v, bool):
                raise TrtcError(f"{label}: {k} = {v!r}: {opt} is a flag; write {k} = true or false")
            argv += [opt] if v else []
        elif isinstance(v, (bool, dict)):
            raise TrtcError(f"{label}: {k} = {v!r}: {opt} takes a value, not a {type(v).__name__}; "
                            f"write the value as on the command line")
        elif isinstance(v, list):
            if not p.multiple:
                raise TrtcError(f"{label}: {k} = {v!r} is a list, but {opt} takes one value; "
                                f"put the values in [matrix] to build one job per value")
            argv += [f"{opt}={x}" for x in v]
        elif k != "output":
            argv.append(f"{opt}={v}")
    return argv + [f"{_long_option(keys['output'])}={output}"]


def _parse(given: dict, output: Path, label: str) -> dict:
    """Every build parameter, from the command line parser of `trtc build` (types, choices, callbacks)."""
    argv = _argv(given, output, label)
    try:
        ctx = _build_command().make_context("build", argv)
    except click.BadParameter as e:
        key = e.param.name if e.param is not None else "?"
        raise TrtcError(f"{label}: {key} = {given.get(key)!r}: {e.message.rstrip('.')}; fix the recipe") from None
    except click.UsageError as e:
        raise TrtcError(f"{label}: {e.format_message()}; fix the recipe") from None
    except TrtcError as e:
        raise TrtcError(f"{label}: {e}") from None
    return dict(ctx.params)


def _resolve(params: dict):
    """(flavour, targets) of a job; TrtcError where the options cannot build together.
    An explicit flavour is not imported: a CPU runner may list jobs for full TensorRT."""
    from trtc.compiler.quantize import check_targets, default_targets, make_quant_config
    from trtc.flavour import FLAVOURS, parse_targets, resolve_flavour

    q = make_quant_config(params["quant"], params["kv_cache_dtype"], params["calib_data"], params["calib_samples"],
                          params["group_size"], params["outlier_channels"], params["low_rank"])
    fl = FLAVOURS[params["flavour"]] if params["flavour"] in FLAVOURS else resolve_flavour(params["flavour"])
    targets = parse_targets(params["target"], fl) if params["target"] else default_targets(q, fl)
    check_targets(q, fl, targets)
    _check_tp(params, q)
    return fl, targets


def _check_tp(params: dict, q) -> None:
    """--tp-size against the model's heads and sizes when its config is readable without loading
    it (a local dir, a prepared bundled model, an export dir); else the build checks it first."""
    from trtc.compiler.quantize import resolve_for_model
    from trtc.compiler.tp import check_tp, check_tp_attention, local_spec

    tp = params.get("tp_size") or 1
    check_tp_attention(tp, params.get("attention") or "native")
    spec = local_spec(params["model"]) if tp > 1 else None
    if spec is not None:
        q = resolve_for_model(q, spec) if q.enabled else q
        check_tp(spec, tp, q.algo, q.group_size if q.enabled else 0, params.get("attention") or "native")


def load_jobs(path: Path | str) -> list[Job]:
    """The recipe's jobs, every one checked (values and feasibility) before any is returned."""
    path = Path(path)
    table, digest = _read_toml(path)
    varies, expanded = expand(path, table)
    jobs = []
    for name, output, given in expanded:
        label = f"recipe {path}, job {name}"
        params = _parse(given, output, label)
        try:
            fl, targets = _resolve(params)
        except TrtcError as e:
            raise TrtcError(f"{label}: {e}") from None
        jobs.append(Job(name, output, path, digest, given, varies, params, fl.name, targets))
    return jobs


def select(jobs: list[Job], name: str | None, path: Path) -> list[Job]:
    if name is None:
        return jobs
    for j in jobs:
        if j.name == name:
            return [j]
    names = [j.name for j in jobs]
    near = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {near[0]}?" if near else f"its jobs: {', '.join(names)}"
    raise TrtcError(f"--job {name}: recipe {path} has no such job; {hint} (`trtc matrix {path}` lists them)")


def jobs_to_build(ctx: click.Context) -> tuple[list[Job], dict]:
    """For `trtc build --config RECIPE [--job NAME]`: the jobs (all validated first) and the run
    options (--no-cache, ...) that apply to each. Any other build option on the command line is an error."""
    recipe, job_name = (ctx.params[k] for k in COMMAND_OPTIONS)
    if recipe is None:
        raise TrtcError(f"--job {job_name} needs --config RECIPE (the recipe that defines the job)")
    keys = recipe_keys()
    mixed = [_long_option(p) for k, p in keys.items()
             if ctx.get_parameter_source(k) not in (None, ParameterSource.DEFAULT)]
    if mixed:
        raise TrtcError(f"--config {recipe} takes the build options from the recipe, but {', '.join(mixed)} "
                        f"{'was' if len(mixed) == 1 else 'were'} given too; set them in the recipe (or a copy of it)")
    jobs = select(load_jobs(recipe), job_name, Path(recipe))
    return jobs, {k: ctx.params[k] for k in run_options()}


def format_table(jobs: list[Job]) -> str:
    """The options all jobs share on one line, then a row per job with the matrix values."""
    first = jobs[0]
    common = " ".join(f"{k}={_jsonable(first.params[k])}" for k in first.given if k not in first.varies)
    head = f"{first.recipe}: {len(jobs)} job{'s' * (len(jobs) != 1)}" + (f"; {common}" if common else "")
    rows = [("name", "output", "targets", *first.varies)]
    rows += [(j.name, str(j.output), ",".join(j.targets), *(str(_jsonable(j.params[k])) for k in j.varies))
             for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join([head, *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)])
