"""The ``report`` command: plots and a Markdown summary of one or more runs.

``locmoe-train report RUN_DIR [RUN_DIR ...] [--out DIR]`` reads each run
directory's ``metrics.jsonl`` (plus ``summary.json`` and ``config.yaml`` when
present) and writes PNG plots and ``report.md`` to ``--out``; several runs are
overlaid in one figure per metric, one colour per run.

Owns reading metrics files back (tolerating a torn last line and duplicated
steps), naming runs, the plots and the summary table. Does not own the
record format (``Trainer._log_train``/``_moe_record``/``_log_eval`` write it)
and never writes into a run directory unless ``--out`` points there (the
default for a single run is ``RUN_DIR/report/``).

matplotlib is an optional dependency (``locmoe-train[report]``); figures are
built on matplotlib's object API with the Agg canvas, so no pyplot state or
display is involved.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from locmoe_train.errors import UserError
# DPI, FIG_SIZE and _heatmap_height are re-exported for the tests' pixel-size checks.
from locmoe_train.report.plots import (DPI, FIG_SIZE, PLOTS, _heatmap_height,  # noqa: F401
                                       _require_matplotlib, write_plots)
from locmoe_train.report.runs import Run, file_safe, final_layer_mean, load_run, run_names


# ---- Markdown ------------------------------------------------------------------
def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _describe(run: Run) -> str:
    """One line from config.yaml: model size, routing and layout."""
    m, moe, p = (run.config.get(k, {}) for k in ("model", "moe", "parallel"))
    parts = []
    if m:
        parts.append(f"{m.get('num_layers')} layers x hidden {m.get('hidden_size')}")
    if moe:
        parts.append(f"router {moe.get('router')}, {moe.get('num_experts')} experts, "
                     f"top-{moe.get('top_k')}")
    if run.summary.get("layout"):
        parts.append(run.summary["layout"])
    elif p:
        parts.append(f"tp {p.get('tp')} ep {p.get('ep')}")
    return "; ".join(parts) or "no config.yaml"


def final_metrics(run: Run) -> dict:
    """The numbers of the summary table (None where the run has no such value)."""
    last = run.train[-1]
    vals = [r["val_loss"] for r in run.evals]
    # The first record times step 1 alone, which includes start-up work: leave it out.
    speeds = [r["tokens_per_s"] for r in run.train[1:] or run.train if "tokens_per_s" in r]
    caps = [e["capacity"] for e in last.get("moe", {}).values() if e.get("capacity") is not None]
    return {
        "steps": run.summary.get("steps", last["step"]),
        "loss": last["loss"],
        "best_val": min(vals) if vals else None,
        "final_val": vals[-1] if vals else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "imbalance": last.get("moe_imbalance"),
        "dropped": final_layer_mean(run, "dropped_fraction"),
        "same_node": final_layer_mean(run, "same_node_share"),
        "capacity": (None if not caps else f"{min(caps):g}" if min(caps) == max(caps)
                     else f"{min(caps):g}-{max(caps):g}"),
        "wall_time_s": run.summary.get("wall_time_s"),
        "outcome": run.summary.get("outcome"),
    }


def write_markdown(runs: list[Run], written: dict[str, str], notes: list[str], out: str) -> str:
    lines = ["# Training report", ""]
    for run in runs:
        outcome = run.summary.get("outcome", "unfinished")
        lines.append(f"- **{run.name}**: `{os.path.abspath(run.path)}` ({outcome}); "
                     f"{_describe(run)}")
    lines += ["", "| run | steps | final loss | best val loss | final val loss | tokens/s | "
                  "imbalance | dropped | same node | capacity | wall time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        f = final_metrics(run)
        lines.append(
            f"| {run.name} | {f['steps']} | {f['loss']:.4f} | {_fmt(f['best_val'], '.4f')} | "
            f"{_fmt(f['final_val'], '.4f')} | {_fmt(f['tokens_per_s'], ',.0f')} | "
            f"{_fmt(f['imbalance'], '.3f')} | {_fmt(f['dropped'], '.3f')} | "
            f"{_fmt(f['same_node'], '.3f')} | {f['capacity'] or '-'} | "
            f"{_duration(f['wall_time_s'])} |")
    lines += [
        "",
        "Final loss is the last logged training loss (the mean over its log interval). "
        "Tokens/s is the mean over the logged intervals after the first (step 1 includes "
        "start-up work). Imbalance (max/mean tokens per expert, worst MoE layer), dropped "
        "fraction of routed slots and same-node share (mean over MoE layers) are from the "
        "last record; capacity is C of the last record (min-max over layers when they "
        "differ). Wall time is from summary.json (after a resume: the time since the resume).",
        ""]
    captions = {"loss": "Loss", "lr": "Learning rate", "tokens_per_s": "Throughput",
                "imbalance": "Load imbalance", "capacity": "Expert capacity",
                "capacity_frontier": "Capacity frontier",
                "dropped_fraction": "Dropped fraction", "same_node_share": "Same-node share"}
    for name in PLOTS:
        if name in written:
            lines += [f"## {captions[name]}", "", f"![{captions[name]}]({written[name]})", ""]
    heatmaps = [(run, written.get(f"expert_load_{file_safe(run.name)}")) for run in runs]
    if any(f for _, f in heatmaps):
        lines += ["## Tokens per expert over time", ""]
        for run, f in heatmaps:
            if f:
                lines += [f"![Tokens per expert of {run.name}]({f})", ""]
    all_notes = [n for run in runs for n in run.notes] + notes
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path


# ---- command -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="locmoe-train report",
        description="Plot one or more runs (loss, LR, throughput, expert load, capacity, "
                    "drops, locality) and write a Markdown summary. Several runs are overlaid.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run directory (logging.run_dir) holding metrics.jsonl")
    p.add_argument("--out", default=None,
                   help="output directory (default: RUN_DIR/report for one run, ./report for "
                        "several)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``locmoe-train report``; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    _require_matplotlib()  # fail before reading anything
    paths = [os.path.normpath(p) for p in args.run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, run_names(paths))]
    out = args.out or (os.path.join(paths[0], "report") if len(paths) == 1 else "report")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} is a file: pass a directory.")
    os.makedirs(out, exist_ok=True)
    written, notes = write_plots(runs, out)
    md = write_markdown(runs, written, notes, out)
    print(f"report: {len(written)} plots and {md} for {len(runs)} run(s)")
    for run in runs:
        for note in run.notes:
            print(f"  note: {note}")
    for note in notes:
        print(f"  note: {note}")
    return 0
