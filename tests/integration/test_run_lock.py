"""The run lock of a real training run where the lock cannot be checked or enforced.

A lock file left on another host by a killed run (a SLURM job before its
requeue) refuses the run, in ``--check`` too, with a message that names the
override; ``logging.take_over_lock=true`` takes it over and trains. On a file
system without flock (the syscall fails with ENOSYS, as on Lustre without
``-o flock``) the run trains with a warning. ``launch/slurm.sbatch`` passes the
override on a requeue only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess

import pytest

from helpers import REPO
from locmoe_train import runlock
from locmoe_train.train import main

TINY = ["--config", os.path.join(REPO, "configs/quickstart_topk.yaml"), "--model.num_layers=2",
        "--model.hidden_size=64", "--moe.num_experts=4", "--parallel.ep=1", "--data.seq_len=32",
        "--train.global_batch_size=2", "--train.micro_batch_size=2", "--train.max_steps=1",
        "--train.eval_interval=0", "--train.eval_samples=4", "--logging.console=false",
        "--checkpoint.interval=0"]


def _trained(run_dir) -> bool:
    try:
        return json.load(open(os.path.join(run_dir, "summary.json")))["outcome"] == "completed"
    except FileNotFoundError:
        return False


def test_a_stale_lock_from_another_host_needs_the_override(tmp_path, tiny_data, capsys,
                                                           megatron_reset):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    lock = os.path.join(run_dir, ".lock")
    with open(lock, "w") as f:
        json.dump({"pid": 4242, "host": "node17"}, f)
    args = TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"]
    refused = (f"error: {lock} names pid 4242 on host node17, which cannot be checked from "
               f"{socket.gethostname()}. If no run is alive there (a killed or requeued job), "
               f"start again with --logging.take_over_lock=true (launch/slurm.sbatch passes it "
               f"on a requeue), or delete {lock}.\n")
    for extra in (["--check", "--world-size=1"], []):
        assert main(args + extra) == 2
        assert capsys.readouterr().err == refused
    assert not _trained(run_dir)
    assert json.load(open(lock)) == {"pid": 4242, "host": "node17"}
    over = args + ["--logging.take_over_lock=true"]
    assert main(over + ["--check", "--world-size=1"]) == 0
    assert main(over) == 0
    assert capsys.readouterr().err == (
        f"warning: taking over the lock of {run_dir} left by pid 4242 on host node17 "
        f"(logging.take_over_lock=true: no run is alive there)\n")
    assert _trained(run_dir)
    assert not os.path.exists(lock)  # released at the end


def test_a_file_system_without_flock_trains_with_a_warning(tmp_path, tiny_data, capsys,
                                                          monkeypatch, megatron_reset):
    def flock(f, op):  # what the syscall answers on Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(runlock.fcntl, "flock", flock)
    monkeypatch.setattr(runlock, "_warned", set(), raising=False)
    run_dir = str(tmp_path / "run")
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,TARGET", "--target", str(tmp_path)],
                        capture_output=True, text=True, check=True).stdout.split()
    assert main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"]) == 0
    assert capsys.readouterr().err == (
        f"warning: the run lock {run_dir}/.lock is not enforced: its file system ({fs[0]} at "
        f"{fs[1]}) does not support flock (ENOSYS: Function not implemented); this run goes "
        f"on, but nothing stops a second run on {run_dir}: make sure only one run uses it.\n")
    assert _trained(run_dir)
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
