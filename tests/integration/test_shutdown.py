"""Clean stop on a signal: every rank stops after the same step, nobody hangs."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from helpers import REPO, free_port, read_metrics

ARGS = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2", "--model.hidden_size=64",
        "--moe.num_experts=4", "--data.seq_len=32", "--train.global_batch_size=8",
        "--train.micro_batch_size=2", "--train.max_steps=100000", "--train.eval_interval=0",
        "--train.eval_samples=8", "--logging.log_interval=1", "--logging.console=false"]


def _wait_for_steps(run_dir, proc, n=2, timeout=120):
    deadline = time.time() + timeout
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and len(open(path).readlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start")


def _worker_with_rank(parent: psutil.Process, rank: str) -> psutil.Process:
    for child in parent.children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "locmoe_train.train" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigterm_single_process(tmp_path, tiny_data):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "locmoe_train.train", *ARGS, "--parallel.ep=1",
                             f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["outcome"] == "SIGTERM"
    # The last step is logged even though it was not on the log interval's grid.
    assert read_metrics(run_dir)[-1]["step"] == summary["steps"]


def test_signal_to_one_rank_stops_all(tmp_path, tiny_data):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                             "-m", "locmoe_train.train", *ARGS, "--parallel.ep=2",
                             f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_steps(run_dir, proc)
        # Only rank 1 is told to stop; rank 0 must learn it and stop at the same step.
        _worker_with_rank(psutil.Process(proc.pid), "1").send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["outcome"] == "SIGTERM"
    assert read_metrics(run_dir)[-1]["step"] == summary["steps"]
