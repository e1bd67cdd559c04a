"""Reading configs: YAML files with ``base:``, ``--section.key=value`` overrides, type checks.

Owns turning text into a config dataclass and back: ``from_dict`` and
``apply_override`` check every value against the field's type hint and name
the key path in their errors; deprecated spellings are accepted with a note
(``RENAMED_KEYS``, ``RENAMED_VALUES``; ``upgrade_saved`` for saved configs);
``dump_config`` writes the resolved config atomically. It knows no section:
the schema is the root ``TrainConfig`` (``config.py``), whose ``load_config``
is the entry point. Nothing else parses config files.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import sys
import types
import typing
from typing import Any, Literal

import yaml

from locmoe_train.errors import UserError

# Deprecated spellings, still accepted (with a note) in YAML files, overrides and the
# configs saved in checkpoints and run directories: old -> new.
RENAMED_KEYS = {"moe.locmoe": "moe.locmoe_plus"}
RENAMED_VALUES = {"moe.impl": {"locmoe": "native"}}
_noted: set[str] = set()


def _deprecated(old: str, new: str, quiet: bool) -> None:
    if quiet or old in _noted:
        return
    _noted.add(old)
    print(f"note: {old} is deprecated, use {new} (the old spelling still works).",
          file=sys.stderr, flush=True)


def _renamed_key(path: str, quiet: bool = False) -> str:
    for old, new in RENAMED_KEYS.items():
        if path == old or path.startswith(old + "."):
            _deprecated(old, new, quiet)
            return new + path[len(old):]
    return path


def _renamed_value(path: str, value: Any, quiet: bool = False) -> Any:
    table = RENAMED_VALUES.get(path, {})
    if isinstance(value, str) and value in table:
        _deprecated(f"{path}={value}", f"{path}={table[value]}", quiet)
        return table[value]
    return value


def upgrade_saved(raw: dict) -> dict:
    """A saved config dict (checkpoint meta, a run's config.yaml) in today's spelling."""
    def walk(d: dict, prefix: str) -> dict:
        out = {}
        for key, value in d.items():
            path = _renamed_key(f"{prefix}{key}", quiet=True)
            name = path.rsplit(".", 1)[-1]
            out[name] = (walk(value, path + ".") if isinstance(value, dict)
                         else _renamed_value(path, value, quiet=True))
        return out
    return walk(raw, "")



def _read_yaml(path: str, chain: list[str]) -> dict:
    """Read a config file; a top-level ``base: other.yaml`` (relative to this file) is
    loaded first and this file's sections are merged over it key by key."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist: pass --config with the path "
                        f"of a YAML file (see configs/).")
    if os.path.abspath(path) in chain:
        raise UserError(f"config file {path!r} includes itself through 'base:'.")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path!r} must hold a mapping of sections, "
                        f"got {type(raw).__name__}.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"'base' in {path!r} must be a file path, got {base!r}.")
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), chain + [os.path.abspath(path)])
    return _merge(merged, raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override_args(argv: list[str]) -> list[str]:
    """Turn ``--a.b=v`` and ``--a.b v`` into ``a.b=v`` strings."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unrecognised argument {arg!r}: overrides look like "
                            f"--section.key=value (e.g. --train.max_steps=50).")
        body = arg[2:]
        if "=" not in body:
            if i + 1 >= len(argv):
                raise UserError(f"override {arg!r} has no value: write {arg}=VALUE.")
            body = f"{body}={argv[i + 1]}"
            i += 1
        out.append(body)
        i += 1
    return out


def field_name(key: str) -> str:
    """The dataclass field behind a config key: a key that is a Python keyword
    (``checkpoint.async``) is a field with a trailing underscore."""
    return key + "_" if keyword.iskeyword(key) else key


def public_key(name: str) -> str:
    """The config key of a dataclass field (``async_`` -> ``async``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def apply_override(cfg: Any, item: str) -> None:
    key, _, text = item.partition("=")
    key = _renamed_key(key)
    parts = key.split(".")
    obj: Any = cfg
    for depth, name in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if not dataclasses.is_dataclass(obj):
            raise UserError(f"override {key!r}: {'.'.join(parts[:depth])} is not a section.")
        fields = {public_key(f.name): f for f in dataclasses.fields(obj)}
        if name not in fields:
            raise UserError(_unknown_key_message(path, name, list(fields)))
        name = field_name(name)
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, name)):
                raise UserError(f"override {key!r} names a whole section; set one of its keys, "
                                f"e.g. --{key}.{dataclasses.fields(getattr(obj, name))[0].name}=...")
            try:
                value = yaml.safe_load(text) if text != "" else ""
            except yaml.YAMLError:
                value = text
            hint = typing.get_type_hints(type(obj))[name]
            setattr(obj, name, _coerce(_renamed_value(path, value), hint, path))
        else:
            obj = getattr(obj, name)


def from_dict(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [public_key(f.name) for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = _renamed_key(f"{prefix}.{key}" if prefix else str(key))
        key = path.rsplit(".", 1)[-1]
        value = _renamed_value(path, value)
        if key not in names:
            raise UserError(_unknown_key_message(path, str(key), names))
        key = field_name(key)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against a type hint; ints and numeric strings widen to floats, nothing else converts."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UserError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No float setting means anything at inf or NaN (none is a "no limit"), and
            # range checks like `lr > 0` let inf through.
            if not math.isfinite(number):
                raise UserError(f"{path}={number} is not a finite number; every number in the "
                                f"config must be finite: give a finite value.")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return from_dict(hint, value, path)
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported config type {hint} at {path}")
    expected = getattr(hint, "__name__", str(hint))
    raise UserError(f"{path}={value!r} has the wrong type: expected {expected}, "
                    f"got {type(value).__name__}.")


def _unknown_key_message(path: str, name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {path!r}.{hint} Valid keys here: {', '.join(choices)}."



def config_yaml(cfg: Any) -> str:
    """The config as YAML, sections and keys in declaration order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(config_yaml(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
