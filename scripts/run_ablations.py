"""Run the LocMoE+ ablations and print one comparison table.

    python scripts/run_ablations.py                       # every configs/ablations/*.yaml
    python scripts/run_ablations.py --steps 100 --nproc 2 --out runs/ablations
    python scripts/run_ablations.py --table-only          # re-read finished runs

The configs run as one sweep (``locmoe_train.sweep``; the same set as
``locmoe-train sweep configs/sweeps/routers.yaml``): one run directory per
config in ``--out``, a finished run is skipped and an unfinished one resumes
from its checkpoint, ``--force`` starts them again from scratch, and the
sweep's own ``summary.md``/``summary.csv`` are written too. Then this table
(Markdown on stdout, plus ``table.md`` and ``table.json`` in ``--out``):

* train loss: the last logged training loss (mean over its log interval);
* val loss: the last validation loss (token-choice routing at evaluation);
* tokens/expert: mean tokens processed per expert per step, relative to the
  first config (the baseline); max/expert: the same for the busiest expert of
  each layer, which bounds an expert-parallel step;
* dropped: mean fraction of requested token slots dropped;
* unrouted: mean fraction of tokens that no expert processed (expert choice
  leaves some tokens without an expert without "dropping" any slot);
* same node: share of routed slots served on the token's own (simulated) node;
* cross-node MB/step: bytes the MoE layers moved between nodes per step (all
  layers and ranks, dispatch and combine);
* capacity: final C per sequence (LocMoE+ controller) where there is one;
* step time: mean seconds per step after the first log interval.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from locmoe_train.errors import UserError  # noqa: E402

DEFAULT_ORDER = ["baseline_top1_cf1.1", "locmoe_plus", "locmoe_plus_linear_decay",
                 "locmoe_plus_tcr_only", "locmoe_plus_ecr_only", "top2_dropless"]


def configs(pattern: str) -> list[str]:
    found = [p for p in sorted(glob.glob(pattern)) if not os.path.basename(p).startswith("_")]
    rank = {name: i for i, name in enumerate(DEFAULT_ORDER)}
    return sorted(found, key=lambda p: rank.get(os.path.basename(p)[:-5], len(rank)))


def run_configs(paths: list[str], out: str, nproc: int, overrides: list[str], force: bool,
                quiet: bool) -> int:
    """Run ``paths`` as one sweep (one run per config); returns its exit status."""
    from locmoe_train.config import parse_override_args
    from locmoe_train.sweep import run_sweep
    from locmoe_train.sweep.spec import build_sweep

    spec = {"output_dir": out, "nproc": nproc,
            "runs": [{"name": os.path.basename(p)[:-5], "config": os.path.abspath(p)}
                     for p in paths]}
    sweep = build_sweep(spec, "run_ablations", "ablations", REPO, parse_override_args(overrides))
    return run_sweep(sweep, sweep.runs, force=force, quiet=quiet)


def summarize(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    prev, slots, busiest, dropped, unrouted, same, steps = 0, 0.0, 0.0, [], [], [], 0
    for r in train:
        n = r["step"] - prev
        prev = r["step"]
        steps += n
        for layer in r["moe"].values():
            tpe = layer["tokens_per_expert"]
            slots += sum(tpe) / len(tpe) / len(r["moe"])
            busiest += max(tpe) / len(r["moe"])
            dropped.append(layer["dropped_fraction"])
            unrouted.append(layer["unrouted_fraction"])
            if "same_node_share" in layer:
                same.append(layer["same_node_share"])
    last_moe = train[-1]["moe"]
    caps = [layer["capacity"] for layer in last_moe.values() if "capacity" in layer]
    later = train[1:] or train
    return {
        "train_loss": train[-1]["loss"],
        "val_loss": val[-1] if val else None,
        "tokens_per_expert": slots / steps,
        "max_tokens_per_expert": busiest / steps,
        "dropped_fraction": sum(dropped) / len(dropped),
        "unrouted_fraction": sum(unrouted) / len(unrouted),
        "same_node_share": sum(same) / len(same) if same else None,
        "capacity": int(min(caps)) if caps else None,
        "cross_node_MB_per_step": (sum(r.get("bytes_cross_node", 0.0) * (r["step"] - p)
                                       for r, p in zip(train, [0] + [x["step"] for x in train]))
                                   / train[-1]["step"] / 1e6),
        "step_time_s": sum(r["step_time_s"] for r in later) / len(later),
        "steps": train[-1]["step"],
    }


def table(rows: dict[str, dict]) -> str:
    base = next(iter(rows.values()))

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| run | train loss | val loss | tokens/expert | max/expert | dropped | unrouted "
             "| same node | cross-node MB/step | capacity | step time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['train_loss']:.4f} | {f(r['val_loss'], '.4f')} | "
            f"{r['tokens_per_expert'] / base['tokens_per_expert']:.3f} | "
            f"{r['max_tokens_per_expert'] / base['max_tokens_per_expert']:.3f} | "
            f"{r['dropped_fraction']:.3f} | {r['unrouted_fraction']:.3f} | "
            f"{f(r['same_node_share'], '.3f')} | {r['cross_node_MB_per_step']:.2f} | "
            f"{f(r['capacity'], 'd')} | {r['step_time_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=os.path.join(REPO, "configs", "ablations", "*.yaml"))
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--force", action="store_true", help="re-run completed runs from scratch")
    ap.add_argument("--quiet", action="store_true", help="one line per run, not the training log")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="--section.key=value applied to every run")
    args, unknown = ap.parse_known_args(argv)
    extra = list(args.overrides) + unknown
    if args.steps is not None:
        extra.append(f"--train.max_steps={args.steps}")
    paths = configs(args.configs)
    status = 0
    if not args.table_only:
        try:
            status = run_configs(paths, args.out, args.nproc, extra, args.force, args.quiet)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    rows = {}
    for config in paths:
        name = os.path.basename(config)[:-5]
        run_dir = os.path.join(args.out, name)
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            rows[name] = summarize(run_dir)
    if not rows:
        print("no finished runs to tabulate", file=sys.stderr)
        return status or 1
    text = table(rows)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
