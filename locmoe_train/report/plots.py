"""The report's PNG plots, drawn with matplotlib's object API on the Agg canvas.

Owns figure sizes and styles, one figure per metric with the runs overlaid,
and the per-run expert-load heatmaps. No pyplot state or display is involved.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from locmoe_train.errors import UserError
from locmoe_train.report.runs import (Run, capacity_kind, capacity_trajectory, file_safe,
                                      layer_mean, tokens_per_expert_per_step)


# Every line plot is FIG_SIZE inches at DPI; the heatmaps are FIG_SIZE[0] wide and
# grow with the number of layers (see _heatmap_height). Tests check these pixel sizes.
DPI = 100
FIG_SIZE = (9.0, 5.0)
# Loss axes are logarithmic when the largest loss is this many times the smallest.
LOG_LOSS_RATIO = 2.5
PLOTS = ("loss", "lr", "tokens_per_s", "imbalance", "capacity", "capacity_frontier",
         "dropped_fraction", "same_node_share")


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
        steps, mean, lo, hi = layer_mean(run, key)
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
        steps, caps, rollbacks = capacity_trajectory(run, layer)
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


def frontier_points(runs: list[Run]) -> list[dict]:
    """Per run with a final val loss and MoE counts: name, kind (``capacity_kind``), router,
    top_k, tokens per expert per step and the final val loss."""
    points = []
    for run in runs:
        tpe = tokens_per_expert_per_step(run)
        if tpe is None or not run.evals:
            continue
        moe = run.config.get("moe") or {}
        points.append({"name": run.name, "kind": capacity_kind(run), "router": moe.get("router"),
                       "top_k": moe.get("top_k"),
                       "tokens_per_expert": tpe, "val_loss": run.evals[-1]["val_loss"]})
    return points


def _plot_frontier(fig, points: list[dict]) -> None:
    """Final val loss against tokens processed per expert: fixed-capacity runs as a line
    per (router, top-k) (the frontier), the others as labelled points."""
    ax = fig.add_subplot()
    fixed: dict = {}
    for p in points:
        if p["kind"] == "fixed":
            fixed.setdefault((str(p["router"]), str(p["top_k"])), []).append(p)
    for ((router, k), group), color in zip(sorted(fixed.items()), _colors(max(1, len(fixed)))):
        group.sort(key=lambda p: p["tokens_per_expert"])
        ax.plot([p["tokens_per_expert"] for p in group], [p["val_loss"] for p in group],
                color=color, marker="o", linewidth=2,
                label=f"fixed capacity, {router} top-{k}")
        for p in group:
            ax.annotate(p["name"], (p["tokens_per_expert"], p["val_loss"]), fontsize="small",
                        textcoords="offset points", xytext=(4, 4))
    markers = {"adaptive": ("*", 16), "dropless": ("s", 9), "unknown": ("D", 8)}
    others = [p for p in points if p["kind"] != "fixed"]
    for p, color in zip(others, _colors(len(others) + len(fixed))[len(fixed):]):
        marker, size = markers[p["kind"]]
        ax.plot([p["tokens_per_expert"]], [p["val_loss"]], linestyle="none", marker=marker,
                markersize=size, color=color, label=f"{p['name']} ({p['kind']})")
    ax.set_title("Capacity frontier: final val loss against tokens processed per expert")
    ax.set_xlabel("tokens processed per expert per step (mean over the run, experts, layers)")
    ax.set_ylabel("final val loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


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

    def plot(name: str, draw, available: bool = True, missing: str = "") -> None:
        """Draw ``name`` with ``draw(fig)`` when ``available``, else note ``missing``."""
        if not available:
            notes.append(missing)
            return
        fig = new_figure()
        draw(fig)
        save(fig, name)

    points = frontier_points(runs)
    plot("loss", lambda fig: _plot_loss(fig, runs))
    plot("lr", lambda fig: _plot_series(fig, runs, "lr", "Learning rate", "learning rate"))
    plot("tokens_per_s", lambda fig: _plot_series(
        fig, runs, "tokens_per_s", "Throughput (tokens/s, all ranks)", "tokens / s",
        bottom=0.0, thousands=True))
    plot("imbalance", lambda fig: _plot_series(
        fig, runs, "moe_imbalance", "Expert load imbalance (max/mean tokens per expert, "
        "worst layer)", "max / mean (1 = balanced)", bottom=1.0),
         any("moe_imbalance" in r for run in runs for r in run.train),
         "no imbalance plot: no run logged MoE statistics")
    plot("capacity", lambda fig: _plot_capacity(fig, runs), has("capacity"),
         "no capacity plot: no run has a capacity (only moe.router=locmoe_plus with an "
         "expert-choice stage logs one)")
    plot("capacity_frontier", lambda fig: _plot_frontier(fig, points), len(points) >= 2,
         "no capacity-frontier plot: it needs two or more runs with a val loss and MoE counts")
    plot("dropped_fraction", lambda fig: _plot_layer_mean(
        fig, runs, "dropped_fraction", "Dropped fraction of routed slots", "dropped fraction"),
         has("dropped_fraction"), "no dropped-fraction plot: no run logged MoE statistics")
    plot("same_node_share", lambda fig: _plot_layer_mean(
        fig, runs, "same_node_share", "Share of routed tokens on an expert of their own node",
        "same-node share"),
         has("same_node_share"), "no same-node plot: no run logged locality statistics")
    for run in runs:
        fig = _plot_expert_load(new_figure, run)
        name = f"expert_load_{file_safe(run.name)}"
        if fig is None:
            notes.append(f"no expert-load heatmap for {run.name}: no tokens-per-expert counts")
            continue
        save(fig, name)
    return written, notes


