"""Every config key with its type, default and description, read from the dataclasses.

Owns ``locmoe-train --help-config`` (``help_text``) and the generated
reference ``docs/config_reference.md`` (``reference_markdown``; a test keeps the
committed page equal to it). A key's description is the comment block
written just above its field (or at the end of its line) in the section's
dataclass, so the schema and its documentation are one text: a new key
without a comment fails ``tests/unit/test_config_help.py``. The help shows
the first sentence of each description; the docs page shows all of it.
Nothing here imports an implementation or torch.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from locmoe_train.config import TrainConfig
from locmoe_train.config_load import public_key


@dataclass
class KeyDoc:
    key: str  # dotted path, e.g. moe.capacity.interval; list items as data.blend[].path
    type: str
    default: str
    description: str  # the whole comment, joined into one paragraph

    @property
    def summary(self) -> str:
        """The description's first sentence (a period outside parentheses, then a space)."""
        text, depth = self.description, 0
        for i, ch in enumerate(text):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "." and depth == 0 and text[i + 1:i + 2] in (" ", ""):
                return text[:i + 1]
        return text if text.endswith(".") else text + "."


def field_comments(cls) -> dict[str, str]:
    """``{field name: its comment}`` for a dataclass, from the comment lines above each
    field (or after it on the same line) in the class's source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    out = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 2  # 0-based index of the line above
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        inline = lines[node.lineno - 1].partition("  # ")[2].strip()
        text = " ".join(part for part in above + [inline] if part)
        out[node.target.id] = text
    return out


def type_name(hint: Any) -> str:
    """A type hint as a reader of YAML sees it: ``int``, ``int or null``, ``a | b``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(str(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        text = " | ".join(type_name(a) for a in args)
        return f"{text} or null" if len(args) < len(typing.get_args(hint)) else text
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"list of {type_name(item)}"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe_keys(cls=TrainConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key under ``cls`` in declaration order, sections depth first."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out: list[KeyDoc] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{public_key(f.name)}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += describe_keys(hint, key + ".")
            continue
        out.append(KeyDoc(key, type_name(hint), yaml_value(getattr(instance, f.name)),
                          comments.get(f.name, "")))
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        for arg in typing.get_args(hint) if item is None else [item]:
            if typing.get_origin(arg) is list:
                (arg,) = typing.get_args(arg)
            if dataclasses.is_dataclass(arg):
                out += describe_keys(arg, key + "[].")
    return out


def sections(cls=TrainConfig) -> list[tuple[str, str]]:
    """``(section, its one-line docstring or '')`` for the root's sections."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        doc = inspect.getdoc(hints[f.name]) or ""
        out.append((f.name, "" if doc.startswith(hints[f.name].__name__ + "(") else
                    doc.splitlines()[0]))
    return out


def help_text() -> str:
    """What ``locmoe-train --help-config`` prints."""
    keys = describe_keys()
    out = ["Config keys (YAML: section: {key: value}; command line: --section.key=value).",
           "Type, default, and what it does; docs/config_reference.md has the full descriptions.", ""]
    for name, doc in sections():
        out.append(f"{name}:" + (f"  {doc}" if doc else ""))
        for k in keys:
            if k.key.split(".")[0].split("[")[0] == name:
                out.append(f"  {k.key}  ({k.type}; default {k.default})")
                out.append(f"      {k.summary}")
        out.append("")
    return "\n".join(out)


def reference_markdown() -> str:
    """The text of docs/config_reference.md."""
    keys = describe_keys()
    out = ["# Config reference", "",
           "<!-- Generated from the config dataclasses by locmoe_train/config_help.py; do not",
           "     edit by hand. Regenerate: python -m locmoe_train.config_help > docs/config_reference.md -->",
           "",
           "Every key of a run's config, with its type, default and description.",
           "Set a key in a YAML file (`section: {key: value}`, a file may start from",
           "another with `base: other.yaml`) or on the command line",
           "(`--section.key=value`). `locmoe-train --help-config` prints this list;",
           "`locmoe-train --config FILE [overrides] --print-config` prints the resolved",
           "config. How files, `base:` and overrides work: [docs/configs.md](configs.md).", ""]
    for name, doc in sections():
        out += [f"## {name}", ""]
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in keys:
            if k.key.split(".")[0].split("[")[0] == name:
                cells = [f"`{k.key}`", k.type.replace("|", "\\|"), f"`{k.default}`",
                         k.description.replace("|", "\\|")]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
