"""``locmoe-train sweep SWEEP.yaml``: run a set of experiments from one file.

A sweep file names a base config, overrides for every run, a ``grid`` of
values (cartesian product) and/or a list of ``runs``; see docs/sweeps.md.
Each run gets ``<output_dir>/<name>/`` with its resolved ``config.yaml`` and
trains in a subprocess; finished runs are skipped and unfinished ones resume
from their latest checkpoint when the sweep runs again; at the end
``summary.csv`` and ``summary.md`` hold one row per run.

This package owns the command line; ``spec`` the file and run list,
``runner`` execution and SLURM, ``summary`` the table. Exit status: 0 when
every selected run completed (or was already), 1 if any failed, 2 for bad
input (nothing runs), 130/143 when stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os

from locmoe_train.errors import UserError


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(
        prog="locmoe-train sweep",
        description="Run the experiments of a sweep file one after another (or as a SLURM "
                    "array), skipping finished runs and resuming unfinished ones.",
        epilog="Extra --section.key=value arguments apply to every run (after the sweep "
               "file's own settings).")
    ap.add_argument("sweep", help="sweep file (see configs/sweeps/)")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the runs, their settings and status; run nothing")
    ap.add_argument("--slurm", action="store_true",
                    help="write <output_dir>/sweep.sbatch (one array task per run) instead "
                         "of running")
    ap.add_argument("--index", type=int, default=None,
                    help="run only the run with this index (0-based; what a SLURM array task does)")
    ap.add_argument("--only", default=None,
                    help="comma-separated run names to run (the others stay as they are)")
    ap.add_argument("--summary-only", action="store_true",
                    help="rebuild summary.csv / summary.md from the run directories")
    ap.add_argument("--force", action="store_true",
                    help="start the selected runs again from scratch, deleting their outputs "
                         "(also for runs whose config changed)")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="show one line per run instead of the trainer's output")
    args, rest = ap.parse_known_args(argv)
    from locmoe_train.config import parse_override_args

    return args, parse_override_args(rest)


def select(sweep, index, only):
    if index is not None and only is not None:
        raise UserError("--index and --only select runs in two ways: use one of them.")
    if index is not None:
        if not 0 <= index < len(sweep.runs):
            raise UserError(f"--index {index} is out of range: {sweep.path} has "
                            f"{len(sweep.runs)} runs (0 to {len(sweep.runs) - 1}).")
        return [sweep.runs[index]]
    if only is not None:
        by_name = {r.name: r for r in sweep.runs}
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown or not names:
            raise UserError(f"--only {only!r}: no run named {unknown[0] if unknown else ''!r}; "
                            f"runs: {', '.join(by_name)}.")
        return [by_name[n] for n in names]
    return list(sweep.runs)


def dry_run(sweep, runs) -> None:
    from locmoe_train.sweep.runner import status_of

    print(f"sweep {sweep.path}: {len(sweep.runs)} runs, {sweep.nproc} rank(s) each, "
          f"outputs in {sweep.output_dir}/")
    width = max(len(r.name) for r in runs)
    for run in runs:
        settings = " ".join(o for o in run.overrides
                            if o.split("=", 1)[0] in run.settings) or "(no overrides)"
        config = os.path.relpath(run.config_path) if run.config_path else "(defaults)"
        print(f"  [{run.index}] {run.name:<{width}}  {status_of(run):<11} {config}  {settings}")


def main(argv: list[str]) -> int:
    from locmoe_train.sweep.runner import preflight, sbatch_script
    from locmoe_train.sweep.spec import load_sweep
    from locmoe_train.sweep.summary import write_summary

    args, overrides = parse_args(argv)
    sweep = load_sweep(args.sweep, overrides)
    runs = select(sweep, args.index, args.only)
    if args.dry_run:
        preflight(sweep, runs, force=True, need_data=False)
        dry_run(sweep, runs)
        return 0
    if args.summary_only:
        markdown, _ = write_summary(sweep)
        print(markdown, end="")
        return 0
    if args.slurm:
        preflight(sweep, runs, force=args.force, need_data=False)
        if args.force:
            raise UserError("--force with --slurm would delete outputs in every array task "
                            "(and again on requeue): delete the run directories instead.")
        os.makedirs(sweep.output_dir, exist_ok=True)
        path = os.path.join(sweep.output_dir, "sweep.sbatch")
        with open(path, "w") as f:
            f.write(sbatch_script(sweep, runs))
        print(f"wrote {path} ({len(runs)} array tasks); submit it with: sbatch {path}")
        return 0
    return run_sweep(sweep, runs, force=args.force, quiet=args.quiet)


def run_sweep(sweep, runs, force: bool = False, quiet: bool = False) -> int:
    """Check, run ``runs`` in order, write the table; returns the exit status."""
    import signal

    from locmoe_train.sweep.runner import Runner, preflight
    from locmoe_train.sweep.summary import write_summary

    preflight(sweep, runs, force=force, need_data=True)
    print(f"sweep {sweep.path or sweep.name}: running {len(runs)} of {len(sweep.runs)} runs, "
          f"{sweep.nproc} rank(s) each, outputs in {sweep.output_dir}/", flush=True)
    runner = Runner(sweep, force=force, quiet=quiet)
    results = runner.run_all(runs)
    markdown, rows = write_summary(sweep)
    print("\n" + markdown, end="")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; table in {os.path.join(sweep.output_dir, 'summary.md')} and summary.csv",
          flush=True)
    if runner.signum is not None:
        print(f"sweep stopped by {signal.Signals(runner.signum).name}: run the same command "
              f"again to resume", flush=True)
        return 128 + runner.signum
    failed = [name for name, status in results.items() if status == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see their train.log)", flush=True)
        return 1
    return 0
