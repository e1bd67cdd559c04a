"""The sweep's results table: one row per run, as CSV and Markdown.

Owns which final metrics a row shows and how they are read from a run's
``metrics.jsonl`` and ``summary.json`` (record shapes: ``Trainer._log_train``,
``_moe_record`` and ``_log_eval``). Rows come from the files on disk, so the
table can be rebuilt at any time (``--summary-only``), also while SLURM tasks
still run. Files are replaced atomically: tasks finishing at the same time
each write a whole table.

Columns: the run, what varies between runs (resolved values), status, steps,
the last logged training loss (mean over its log interval), the last
validation loss, tokens/s (mean over the log intervals after the first, which
includes start-up), and from the last record the MoE metrics: imbalance
(busiest expert over mean, worst layer), dropped and unrouted fractions (mean
over layers), same-node share, cross-node MB per step, capacity C, plus the
mean tokens an expert processed per step over the whole run (``tokens_per_expert``,
all records: the x axis of the capacity frontier) and the wall time. MoE
columns no run has are left out.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Optional

from locmoe_train.report.runs import mean_tokens_per_expert
from locmoe_train.sweep.runner import status_of
from locmoe_train.sweep.spec import Run, Sweep, format_value

# (column, Markdown format); a None format means an integer.
METRICS = [("steps", None), ("train_loss", ".4f"), ("val_loss", ".4f"),
           ("tokens_per_s", ".0f"), ("imbalance", ".2f"), ("dropped", ".3f"),
           ("unrouted", ".3f"), ("same_node", ".3f"), ("cross_node_MB", ".2f"),
           ("capacity", None), ("tokens_per_expert", ".1f"), ("wall_s", ".0f")]
OPTIONAL = {"imbalance", "dropped", "unrouted", "same_node", "cross_node_MB", "capacity",
            "tokens_per_expert"}


def _records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash
                continue
    return out


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def final_metrics(run_dir: str) -> dict[str, Any]:
    """The row's metric columns for one run directory (None where unknown)."""
    records = _records(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        summary = {}
    out: dict[str, Any] = {k: None for k, _ in METRICS}
    out["steps"] = summary.get("steps", train[-1]["step"] if train else None)
    out["wall_s"] = summary.get("wall_time_s")
    if val:
        out["val_loss"] = val[-1]["val_loss"]
    if not train:
        return out
    last = train[-1]
    out["train_loss"] = last["loss"]
    out["tokens_per_s"] = _mean([r.get("tokens_per_s") for r in (train[1:] or train)])
    layers = [v for v in (last.get("moe") or {}).values() if isinstance(v, dict)]
    out["imbalance"] = last.get("moe_imbalance")
    out["dropped"] = _mean([layer.get("dropped_fraction") for layer in layers])
    out["unrouted"] = _mean([layer.get("unrouted_fraction") for layer in layers])
    out["same_node"] = _mean([layer.get("same_node_share") for layer in layers])
    if last.get("bytes_cross_node") is not None:
        out["cross_node_MB"] = last["bytes_cross_node"] / 1e6
    out["capacity"] = last.get("moe_capacity")
    out["tokens_per_expert"] = mean_tokens_per_expert(train)
    return out



def _setting(run: Run, key: str) -> Any:
    obj: Any = run.cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def collect(sweep: Sweep) -> tuple[list[str], list[dict]]:
    """(column names, one row per run) from the run directories."""
    rows = []
    for run in sweep.runs:
        row = {"run": run.name}
        row.update({key: _setting(run, key) for key in sweep.columns})
        row["status"] = status_of(run)
        row.update(final_metrics(run.dir))
        rows.append(row)
    columns = ["run", *sweep.columns, "status"]
    columns += [k for k, _ in METRICS
                if k not in OPTIONAL or any(row[k] is not None for row in rows)]
    return columns, rows


def to_csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return buf.getvalue()


def _cell(value: Any, fmt: Optional[str]) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and fmt is None:
        return str(int(value))
    return value if isinstance(value, str) else format_value(value)


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    formats = dict(METRICS)
    numeric = set(formats)
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|"]
    for row in rows:
        cells = [_cell(row[c], formats.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_summary(sweep: Sweep) -> tuple[str, list[dict]]:
    """Write summary.csv and summary.md into the sweep's output directory; returns
    (the Markdown table, the rows)."""
    columns, rows = collect(sweep)
    os.makedirs(sweep.output_dir, exist_ok=True)
    markdown = to_markdown(columns, rows)
    _write(os.path.join(sweep.output_dir, "summary.csv"), to_csv(columns, rows))
    _write(os.path.join(sweep.output_dir, "summary.md"), markdown)
    return markdown, rows
