"""Running a sweep's runs: one subprocess each, skip finished, resume unfinished.

Owns a run directory's bookkeeping (``sweep_run.json``: the config the run
was started with, its status, attempts), the checks made before anything
runs, launching ``locmoe_train.train`` (through torchrun when a run has more
than one rank) with its output teed to ``train.log``, signals, and the SLURM
array script. Does not own training (the subprocess), the sweep file
(``spec.py``) or the table (``summary.py``).

A run directory holds what ``train.py`` writes (config.yaml, metrics.jsonl,
summary.json, checkpoints/) plus ``sweep_run.json``, ``train.log`` and a
``.lock`` that is held while the run trains (``runlock.py``: so two sweep processes,
e.g. SLURM array tasks sharing a file system, never train the same run at once,
and neither does a trainer started by hand).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

from locmoe_train.config import dump_config
from locmoe_train.errors import UserError
from locmoe_train.runlock import RunLock, held_by
from locmoe_train.sweep.spec import Run, Sweep, flatten_dict

RECORD = "sweep_run.json"
# Config keys that do not change what a run computes: editing them never
# makes a finished run "changed".
IGNORED_KEYS = {"logging.console", "logging.take_over_lock"}
EXIT_STOPPED = {130: "SIGINT", 143: "SIGTERM"}


# ---------------------------------------------------------------------------
# Run directory state
# ---------------------------------------------------------------------------

def read_record(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, RECORD)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)



def config_changes(started: dict, now: dict) -> list[str]:
    """Keys whose value differs between the config a run started with and the current one.

    Keys present on one side only are ignored: they come from a newer or older
    version of the schema, not from the sweep. Old spellings of renamed keys and
    values are read in today's (``config.upgrade_saved``); so is an expert-TP size
    that older versions wrote out resolved while today's leave it null."""
    from locmoe_train.config import upgrade_saved

    a, b = flatten_dict(upgrade_saved(started)), flatten_dict(upgrade_saved(now))
    if a.get("parallel.etp") is not None and b.get("parallel.etp") is None:
        b["parallel.etp"] = a["parallel.etp"]  # compared by its resolved value below
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a
            if k in b and k not in IGNORED_KEYS and a[k] != b[k]]


def _read_outcome(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("outcome")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def status_of(run: Run) -> str:
    """pending, completed, failed, stopped, running, interrupted (killed without a
    chance to record it), changed (config edited since it started) or unknown
    (a directory this sweep did not create)."""
    record = read_record(run.dir)
    if record is None:
        return "unknown" if os.path.isdir(run.dir) and os.listdir(run.dir) else "pending"
    if config_changes(record.get("config") or {}, run.cfg.to_dict()):
        return "changed"
    if _read_outcome(run.dir) == "completed":
        return "completed"
    if record.get("status") == "running":
        return "running" if held_by(run.dir) is not None else "interrupted"
    return record.get("status", "unknown")


# ---------------------------------------------------------------------------
# Checks before anything runs
# ---------------------------------------------------------------------------

def preflight(sweep: Sweep, runs: list[Run], force: bool, need_data: bool) -> None:
    """Every problem that would make a run fail at once, raised before any run starts."""
    from locmoe_train.parallel.state import check_layout

    for run in runs:
        try:
            check_layout(run.cfg.parallel, sweep.nproc, run.cfg.expert_tp)
        except UserError as e:
            raise UserError(f"{sweep.path}: run {run.name!r} with nproc={sweep.nproc}: "
                            f"{e}") from None
    if need_data:
        from locmoe_train.data.blend import data_meta, data_paths
        from locmoe_train.train import check

        metas: dict[tuple, dict] = {}
        for run in runs:
            path = tuple(data_paths(run.cfg.data))
            try:
                if path not in metas:
                    metas[path] = data_meta(run.cfg.data)
                check(copy.deepcopy(run.cfg), sweep.nproc, metas[path])
            except UserError as e:
                raise UserError(f"{sweep.path}: run {run.name!r}: {e}") from None
    if force:
        return
    problems = []
    for run in runs:
        record = read_record(run.dir)
        if record is None:
            if os.path.isdir(run.dir) and os.listdir(run.dir):
                problems.append(f"{run.dir} exists but was not started by a sweep (no {RECORD})")
            continue
        changes = config_changes(record.get("config") or {}, run.cfg.to_dict())
        if changes:
            problems.append(f"run {run.name!r} was started with another config "
                            f"({'; '.join(changes)})")
    if problems:
        raise UserError(
            "; ".join(problems) + ". Delete those run directories, give the runs other "
            "names, or pass --force to start them again from scratch.")


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(sweep: Sweep, run: Run) -> list[str]:
    config = os.path.join(run.dir, "config.yaml")
    if sweep.nproc == 1:
        return [sys.executable, "-m", "locmoe_train.train", "--config", config]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sweep.nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            "-m", "locmoe_train.train", "--config", config]


class Runner:
    """Runs selected runs one after another; signals stop the sweep after the current run."""

    def __init__(self, sweep: Sweep, force: bool = False, quiet: bool = False):
        self.sweep, self.force, self.quiet = sweep, force, quiet
        self.proc: Optional[subprocess.Popen] = None
        self.signum: Optional[int] = None
        self.signals = 0

    def _on_signal(self, signum, frame) -> None:
        # The trainer runs in its own session, so a terminal Ctrl-C reaches only
        # us; pass each signal on once: the first stops training cleanly after
        # the current step (with a checkpoint), a second one aborts it, a third kills it.
        self.signum = self.signum or signum
        self.signals += 1
        if self.proc is not None and self.proc.poll() is None:
            sig = signal.SIGKILL if self.signals >= 3 else signum
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        if self.signals == 1:
            print(f"\nsweep: {signal.Signals(signum).name} received: stopping after the current "
                  f"run saves a checkpoint (again to abort it)", file=sys.stderr, flush=True)

    def run_all(self, runs: list[Run]) -> dict[str, str]:
        """Run ``runs`` in order; returns {name: status} for those it looked at."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        results: dict[str, str] = {}
        try:
            for run in runs:
                if self.signum is not None:
                    break
                results[run.name] = self.run_one(run)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return results

    def run_one(self, run: Run) -> str:
        tag = f"[{run.index + 1}/{len(self.sweep.runs)}] {run.name}"
        status = status_of(run)
        if status == "completed" and not self.force:
            print(f"{tag}: skipped (completed)", flush=True)
            return "skipped"
        try:
            lock = RunLock.try_acquire(run.dir, run.cfg.logging.take_over_lock)
        except UserError as e:  # a lock from another host, or a failing flock
            print(f"{tag}: skipped ({e})", flush=True)
            return "busy"
        if isinstance(lock, str):
            print(f"{tag}: skipped (another process is training it: {lock})", flush=True)
            return "busy"
        try:
            if self.force:
                _clear(run.dir, keep={".lock"})
            return self._train(run, tag, lock)
        finally:
            lock.release()

    def _train(self, run: Run, tag: str, lock: RunLock) -> str:
        record = read_record(run.dir) or {"name": run.name, "attempts": 0}
        record.update(index=run.index, settings=run.settings, config=run.cfg.to_dict(),
                      nproc=self.sweep.nproc, status="running",
                      attempts=record["attempts"] + 1, started=time.strftime("%Y-%m-%d %H:%M:%S"))
        dump_config(run.cfg, os.path.join(run.dir, "config.yaml"))
        summary_path = os.path.join(run.dir, "summary.json")
        if os.path.exists(summary_path):  # a previous attempt's; this attempt writes its own
            os.remove(summary_path)
        _write_json(os.path.join(run.dir, RECORD), record)

        cmd = train_command(self.sweep, run)
        resuming = record["attempts"] > 1
        attempt = record["attempts"]
        print(f"{tag}: " + (f"resuming (attempt {attempt})" if resuming else "starting"),
              flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **lock.child_env())
        t0 = time.time()
        resumed_at = None
        with open(os.path.join(run.dir, "train.log"), "a") as log:
            log.write(f"==== {record['started']} attempt {record['attempts']}: "
                      f"{shlex.join(cmd)}\n")
            log.flush()
            # The lock's file descriptor goes to the trainer too, so the run stays
            # locked while it lives even if this process is killed.
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True,
                                         pass_fds=(lock.file.fileno(),))
            try:
                for raw in self.proc.stdout:
                    line = raw.decode("utf-8", errors="replace")
                    log.write(line)
                    log.flush()
                    if line.startswith("resumed from ") and " at step " in line:
                        resumed_at = line.rsplit(" at step ", 1)[1].strip()
                    if not self.quiet:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                rc = self.proc.wait()
            finally:
                if self.proc.poll() is None:  # an exception in this loop: do not orphan it
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
                self.proc = None
        elapsed = time.time() - t0
        outcome = _read_outcome(run.dir)
        if rc == 0 and outcome == "completed":
            status, what = "completed", "completed"
        elif (rc == 0 and outcome == "exit_at_step") or rc in EXIT_STOPPED or self.signum:
            status = "stopped"
            what = f"stopped ({outcome or EXIT_STOPPED.get(rc, f'exit {rc}')}; re-run to resume)"
        else:
            status, what = "failed", f"failed (exit status {rc})"
        record.update(status=status, returncode=rc, wall_s=round(elapsed, 1),
                      ended=time.strftime("%Y-%m-%d %H:%M:%S"))
        _write_json(os.path.join(run.dir, RECORD), record)
        note = f", resumed at step {resumed_at}" if resumed_at else ""
        print(f"{tag}: {what} in {elapsed:.0f} s{note}", flush=True)
        if status == "failed":
            log_path = os.path.join(run.dir, "train.log")
            if self.quiet:
                print(_tail(log_path, 15), file=sys.stderr, flush=True)
            print(f"{tag}: its output is in {log_path}", flush=True)
        return status


def _clear(run_dir: str, keep: set[str]) -> None:
    for name in os.listdir(run_dir):
        if name in keep:
            continue
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _tail(path: str, n: int) -> str:
    with open(path, errors="replace") as f:
        lines = f.readlines()[-n:]
    return "".join("    " + line for line in lines).rstrip()


# ---------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------

def sbatch_script(sweep: Sweep, runs: list[Run]) -> str:
    """A SLURM array script with one task per run; each task runs ``sweep --index I``."""
    options = {"job-name": f"sweep-{sweep.name}", "nodes": 1, "ntasks-per-node": 1,
               "output": os.path.join(os.path.abspath(sweep.output_dir), "slurm-%A_%a.out")}
    setup = []
    max_parallel = None
    for key, value in sweep.slurm.items():
        name = str(key).replace("_", "-")
        if name == "setup":
            setup = value if isinstance(value, list) else [value]
            if not all(isinstance(line, str) for line in setup):
                raise UserError(f"{sweep.path}: slurm.setup must be a shell line or a list of "
                                f"them (e.g. 'source .venv/bin/activate'), got {value!r}.")
            continue
        if name == "max-parallel":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{sweep.path}: slurm.max_parallel={value!r} must be a positive "
                                f"integer (how many array tasks may run at once).")
            max_parallel = value
            continue
        if name == "array":
            raise UserError(f"{sweep.path}: slurm.array is set by the sweep (one task per run); "
                            f"use slurm.max_parallel to limit how many run at once.")
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"{sweep.path}: slurm.{key}={value!r} must be a single value "
                            f"(it becomes #SBATCH --{name}=VALUE).")
        options[name] = value
    indices = [r.index for r in runs]
    if indices == list(range(indices[0], indices[-1] + 1)):
        array = f"{indices[0]}-{indices[-1]}"
    else:
        array = ",".join(map(str, indices))
    if max_parallel:
        array += f"%{max_parallel}"
    lines = ["#!/bin/bash",
             f"# {len(runs)} runs of sweep {sweep.path or sweep.name}, one array task each "
             f"(written by `locmoe-train sweep --slurm`).",
             f"# Submit: sbatch {os.path.join(sweep.output_dir, 'sweep.sbatch')}",
             f"#SBATCH --array={array}"]
    for name, value in options.items():
        lines.append(f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={value}")
    cmd = [sys.executable, "-m", "locmoe_train.train", "sweep", os.path.abspath(sweep.path),
           "--index", "$SLURM_ARRAY_TASK_ID", *(f"--{o}" for o in sweep.cli_overrides)]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", *setup,
              'PYTHON=${LOCMOE_PYTHON:-' + shlex.quote(sys.executable) + '}',
              # A finished run is skipped and an unfinished one resumes, so a
              # requeued or resubmitted task picks up where it stopped.
              " ".join(['"$PYTHON"'] + [shlex.quote(c) if c != "$SLURM_ARRAY_TASK_ID"
                                         else '"$SLURM_ARRAY_TASK_ID"' for c in cmd[1:]])]
    return "\n".join(lines) + "\n"
