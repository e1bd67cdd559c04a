"""The tables of docs/locmoe_plus.md from a finished ``configs/sweeps/locmoe_plus.yaml``.

    locmoe-train sweep configs/sweeps/locmoe_plus.yaml
    python scripts/locmoe_plus_results.py runs/sweeps/locmoe_plus [--baseline top1_cf1.1]
        [--no-locality locmoe_plus] [--locality locmoe_plus_locality] [--json out.json]

Per run (Markdown on stdout): final val loss (token-choice evaluation) and its change
against the baseline; tokens processed per expert per step over the whole run and
its ratio to the baseline (the capacity frontier's x axis); dropped fraction, same-node
share and cross-node MB per step, each averaged over all records (the last record's
same-node share and cross-node MB as well); the capacity C per
layer at the end and the number of capacity changes. Then the issue-14 checks:
tokens per expert and val loss of every LocMoE+ run against the baseline, the
fixed-capacity frontier at each LocMoE+ run's tokens per expert (linear between the
neighbouring fixed runs of the same top-k), and locality on against off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from locmoe_train.report.runs import capacity_kind, load_run, mean_tokens_per_expert  # noqa: E402


def _window_mean(train: list[dict], key: str, per_layer: bool = True):
    """Mean of ``key`` over the run, each record weighted by the steps it covers."""
    total = steps = prev = 0
    for r in train:
        if per_layer:
            vals = [e[key] for e in r.get("moe", {}).values()
                    if isinstance(e, dict) and e.get(key) is not None]
            value = sum(vals) / len(vals) if vals else None
        else:
            value = r.get(key)
        if value is not None:
            total += value * (r["step"] - prev)
            steps += r["step"] - prev
        prev = r["step"]
    return total / steps if steps else None


def summarize(run_dir: str) -> dict:
    run = load_run(run_dir, os.path.basename(run_dir.rstrip("/")))
    last = run.train[-1]
    caps = [e.get("capacity") for e in last.get("moe", {}).values() if isinstance(e, dict)]
    changes = sum(len(r.get("capacity_events", [])) for r in run.train)
    moe = run.config.get("moe", {})
    return {
        "name": run.name, "kind": capacity_kind(run), "router": moe.get("router"),
        "top_k": moe.get("top_k"), "steps": last["step"],
        "val_loss": run.evals[-1]["val_loss"] if run.evals else None,
        "tokens_per_expert": mean_tokens_per_expert(run.train),
        "dropped": _window_mean(run.train, "dropped_fraction"),
        "same_node": _window_mean(run.train, "same_node_share"),
        "cross_node_MB": (_window_mean(run.train, "bytes_cross_node", per_layer=False) or 0) / 1e6,
        "same_node_end": _window_mean(run.train[-1:], "same_node_share"),
        "cross_node_MB_end": (last.get("bytes_cross_node") or 0) / 1e6,
        "capacity_end": [c for c in caps if c is not None],
        "capacity_changes": changes,
        "wall_s": run.summary.get("wall_time_s"),
    }


def frontier_at(rows: list[dict], top_k, x: float):
    """Val loss of the fixed-capacity line (same top-k) at tokens per expert ``x``."""
    pts = sorted((r["tokens_per_expert"], r["val_loss"]) for r in rows
                 if r["kind"] == "fixed" and r["router"] == "topk" and r["top_k"] == top_k
                 and r["val_loss"] is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return None  # outside the measured range


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--baseline", default="top1_cf1.1")
    ap.add_argument("--no-locality", default="locmoe_plus")
    ap.add_argument("--locality", default="locmoe_plus_locality")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [summarize(os.path.join(args.sweep_dir, d)) for d in sorted(os.listdir(args.sweep_dir))
            if os.path.isfile(os.path.join(args.sweep_dir, d, "metrics.jsonl"))]
    by = {r["name"]: r for r in rows}
    base = by.get(args.baseline)
    print("| run | steps | val loss | vs baseline | tokens/expert/step | vs baseline | dropped "
          "| same node (mean / end) | cross-node MB/step (mean / end) | C at the end (per layer) "
          "| C changes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        dv = (f"{100 * (r['val_loss'] / base['val_loss'] - 1):+.2f}%"
              if base and r["val_loss"] and base["val_loss"] else "-")
        dt = (f"{r['tokens_per_expert'] / base['tokens_per_expert']:.3f}"
              if base and r["tokens_per_expert"] else "-")
        caps = "/".join(f"{c:g}" for c in r["capacity_end"]) or "-"
        print(f"| {r['name']} | {r['steps']} | {r['val_loss']:.4f} | {dv} | "
              f"{r['tokens_per_expert']:.1f} | {dt} | {r['dropped']:.3f} | "
              f"{r['same_node']:.3f} / {r['same_node_end']:.3f} | "
              f"{r['cross_node_MB']:.2f} / {r['cross_node_MB_end']:.2f} | {caps} | "
              f"{r['capacity_changes']} |")
    print()
    for r in rows:
        if r["router"] != "locmoe_plus" or r["val_loss"] is None:
            continue
        front = frontier_at(rows, r["top_k"], r["tokens_per_expert"])
        where = ("outside the fixed runs' range" if front is None else
                 f"frontier {front:.4f} there: {'on or below' if r['val_loss'] <= front else 'above'}"
                 f" ({r['val_loss'] - front:+.4f})")
        print(f"- {r['name']}: tokens/expert {r['tokens_per_expert']:.1f}; {where}")
    off, on = by.get(args.no_locality), by.get(args.locality)
    if off and on:
        print(f"- locality: same-node share {off['same_node']:.3f} -> {on['same_node']:.3f} "
              f"(at the end {off['same_node_end']:.3f} -> {on['same_node_end']:.3f}); "
              f"cross-node MB/step {off['cross_node_MB']:.2f} -> {on['cross_node_MB']:.2f} "
              f"({100 * (on['cross_node_MB'] / off['cross_node_MB'] - 1):+.1f}%; at the end "
              f"{100 * (on['cross_node_MB_end'] / off['cross_node_MB_end'] - 1):+.1f}%); val loss "
              f"{off['val_loss']:.4f} -> {on['val_loss']:.4f} "
              f"({100 * (on['val_loss'] / off['val_loss'] - 1):+.2f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
