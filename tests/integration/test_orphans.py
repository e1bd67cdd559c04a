"""Workers never outlive their torchrun agent, and one live run holds a run directory.

kill -9 of the agent mid-run and during start-up: within 10 s none of its
workers is left, and none published a checkpoint. A second launch on the
directory of a live run exits 2 naming the holder's pid and host; a lock
left by a killed run is taken over with a warning.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from helpers import REPO, free_port, run_cli

ARGS = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2", "--model.hidden_size=64",
        "--moe.num_experts=4", "--parallel.ep=2", "--data.seq_len=32",
        "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=100000",
        "--train.eval_interval=0", "--train.eval_samples=4", "--logging.log_interval=1",
        "--logging.console=false", "--checkpoint.interval=100000"]


def _start_torchrun(tiny_data, run_dir) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "locmoe_train.train",
         *ARGS, f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _workers(agent: subprocess.Popen, timeout: float = 60) -> list[psutil.Process]:
    """The agent's two worker processes, once both exist."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = []
        for child in psutil.Process(agent.pid).children():
            try:
                if "locmoe_train.train" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def _kill_agent_and_wait(agent: subprocess.Popen, workers: list[psutil.Process]) -> float:
    """kill -9 the agent; seconds until its last worker is gone (fails after 10 s)."""
    t0 = time.time()
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:  # do not leave them behind for the rest of the suite
        p.kill()
    assert not alive, f"workers {[p.pid for p in alive]} outlived their agent by 10 s"
    return time.time() - t0


def _wait_for_steps(run_dir, agent, n=2, timeout=120):
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert agent.poll() is None
        if os.path.exists(path) and len(open(path).readlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.slow
def test_agent_killed_mid_run_takes_its_workers_and_the_lock_refuses_a_second_run(
        tmp_path, tiny_data):
    run_dir = str(tmp_path / "run")
    agent = _start_torchrun(tiny_data, run_dir)
    try:
        workers = _workers(agent)
        _wait_for_steps(run_dir, agent)
        # A second run on the same directory, while the first trains: refused.
        rank0 = next(w for w in workers if w.environ().get("RANK") == "0")
        r = run_cli(ARGS[:-1] + ["--parallel.ep=1", "--train.max_steps=1",
                                 f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"])
        refused = (f"error: {run_dir} is in use by pid {rank0.pid} on host "
                   f"{socket.gethostname()}: wait for that run to end, stop it, or give this "
                   f"run another logging.run_dir.")
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip() == refused
        # launch/local.sh's --check refuses it before torchrun would start.
        r = run_cli(ARGS + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                            "--check", "--world-size=2"])
        assert r.returncode == 2 and r.stderr.strip() == refused, r.stderr[-2000:]
        _kill_agent_and_wait(agent, workers)
    finally:
        if agent.poll() is None:
            agent.kill()
    # Nothing was published: the workers died without a clean stop's checkpoint.
    ckpt = os.path.join(run_dir, "checkpoints")
    assert not os.path.exists(ckpt) or not [n for n in os.listdir(ckpt) if n.startswith("step_")]
    # The killed run's lock is left behind, stale: the next run takes it over.
    assert os.path.exists(os.path.join(run_dir, ".lock"))
    r = run_cli(ARGS[:-1] + ["--parallel.ep=1", "--train.max_steps=1",
                             f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"warning: taking over the stale lock of {run_dir} (pid {rank0.pid} on "
            f"{socket.gethostname()} is gone)") in r.stderr
    assert not os.path.exists(os.path.join(run_dir, ".lock"))  # released at the end


@pytest.mark.slow
def test_agent_killed_during_start_up_takes_its_workers(tmp_path, tiny_data):
    run_dir = str(tmp_path / "run")
    agent = _start_torchrun(tiny_data, run_dir)
    try:
        workers = _workers(agent)  # just started: still importing torch
        _kill_agent_and_wait(agent, workers)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
