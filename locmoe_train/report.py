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
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from locmoe_train.errors import UserError

# Every line plot is FIG_SIZE inches at DPI; the heatmaps are FIG_SIZE[0] wide and
# grow with the number of layers (see _heatmap_height). Tests check these pixel sizes.
DPI = 100
FIG_SIZE = (9.0, 5.0)
# Loss axes are logarithmic when the largest loss is this many times the smallest.
LOG_LOSS_RATIO = 2.5
PLOTS = ("loss", "lr", "tokens_per_s", "imbalance", "capacity", "dropped_fraction",
         "same_node_share")


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
def _layer_values(run: Run, key: str, layer: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in run.train:
        v = r.get("moe", {}).get(layer, {}).get(key)
        if v is not None:
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _layer_mean(run: Run, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
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


def _final_layer_mean(run: Run, key: str) -> Optional[float]:
    steps, mean, _, _ = _layer_mean(run, key)
    return mean[-1] if steps and steps[-1] == run.train[-1]["step"] else None


def _capacity_trajectory(run: Run, layer: str) -> tuple[list[int], list[float], list[tuple]]:
    """Logged capacity merged with the exact change events; rollbacks returned separately."""
    layer_id = int(layer.rsplit("_", 1)[-1])
    points = dict(zip(*_layer_values(run, "capacity", layer)))
    rollbacks = []
    for r in run.train:
        for e in r.get("capacity_events", []):
            if e.get("layer") == layer_id:
                points.setdefault(e["step"], float(e["new"]))
                if e.get("reason") == "rollback":
                    rollbacks.append((e["step"], float(e["new"])))
    steps = sorted(points)
    return steps, [points[s] for s in steps], rollbacks


# ---- plots ---------------------------------------------------------------------
def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("locmoe-train report needs matplotlib, which is not installed: "
                        "pip install 'locmoe-train[report]'") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new_figure(size=FIG_SIZE):
        fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    return new_figure


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _widths(n: int, widest: float = 3.0) -> list[float]:
    # Runs often coincide (same schedule, one node): earlier runs are drawn wider,
    # later ones narrower on top, so every overlaid line stays visible.
    return [2.0] if n == 1 else [widest - (widest - 1.5) * i / (n - 1) for i in range(n)]


def _style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _plot_loss(fig, runs: list[Run]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax = fig.add_subplot()
    for run, c, lw in zip(runs, _colors(len(runs)), _widths(len(runs))):
        ax.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=c,
                linewidth=lw, label=run.name)
        if run.evals:
            ax.plot([r["step"] for r in run.evals], [r["val_loss"] for r in run.evals],
                    color=c, linewidth=lw, linestyle="--", marker="o", markersize=5)
    losses = [r["loss"] for run in runs for r in run.train] + \
             [r["val_loss"] for run in runs for r in run.evals]
    log = min(losses) > 0 and max(losses) / min(losses) > LOG_LOSS_RATIO
    if log:
        # LM losses fall fast at first (ln V -> ~2); a log axis keeps the slow tail readable.
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    _style(ax, "Loss (train: solid, validation: dashed)",
           "cross-entropy" + (" (log scale)" if log else ""))
    styles = [Line2D([], [], color="0.3", label="train"),
              Line2D([], [], color="0.3", linestyle="--", marker="o", label="validation")]
    if len(runs) > 1:
        fig.add_artist(ax.legend(title="run", loc="upper right"))
        ax.legend(handles=styles, loc="upper center")
    else:
        ax.legend(handles=styles, loc="upper right")


def _plot_series(fig, runs: list[Run], key: str, title: str, ylabel: str,
                 bottom: Optional[float] = None, thousands: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter

    ax = fig.add_subplot()
    for run, c, lw in zip(runs, _colors(len(runs)), _widths(len(runs))):
        pts = [(r["step"], r[key]) for r in run.train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), color=c, linewidth=lw, label=run.name,
                    marker="." if len(pts) < 40 else None)
    if bottom is not None:
        ax.set_ylim(bottom=bottom)
    if thousands:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    _style(ax, title, ylabel)
    if len(runs) > 1:
        ax.legend(title="run")


def _plot_layer_mean(fig, runs: list[Run], key: str, title: str, ylabel: str) -> None:
    ax = fig.add_subplot()
    banded = False
    for run, c, lw in zip(runs, _colors(len(runs)), _widths(len(runs))):
        steps, mean, lo, hi = _layer_mean(run, key)
        if not steps:
            continue
        ax.plot(steps, mean, color=c, linewidth=lw, label=run.name,
                marker="." if len(steps) < 40 else None)
        if any(b - a > 1e-6 for a, b in zip(lo, hi)):
            ax.fill_between(steps, lo, hi, color=c, alpha=0.2, linewidth=0)
            banded = True
    ax.set_ylim(-0.02, 1.02)
    _style(ax, title, ylabel + (" (line: layer mean, band: min-max)" if banded
                                else " (mean over MoE layers)"))
    if len(runs) > 1:
        ax.legend(title="run")


def _capacity_groups(run: Run) -> list[tuple]:
    """(label, steps, capacities, rollbacks) per distinct trajectory; layers that share
    one (schedules, fixed C, the same cuts) draw as one line instead of hiding each other."""
    groups: dict[tuple, list[int]] = {}
    for layer in run.layers:
        steps, caps, rollbacks = _capacity_trajectory(run, layer)
        if steps:
            key = (tuple(steps), tuple(caps), tuple(rollbacks))
            groups.setdefault(key, []).append(int(layer.rsplit("_", 1)[-1]))
    out = []
    for (steps, caps, rollbacks), ids in groups.items():
        label = ("all layers" if len(groups) == 1 and len(ids) > 1 else
                 f"layer {ids[0]}" if len(ids) == 1 else
                 "layers " + ", ".join(map(str, ids)))
        out.append((label, list(steps), list(caps), list(rollbacks)))
    return out


def _plot_capacity(fig, runs: list[Run]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    many = len(runs) > 1
    dashes = ["-", "--", ":", "-."]
    for run, run_color, lw in zip(runs, _colors(len(runs)), _widths(len(runs))):
        curves = _capacity_groups(run)
        if not curves:
            continue
        layer_colors, layer_widths = _colors(len(curves)), _widths(len(curves), widest=5.0)
        for li, (label, steps, caps, rollbacks) in enumerate(curves):
            # One run: a colour per layer. Several: a colour per run, a dash per layer.
            color = run_color if many else layer_colors[li]
            ax.plot(steps, caps, drawstyle="steps-post", color=color,
                    linewidth=lw if many else layer_widths[li],
                    linestyle=dashes[li % len(dashes)] if many else "-",
                    label=f"{run.name}: {label}" if many else label)
            if rollbacks:
                ax.plot(*zip(*rollbacks), linestyle="none", marker="x", color=color,
                        markersize=9, markeredgewidth=2)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax, "Expert capacity C per MoE layer (x: rollback of a cut)",
           "C (tokens per expert per sequence)")
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(ncols=max(1, math.ceil(len(handles) / 12)), fontsize="small", loc="lower left")


def _heatmap_height(n_layers: int) -> float:
    return 1.0 + 2.0 * n_layers


def _plot_expert_load(new_figure, run: Run):
    """Time x expert heatmap per MoE layer: tokens per expert over the record's mean."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    layers = [l for l in run.layers if any("tokens_per_expert" in r.get("moe", {}).get(l, {})
                                           for r in run.train)]
    if not layers:
        return None
    fig = new_figure((FIG_SIZE[0], _heatmap_height(len(layers))))
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    grids = []
    for layer in layers:
        rows = [(r["step"], r["moe"][layer]["tokens_per_expert"]) for r in run.train
                if "tokens_per_expert" in r.get("moe", {}).get(layer, {})]
        counts = np.asarray([c for _, c in rows], dtype=float)
        mean = counts.mean(axis=1, keepdims=True)
        rel = np.divide(counts, mean, out=np.full_like(counts, np.nan), where=mean > 0)
        # A record averages the steps since the previous one: its cell spans them.
        edges = np.asarray([0] + [s for s, _ in rows], dtype=float)
        grids.append((edges, rel))
    vmax = max(2.0, max(float(np.nanmax(g)) for _, g in grids if np.isfinite(g).any()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    for ax, layer, (edges, rel) in zip(axes, layers, grids):
        n_exp = rel.shape[1]
        mesh = ax.pcolormesh(edges, np.arange(n_exp + 1) - 0.5, rel.T, cmap="RdBu_r", norm=norm)
        ax.set_ylabel("expert")
        ax.set_title(f"{layer.replace('_', ' ')}: max/mean at the end "
                     f"{np.nanmax(rel[-1]):.2f}", fontsize="medium")
        stride = max(1, math.ceil(n_exp / 8))  # at most 8 labels per 2-inch panel
        ax.set_yticks(range(0, n_exp, stride))
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{run.name}: tokens per expert / mean over experts "
                 f"(1 = even, red = over, blue = under)")
    fig.colorbar(mesh, ax=list(axes), label="tokens / mean", shrink=0.9)
    return fig


def write_plots(runs: list[Run], out: str) -> tuple[dict[str, str], list[str]]:
    """Writes the PNGs; returns {plot name: file name} and notes on plots left out."""
    new_figure = _require_matplotlib()
    written, notes = {}, []

    def save(fig, name: str) -> None:
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=DPI)
        written[name] = f"{name}.png"

    def has(key: str) -> bool:
        return any(e.get(key) is not None for run in runs for r in run.train
                   for e in r.get("moe", {}).values())

    fig = new_figure()
    _plot_loss(fig, runs)
    save(fig, "loss")
    fig = new_figure()
    _plot_series(fig, runs, "lr", "Learning rate", "learning rate")
    save(fig, "lr")
    fig = new_figure()
    _plot_series(fig, runs, "tokens_per_s", "Throughput (tokens/s, all ranks)", "tokens / s",
                 bottom=0.0, thousands=True)
    save(fig, "tokens_per_s")
    if any("moe_imbalance" in r for run in runs for r in run.train):
        fig = new_figure()
        _plot_series(fig, runs, "moe_imbalance",
                     "Expert load imbalance (max/mean tokens per expert, worst layer)",
                     "max / mean (1 = balanced)", bottom=1.0)
        save(fig, "imbalance")
    else:
        notes.append("no imbalance plot: no run logged MoE statistics")
    if has("capacity"):
        fig = new_figure()
        _plot_capacity(fig, runs)
        save(fig, "capacity")
    else:
        notes.append("no capacity plot: no run has a capacity (only moe.router=locmoe_plus "
                     "with an expert-choice stage logs one)")
    if has("dropped_fraction"):
        fig = new_figure()
        _plot_layer_mean(fig, runs, "dropped_fraction", "Dropped fraction of routed slots",
                         "dropped fraction")
        save(fig, "dropped_fraction")
    else:
        notes.append("no dropped-fraction plot: no run logged MoE statistics")
    if has("same_node_share"):
        fig = new_figure()
        _plot_layer_mean(fig, runs, "same_node_share",
                         "Share of routed tokens on an expert of their own node",
                         "same-node share")
        save(fig, "same_node_share")
    else:
        notes.append("no same-node plot: no run logged locality statistics")
    for run in runs:
        fig = _plot_expert_load(new_figure, run)
        name = f"expert_load_{file_safe(run.name)}"
        if fig is None:
            notes.append(f"no expert-load heatmap for {run.name}: no tokens-per-expert counts")
            continue
        save(fig, name)
    return written, notes


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
        "dropped": _final_layer_mean(run, "dropped_fraction"),
        "same_node": _final_layer_mean(run, "same_node_share"),
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


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
