"""Sweep files: reading one, expanding it into named runs, resolving each run's config.

Owns the sweep file's schema (``SWEEP_KEYS``), the run list (``runs`` x
``grid``, in a fixed order so that ``--index I`` means the same run
everywhere), run names and each run's resolved ``TrainConfig``. Does not run
anything (``runner.py``) or read results (``summary.py``).

Precedence of settings, lowest first: the run's config file (``base:`` or the
run's own ``config:``), the sweep's ``overrides``, the run's ``overrides`` and
its grid values, then ``--section.key=value`` given on the command line. A run
entry and the grid may not set the same key (which should win is ambiguous).
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from locmoe_train.config import TrainConfig, apply_override, load_config
from locmoe_train.errors import UserError

SWEEP_KEYS = ("base", "output_dir", "nproc", "overrides", "grid", "runs", "slurm")
RUN_KEYS = ("name", "config", "overrides")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class Run:
    index: int
    name: str
    config_path: Optional[str]  # the file the run's config starts from (None: defaults)
    settings: dict[str, Any]  # what this run sets beyond the sweep's overrides (grid + its own)
    overrides: list[str]  # every override applied, in order, as "key=value"
    dir: str = ""
    cfg: Optional[TrainConfig] = None


@dataclass
class Sweep:
    path: str  # the sweep file ("" when built in code)
    name: str
    output_dir: str
    nproc: int
    runs: list[Run]
    columns: list[str]  # what varies between runs, for the summary table
    slurm: dict = field(default_factory=dict)
    cli_overrides: list[str] = field(default_factory=list)


def format_value(value: Any) -> str:
    """A value as override text that ``apply_override`` reads back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True)
    return text.removesuffix("\n...\n").strip()


def load_sweep(path: str, cli_overrides: Optional[list[str]] = None) -> Sweep:
    """Read a sweep file and resolve every run's config (UserError on any bad key or value)."""
    if not os.path.isfile(path):
        raise UserError(f"sweep file {path!r} does not exist (see configs/sweeps/ for examples).")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"sweep file {path!r} is not valid YAML: {e}") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    return build_sweep(raw, path, stem, os.path.dirname(path), cli_overrides)


def build_sweep(raw: Any, where: str, name: str, base_dir: str,
                cli_overrides: Optional[list[str]] = None) -> Sweep:
    """Expand a sweep given as a dict; config paths in it are relative to ``base_dir``."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a sweep file holds a mapping with keys "
                        f"{', '.join(SWEEP_KEYS)}; got {type(raw).__name__}.")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise UserError(f"{where}: unknown sweep key {key!r}. Valid keys: "
                            f"{', '.join(SWEEP_KEYS)}.")
    cli_overrides = list(cli_overrides or [])
    nproc = raw.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UserError(f"{where}: nproc={nproc!r} must be a positive integer "
                        f"(ranks per run; more than 1 launches through torchrun).")
    output_dir = raw.get("output_dir") or os.path.join("runs", "sweeps", name)
    if not isinstance(output_dir, str):
        raise UserError(f"{where}: output_dir={output_dir!r} must be a directory path.")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise UserError(f"{where}: slurm must be a mapping of sbatch options "
                        f"(e.g. partition: gpu, time: '04:00:00'), got {slurm!r}.")

    common = _flatten(raw.get("overrides") or {}, f"{where}: overrides")
    _check_keys(common, f"{where}: overrides")
    grid = _read_grid(raw.get("grid") or {}, where)
    entries = _read_runs(raw.get("runs"), where, base_dir)
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{where}: base={base!r} must be the path of a config file.")
    base_path = os.path.join(base_dir, base) if base else None
    if base_path is None and any(e["config"] is None for e in entries):
        raise UserError(f"{where}: no 'base' config: add 'base: CONFIG.yaml' (relative to the "
                        f"sweep file), or give every entry of 'runs' its own 'config'.")

    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    short = _short_keys(list(grid) + [k for e in entries for k in e["overrides"]])
    runs = []
    for entry in entries:
        clash = sorted(set(entry["overrides"]) & set(grid))
        if clash:
            raise UserError(f"{where}: {entry['where']} and grid both set {clash[0]!r}: set it "
                            f"in one place only.")
        # Unnamed entries: the config file's stem and/or the overrides' values.
        entry_name = entry["name"] or "_".join(
            p for p in (entry["stem"], _derived_name(entry["overrides"], short)) if p)
        for point in points:
            settings = {**entry["overrides"], **point}
            run_name = "_".join(p for p in (entry_name, _derived_name(point, short)) if p)
            run_name = run_name or "base"
            overrides = [f"{k}={format_value(v)}" for k, v in {**common, **settings}.items()]
            runs.append(Run(len(runs), run_name, entry["config"] or base_path, settings,
                            overrides + cli_overrides))
    _check_unique(runs, where)

    for run in runs:
        run.dir = os.path.join(output_dir, run.name)
        run.cfg = resolve_run_config(run, where)
    return Sweep(where, name, output_dir, nproc, runs, _varying_keys(runs), slurm, cli_overrides)


def resolve_run_config(run: Run, where: str) -> TrainConfig:
    """The run's validated config, writing into its own directory and resuming from it."""
    from locmoe_train.moe.impls import check_impl

    try:
        cfg = check_impl(load_config(run.config_path, run.overrides))
    except UserError as e:
        raise UserError(f"{where}: run {run.name!r}: {e}") from None
    cfg.logging.run_dir = run.dir
    cfg.checkpoint.dir = os.path.join(run.dir, "checkpoints")
    # An unfinished run continues from its latest checkpoint; a fresh one finds none.
    cfg.checkpoint.resume = "auto"
    return cfg


# ---------------------------------------------------------------------------
# Parts of the file
# ---------------------------------------------------------------------------

def _flatten(value: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``{moe: {top_k: 2}}`` and ``{moe.top_k: 2}`` both become ``{"moe.top_k": 2}``."""
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of config keys to values "
                        f"(e.g. moe.top_k: 2), got {value!r}.")
    out = {}
    for key, v in value.items():
        path = f"{prefix}{key}"
        if isinstance(v, dict):
            out.update(_flatten(v, where, f"{path}."))
        else:
            out[path] = v
    return out


def _check_keys(settings: dict[str, Any], where: str) -> None:
    """Unknown config keys and badly typed values, attributed to the part of the sweep file."""
    for key, value in settings.items():
        try:
            apply_override(TrainConfig(), f"{key}={format_value(value)}")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def _read_grid(grid: Any, where: str) -> dict[str, list]:
    if not isinstance(grid, dict):
        raise UserError(f"{where}: grid must map config keys to lists of values "
                        f"(e.g. moe.top_k: [1, 2]), got {grid!r}.")
    out = {}
    for key, values in _flatten(grid, f"{where}: grid").items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid[{key!r}]={values!r} must be a non-empty list of "
                            f"values, e.g. {key}: [{format_value(values)}].")
        for v in values:
            _check_keys({key: v}, f"{where}: grid")
        if len({format_value(v) for v in values}) != len(values):
            raise UserError(f"{where}: grid[{key!r}]={values!r} lists a value twice.")
        out[key] = values
    return out


def _read_runs(runs: Any, where: str, base_dir: str) -> list[dict]:
    if runs is None:
        return [{"name": None, "stem": None, "config": None, "overrides": {},
                 "where": "the base config"}]
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{where}: runs must be a non-empty list of entries with keys "
                        f"{', '.join(RUN_KEYS)}, got {runs!r}.")
    out = []
    for i, entry in enumerate(runs):
        label = f"runs[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: {label} must be a mapping with keys "
                            f"{', '.join(RUN_KEYS)}, got {entry!r}.")
        for key in entry:
            if key not in RUN_KEYS:
                raise UserError(f"{where}: {label}: unknown key {key!r}. Valid keys: "
                                f"{', '.join(RUN_KEYS)}.")
        name, config = entry.get("name"), entry.get("config")
        if name is not None:
            name = str(name)
            if not _SAFE_NAME.match(name):
                raise UserError(f"{where}: {label}: name {name!r} is not usable as a directory "
                                f"name: use letters, digits and . _ + = - (not first).")
            label = f"runs[{i}] ({name})"
        if config is not None and not isinstance(config, str):
            raise UserError(f"{where}: {label}: config={config!r} must be a file path.")
        overrides = _flatten(entry.get("overrides") or {}, f"{where}: {label}: overrides")
        _check_keys(overrides, f"{where}: {label}: overrides")
        if name is None and config is None and not overrides:
            raise UserError(f"{where}: {label} is empty: give it a name, a config or overrides.")
        stem = os.path.splitext(os.path.basename(config))[0] if config else None
        out.append({"name": name, "stem": stem, "overrides": overrides, "where": label,
                    "config": os.path.join(base_dir, config) if config else None})
    return out


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares (for run names)."""
    keys = list(dict.fromkeys(keys))
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def _derived_name(settings: dict[str, Any], short: dict[str, str]) -> str:
    """``{moe.top_k: 2, optim.lr: 0.001}`` -> ``top_k-2_lr-0.001``."""
    parts = [f"{short[k]}-{format_value(v)}" for k, v in settings.items()]
    return re.sub(r"[^A-Za-z0-9._+=-]+", "", "_".join(parts).replace("/", "-"))


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _varying_keys(runs: list[Run]) -> list[str]:
    """What the summary table shows per run: the keys the sweep sets per run, then
    any other key whose resolved value differs between runs (e.g. set by a run's
    own config file), in schema order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    flat = [flatten_dict(r.cfg.to_dict()) for r in runs]
    per_run = {"logging.run_dir", "checkpoint.dir"}
    for key in flat[0]:
        if key not in keys and key not in per_run and len({repr(f.get(key)) for f in flat}) > 1:
            keys.append(key)
    return keys


def _check_unique(runs: list[Run], where: str) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            raise UserError(f"{where}: run name {run.name!r} is used by runs {seen[run.name]} "
                            f"and {run.index}: give the entries of 'runs' distinct names.")
        seen[run.name] = run.index
