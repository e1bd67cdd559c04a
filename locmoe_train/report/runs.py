"""Reading run directories back for reports: records, names and per-layer series.

Owns parsing ``metrics.jsonl`` (tolerating a torn last line, duplicated steps
and rotated ``metrics.N.jsonl`` files), ``summary.json`` and ``config.yaml``
into a ``Run``, naming runs, and the series the plots and the table draw from.
The record format itself belongs to ``trainer.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from locmoe_train.errors import UserError


@dataclass
class Run:
    name: str
    path: str
    train: list[dict]  # records with "loss", sorted by step
    evals: list[dict]  # records with "val_loss", sorted by step
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        names = {k for r in self.train for k in r.get("moe", {})}
        return sorted(names, key=lambda k: int(k.rsplit("_", 1)[-1]))


# ---- reading runs --------------------------------------------------------------
def _read_records(path: str, notes: list[str]) -> list[dict]:
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1  # a crash can tear the line being written
    if bad:
        notes.append(f"skipped {bad} unreadable line(s) in {path}")
    return records


def _by_step(records: list[dict]) -> list[dict]:
    # A resumed run truncates work it redoes, but a file copied together by hand may
    # repeat steps: the later record is the one the run continued from.
    latest = {r["step"]: r for r in records}
    return [latest[s] for s in sorted(latest)]


def load_run(path: str, name: str) -> Run:
    if not os.path.isdir(path):
        raise UserError(f"run directory {path!r} does not exist: pass the logging.run_dir of a "
                        f"training run.")
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{metrics} not found: {path!r} is not a run directory with metrics "
                        f"(pass the logging.run_dir of a run that had logging.jsonl=true).")
    notes: list[str] = []
    records = _read_records(metrics, notes)
    train = _by_step([r for r in records if "loss" in r and "step" in r])
    evals = _by_step([r for r in records if "val_loss" in r and "step" in r])
    for r, key in [(r, "loss") for r in train] + [(r, "val_loss") for r in evals]:
        if r[key] is None:  # written as null when non-finite: plotted as a gap
            r[key] = float("nan")
    if not train:
        raise UserError(f"{metrics} holds no training records yet (the first is written after "
                        f"step 1): let the run log at least once, or leave {path!r} out.")
    older = sorted(glob.glob(os.path.join(path, "metrics.*.jsonl")))
    if older:
        # JsonlSink rotates the file of an earlier, separate run in the same directory.
        notes.append(f"ignored {', '.join(os.path.basename(p) for p in older)} in {path} "
                     f"(earlier runs in the same directory)")
    summary, config = {}, {}
    summary_path = os.path.join(path, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    else:
        notes.append(f"{path} has no summary.json (the run is still going or did not finish)")
    config_path = os.path.join(path, "config.yaml")
    if os.path.isfile(config_path):
        import yaml

        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    return Run(name, path, train, evals, summary, config, notes)


def run_names(paths: list[str]) -> list[str]:
    """Directory basenames, lengthened with parent directories (then numbered) until unique."""
    parts = [os.path.abspath(p).strip(os.sep).split(os.sep) for p in paths]
    depth = [1] * len(paths)
    names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
    for _ in range(max(len(p) for p in parts)):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            return names
        depth = [d + (n in dup) for n, d in zip(names, depth)]
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
    # The same directory given twice: its basename, numbered.
    names = [p[-1] for p in parts]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


# ---- series --------------------------------------------------------------------
def layer_values(run: Run, key: str, layer: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in run.train:
        v = r.get("moe", {}).get(layer, {}).get(key)
        if v is not None:
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def layer_mean(run: Run, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per record: step, mean, min and max of ``key`` over the MoE layers that report it."""
    steps, mean, lo, hi = [], [], [], []
    for r in run.train:
        vals = [e[key] for e in r.get("moe", {}).values() if e.get(key) is not None]
        if vals:
            steps.append(r["step"])
            mean.append(sum(vals) / len(vals))
            lo.append(min(vals))
            hi.append(max(vals))
    return steps, mean, lo, hi


def final_layer_mean(run: Run, key: str) -> Optional[float]:
    steps, mean, _, _ = layer_mean(run, key)
    return mean[-1] if steps and steps[-1] == run.train[-1]["step"] else None


def capacity_trajectory(run: Run, layer: str) -> tuple[list[int], list[float], list[tuple]]:
    """Logged capacity merged with the exact change events; rollbacks returned separately."""
    layer_id = int(layer.rsplit("_", 1)[-1])
    points = dict(zip(*layer_values(run, "capacity", layer)))
    rollbacks = []
    for r in run.train:
        for e in r.get("capacity_events", []):
            if e.get("layer") == layer_id:
                points.setdefault(e["step"], float(e["new"]))
                if e.get("reason") == "rollback":
                    rollbacks.append((e["step"], float(e["new"])))
    steps = sorted(points)
    return steps, [points[s] for s in steps], rollbacks




def mean_tokens_per_expert(train: list[dict]) -> Optional[float]:
    """Mean tokens an expert processed per optimizer step over training records (all
    ranks, mean over experts and MoE layers); None without MoE counts. Each record sums
    the steps since the previous one, so the records' sums over their steps give the mean."""
    total, steps, prev = 0.0, 0, 0
    for r in train:
        layers = [e["tokens_per_expert"] for e in (r.get("moe") or {}).values()
                  if isinstance(e, dict) and e.get("tokens_per_expert")]
        if layers:
            total += sum(sum(c) / len(c) for c in layers) / len(layers)
            steps += r["step"] - prev
        prev = r["step"]
    return total / steps if steps else None


def tokens_per_expert_per_step(run: Run) -> Optional[float]:
    """``mean_tokens_per_expert`` of a run's training records."""
    return mean_tokens_per_expert(run.train)


def capacity_kind(run: Run) -> str:
    """How a run bounds tokens per expert, from its config.yaml: ``fixed`` (a capacity
    factor or LocMoE+ ``policy: fixed``), ``adaptive`` (LocMoE+'s controller or schedule),
    ``dropless`` or ``unknown``."""
    moe = run.config.get("moe") or {}
    if not moe:
        return "unknown"
    if moe.get("router") == "locmoe_plus":
        if (moe.get("locmoe_plus") or {}).get("mode") == "tcr":
            return "dropless"
        policy = (moe.get("capacity") or {}).get("policy", "controller")
        return "fixed" if policy == "fixed" else "adaptive"
    return "dropless" if moe.get("capacity_factor") is None else "fixed"
