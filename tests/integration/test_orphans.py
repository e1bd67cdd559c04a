"""Workers never outlive their torchrun agent, and one live run holds a run directory.

kill -9 of the agent mid-run and during start-up: within 10 s none of its
workers is left, and none published a checkpoint. A second launch on the
directory of a live run exits 2 naming the holder's pid and host; a lock
left by a killed run is taken over with a warning. Under a torchrun agent that is
PID 1 of its pid namespace (a container's exec-form entrypoint) workers start and
train; a worker adopted by an init (PID 1 that is not its agent) exits at once.
"""

from __future__ import annotations

import json
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
    # The agent's output goes to a file beside the run directory, for a failure message.
    log = open(f"{run_dir}.agent.log", "w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "locmoe_train.train",
         *ARGS, f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    agent.log_path = log.name
    return agent


def _agent_log(agent: subprocess.Popen) -> str:
    try:
        with open(agent.log_path) as f:
            return f.read()[-3000:]
    except (OSError, AttributeError):
        return ""


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
    raise AssertionError(f"the workers did not start (agent exit status {agent.poll()}):\n"
                         f"{_agent_log(agent)}")


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


# --- the agent as PID 1, as under a container's exec-form `torchrun ...` entrypoint ---

def _as_pid_1() -> list[str]:
    """A command prefix that runs its command as PID 1 of a new pid namespace."""
    tries = [["unshare", "--pid", "--fork", "--mount-proc"],
             ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]]
    errors = []
    for prefix in tries:
        try:
            r = subprocess.run(prefix + ["true"], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            pytest.skip("unshare (util-linux) is not installed: no new pid namespace, so no "
                        "process can be made PID 1 here")
        if r.returncode == 0:
            return prefix
        errors.append(r.stderr.strip())
    pytest.skip(f"unshare --pid is not permitted here ({'; '.join(errors)}): no process can "
                f"be made PID 1 of a new pid namespace")


WORKER = ("import os; from locmoe_train.parallel.orphan import die_with_launcher; "
          "die_with_launcher(); print(f'alive, parent {os.getppid()}', flush=True)")
# Waits until its first parent (the subshell SUB) has exited, so that it is adopted
# by PID 1 before it looks: an agent that died before its worker started.
ORPHAN = ("import os, time\n"
          "while os.getppid() == int(os.environ['SUB']): time.sleep(0.01)\n" + WORKER)
INIT = '( s=$BASHPID; SUB=$s python -c "$ORPHAN" 2>&1 & ) | cat'


def test_pid_1_is_the_agent_or_an_init_that_adopted_an_orphan():
    prefix = _as_pid_1()
    env = dict(os.environ, TORCHELASTIC_RUN_ID="pid1-test", ORPHAN=ORPHAN)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # PID 1 is the Python process that started the worker, as a torchrun agent is.
    agent = ("import subprocess, sys; "
             "sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1]]))")
    r = subprocess.run(prefix + [sys.executable, "-c", agent, WORKER], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "alive, parent 1\n", "")
    # PID 1 is an init (a shell) that adopted the worker of an agent already gone.
    r = subprocess.run(prefix + ["bash", "-c", INIT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.stdout == (f"error: the torchrun agent is gone (this worker was adopted by PID 1, "
                        f"'bash -c {INIT}', which is not a torchrun agent); this worker exits.\n")


def test_torchrun_as_pid_1_trains(tmp_path, tiny_data):
    prefix = _as_pid_1()
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(
        prefix + [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                  "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                  "-m", "locmoe_train.train", *ARGS, "--parallel.ep=1", "--train.max_steps=2",
                  f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: completed after 2 steps" in r.stdout
    assert json.load(open(os.path.join(run_dir, "summary.json")))["outcome"] == "completed"
