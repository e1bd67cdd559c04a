"""The launch scripts end to end on one machine: two "nodes" joined by c10d
rendezvous over loopback, the SLURM script with stub srun/scontrol (and, on a
requeue, the run-lock override it passes), and a bad config failing once with
status 2."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, free_port, read_metrics

# EP=2 across the two nodes, so expert traffic really crosses the "node" boundary.
TINY = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--moe.num_experts=4", "--moe.top_k=2", "--parallel.ep=2", "--data.seq_len=32",
        "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=3",
        "--train.eval_interval=0", "--train.eval_samples=4", "--logging.log_interval=1"]


def launch_env(**extra) -> dict:
    """The scripts call ``python``/``torchrun``: this venv's come first on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    for key in ("NODE_RANK", "RDZV_ID", "SLURM_JOB_ID", "NPROC", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd: list[str], env: dict, log: str) -> subprocess.Popen:
    # Own session: on failure the test kills the script, torchrun and workers together.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def check_two_node_run(run_dir: str, logs: list[str]) -> None:
    texts = [open(x).read() for x in logs]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["outcome"] == "completed" and summary["steps"] == 3
    assert summary["layout"].startswith("world=2 tp=1 ep=2 etp=1 dp=2 edp=1; "
                                        "2 node(s) x 1 rank(s)")
    # Rank 0 lives on exactly one of the nodes; only it reports and writes metrics.
    assert sum("done: completed after 3 steps" in t for t in texts) == 1, texts
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]
    for t in texts:
        assert "config OK for world size 2" in t, t


@pytest.mark.slow
def test_two_nodes_on_one_machine_with_trackers(tmp_path, tiny_data):
    run_dir = str(tmp_path / "run")
    env = launch_env(NNODES=2, NPROC=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    cmd = ["bash", "launch/multinode.sh", "configs/quickstart_topk.yaml", *TINY,
           f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
           "--logging.tensorboard=true", "--logging.wandb=true"]
    # NODE_RANK unset: torchrun decides which agent hosts the rendezvous store.
    logs = [str(tmp_path / f"node{i}.log") for i in range(2)]
    codes = wait_all([start(cmd, env, log) for log in logs])
    assert codes == [0, 0], [open(x).read()[-3000:] for x in logs]
    check_two_node_run(run_dir, logs)
    for log in logs:
        assert (f"multinode: 2 node(s) x 1, rendezvous locmoe-{env['MASTER_PORT']} at "
                f"127.0.0.1:{env['MASTER_PORT']} (store host chosen by torchrun)") in open(log).read()

    # The trackers, written once (by rank 0), hold the same numbers as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main_log = next(open(x).read() for x in logs if "done: completed" in open(x).read())
    assert f"{run_dir}/tensorboard/ (tensorboard --logdir {run_dir}/tensorboard)" in main_log
    assert f"{run_dir}/wandb/ (offline, project locmoe-train)" in main_log
    assert len(glob.glob(f"{run_dir}/tensorboard/events.out.tfevents.*")) == 1
    acc = EventAccumulator(f"{run_dir}/tensorboard", size_guidance={"scalars": 0})
    acc.Reload()
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (i + 1, pytest.approx(x, rel=1e-6)) for i, x in enumerate(losses)]
    assert "moe/layer_1/tokens_per_expert" in acc.Tags()["histograms"]
    assert "moe/layer_0/same_node_share" in acc.Tags()["scalars"]
    run_id = open(f"{run_dir}/wandb/run_id").read().strip()
    (wandb_run,) = glob.glob(f"{run_dir}/wandb/offline-run-*")
    assert os.path.getsize(f"{wandb_run}/run-{run_id}.wandb") > 0


STUB_SRUN = """#!/usr/bin/env bash
# Stub: start the command once per node, in parallel, as srun --ntasks-per-node=1 would.
echo "srun $*" >> "$STUB_LOG"
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

STUB_SCONTROL = """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] || exit 1
tr , '\\n' <<< "$3"
"""


@pytest.mark.slow
def test_slurm_script_with_stub_srun(tmp_path, tiny_data):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = str(tmp_path / "run")
    port = free_port()
    env = launch_env(SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=2,
                     SLURM_JOB_NODELIST="127.0.0.1,localhost", SLURM_SUBMIT_DIR=REPO,
                     MASTER_PORT=port, NPROC=1, STUB_LOG=tmp_path / "srun.log")
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    log = str(tmp_path / "job.log")
    # sbatch runs the script from a spool directory: start it from elsewhere too.
    (code,) = wait_all([subprocess.Popen(
        ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "configs/quickstart_topk.yaml", *TINY,
         f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}"],
        cwd=str(tmp_path), env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True)])
    text = open(log).read()
    assert code == 0, text[-3000:]
    assert f"locmoe-train job 4242: 2 node(s), rendezvous at 127.0.0.1:{port}" in text
    srun = (tmp_path / "srun.log").read_text()
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c")
    check_two_node_run(run_dir, [log])
    assert text.count("config OK for world size 2") == 2  # once per node
    for role in ("node 0, hosts the rendezvous store", "node 1, rendezvous client"):
        assert f"multinode: 2 node(s) x 1, rendezvous 4242 at 127.0.0.1:{port} ({role})" in text


@pytest.mark.parametrize("env, args, message", [
    ({"NNODES": 2}, ["--parallel.ep=3"],
     "error: moe.num_experts=8 is not divisible by parallel.ep=3"),
    # Elastic 1:2 nodes: the batch must split over 1 and 2 nodes; 6 = 2 x 3 splits over 1 only.
    ({"NNODES": "1:2"}, ["--train.global_batch_size=6", "--train.micro_batch_size=2"],
     "error: train.global_batch_size (6) must be divisible by train.micro_batch_size (2) x "
     "data-parallel size (2) = 4"),
    ({"NNODES": "two"}, [], "error: NNODES=two must be a node count (e.g. 4) or a range MIN:MAX"),
])
def test_bad_config_through_wrapper_exits_2_once(tmp_path, tiny_data, env, args, message):
    run_dir = tmp_path / "run"
    log = str(tmp_path / "out.log")
    # stderr only: a wrongly started torchrun would be killed by wait_all, not left running.
    proc = subprocess.Popen(
        ["bash", "launch/multinode.sh", "configs/quickstart_topk.yaml", "--parallel.ep=1",
         f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}", *args],
        cwd=REPO, env=launch_env(NPROC=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), **env),
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    (code,) = wait_all([proc], timeout=60)
    err = open(log).read()
    assert code == 2, err
    assert err.count("error:") == 1 and message in err, err
    assert "Traceback" not in err and "torchrun" not in err
    assert not run_dir.exists()


STUB_RECORD = """#!/usr/bin/env bash
# Stub: record how it was called, start nothing.
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""


@pytest.mark.parametrize("restarts", [None, "0", "1", "3"])
def test_slurm_requeue_passes_the_lock_override(tmp_path, restarts):
    """A requeued job (SLURM_RESTART_COUNT > 0) takes over the killed attempt's run lock:
    both the --check and the torchrun of every node get --logging.take_over_lock=true
    and --checkpoint.resume=auto (it continues), ahead of the user's overrides (so an
    explicit setting wins)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL),
                       ("python", STUB_RECORD), ("torchrun", STUB_RECORD)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = launch_env(SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="n1,n2",
                     SLURM_SUBMIT_DIR=REPO, NPROC=1, STUB_LOG=tmp_path / "calls.log")
    env.pop("SLURM_RESTART_COUNT", None)
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = restarts
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "configs/x.yaml",
                        "--train.max_steps=5"], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    requeued = restarts not in (None, "0")
    over = ["--logging.take_over_lock=true", "--checkpoint.resume=auto"] if requeued else []
    args = " ".join(["--config", "configs/x.yaml", *over, "--train.max_steps=5"])
    calls = sorted(line for line in (tmp_path / "calls.log").read_text().splitlines()
                   if not line.startswith("srun "))
    assert calls == sorted(
        2 * [f"python -m locmoe_train.train --check --world-size 2 {args}"]
        + [f"torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint="
           f"n1:{20000 + 4242} --rdzv-id=4242 --rdzv-conf=is_host={host} --max-restarts=0 "
           f"-m locmoe_train.train {args}" for host in (0, 1)])
    assert ((f"requeued (SLURM_RESTART_COUNT={restarts}): passing --logging.take_over_lock=true "
             f"--checkpoint.resume=auto" in r.stdout) == requeued)
