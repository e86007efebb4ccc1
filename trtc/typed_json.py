"""Frozen dataclasses <-> JSON, checked against their type annotations, and their JSON Schema.

One definition per record (the dataclass) gives the writer, the validating reader and the schema,
so they cannot drift apart. Supported field types: bool, int, float, str, None, `X | None`,
`list[X]`, `tuple[X, ...]`, `dict[str, X]`, `Any` and nested dataclasses. Unknown keys are refused:
a config with a field this trtc does not know was written by another version, or edited by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union

from trtc.errors import TrtcError


class ConfigError(TrtcError):
    """A config file that does not match its record type; the message names the file and the field."""


def to_json(obj: Any) -> Any:
    """A dataclass tree as plain JSON values (tuples become lists), fields in declaration order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_json(cls: type, data: Any, where: str, path: str = "") -> Any:
    """Build `cls` from `data`, checking every value against the annotations.

    `where` names the file for error messages; errors name the dotted field path."""
    return _convert(cls, data, where, path)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _fail(where: str, path: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: field `{path}` {what}; rebuild the dir with this trtc, or fix the field")


def _convert(tp: Any, v: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise _fail(where, path, f"must be an object, not {type(v).__name__}")
        hints = _hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(v) - set(fields))
        if unknown:
            raise _fail(where, _join(path, unknown[0]), "is not a field this trtc knows")
        kw = {}
        for name, f in fields.items():
            if name in v:
                kw[name] = _convert(hints[name], v[name], where, _join(path, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(where, _join(path, name), "is missing")
        try:
            return tp(**kw)
        except TrtcError as e:
            raise _fail(where, path or "(top level)", f"is invalid ({e})") from None
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, v, where, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else _fail(where, path, f"has an unexpected value {v!r}")
    if origin in (list, tuple):
        if not isinstance(v, list):
            raise _fail(where, path, f"must be a list, not {type(v).__name__}")
        items = [_convert(args[0], x, where, f"{path}[{i}]") for i, x in enumerate(v)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(v, dict):
            raise _fail(where, path, f"must be an object, not {type(v).__name__}")
        return {k: _convert(args[1], x, where, _join(path, k)) for k, x in v.items()}
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(where, path, f"must be a number, not {v!r}")
        return float(v)
    if tp in (int, str, bool):
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise _fail(where, path, f"must be {tp.__name__}, not {v!r}")
        return v
    if tp is type(None):
        if v is not None:
            raise _fail(where, path, f"must be null, not {v!r}")
        return None
    raise TypeError(f"typed_json: unsupported annotation {tp!r} at {path}")


def json_schema(cls: type, title: str, description: str) -> dict:
    """JSON Schema (draft 2020-12) of a dataclass record; nested records go under $defs."""
    defs: dict[str, dict] = {}
    _schema(cls, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **defs.pop(cls.__name__),
            "title": title, "description": description, "$defs": defs}


def _schema(tp: Any, defs: dict[str, dict]) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return {}
    if dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}       # placeholder against recursion
            hints = _hints(tp)
            props, required = {}, []
            for f in dataclasses.fields(tp):
                props[f.name] = _schema(hints[f.name], defs)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    required.append(f.name)
            doc = (tp.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            defs[name] = {"type": "object", "description": doc, "properties": props, "required": required,
                          "additionalProperties": False}
        return {"$ref": f"#/$defs/{name}"}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema(a, defs) for a in args]}
    if origin in (list, tuple):
        return {"type": "array", "items": _schema(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], defs)}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"typed_json: unsupported annotation {tp!r}")
