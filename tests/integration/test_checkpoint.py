"""Checkpoint and resume through the real CLI: exact resume, resharding, damaged and
incompatible checkpoints, and a kill -9 in the middle of a save."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import hooks
from helpers import REPO, checkpoint_tensors, read_metrics, run_cli

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2", "--model.hidden_size=64",
        "--model.num_attention_heads=4", "--moe.num_experts=4", "--moe.top_k=2",
        "--data.seq_len=32", "--train.global_batch_size=8", "--train.micro_batch_size=2",
        "--train.max_steps=6", "--train.eval_interval=0", "--train.eval_samples=8",
        "--optim.warmup_steps=2", "--optim.lr=5e-3", "--logging.log_interval=1",
        "--logging.console=false", "--checkpoint.interval=3", "--parallel.ep=1"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


def shards(run_dir, step):
    """Every tensor of the checkpoint of ``step``, whole (whatever layout wrote it)."""
    return checkpoint_tensors(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"))


def train(tmp_path, tiny_data, name, extra, nproc=1):
    run_dir = tmp_path / name
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}", *extra],
                nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run_dir, r


@pytest.mark.parametrize("nproc, layout", [(1, ["--parallel.ep=1"]), (2, ["--parallel.ep=2"])])
def test_resume_is_bit_exact(tmp_path, tiny_data, nproc, layout):
    straight, _ = train(tmp_path, tiny_data, "straight", layout, nproc)
    split, _ = train(tmp_path, tiny_data, "split", layout + ["--train.exit_at_step=3"], nproc)
    assert max(losses(split)) == 3
    _, r = train(tmp_path, tiny_data, "split", layout + ["--checkpoint.resume=auto"], nproc)
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert losses(split) == losses(straight)  # every step, bit for bit
    a, b = shards(straight, 6), shards(split, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("optim/") for k in a)


def test_resume_with_other_layout(tmp_path, tiny_data):
    """Saved at EP=2 on 2 ranks, resumed on 1 rank and at TP=2: model and Adam reshard."""
    straight, _ = train(tmp_path, tiny_data, "straight", ["--parallel.ep=2"], 2)
    split, _ = train(tmp_path, tiny_data, "split", ["--parallel.ep=2", "--train.exit_at_step=3"], 2)
    ckpt = os.path.join(split, "checkpoints", "step_00000003")
    for name, extra, nproc in [("one_rank", ["--parallel.ep=1"], 1),
                               ("tp2", ["--parallel.tp=2"], 2)]:
        run_dir, r = train(tmp_path, tiny_data, name,
                           ["--checkpoint.resume=" + ckpt, *extra], nproc)
        assert "layout changed" in r.stdout
        got, want = losses(run_dir), losses(straight)
        assert sorted(got) == [4, 5, 6]
        for step in got:  # same math, other reduction order: equal to float rounding
            assert got[step] == pytest.approx(want[step], rel=1e-5), (name, step)


def test_damaged_and_incompatible_checkpoints(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, tiny_data, "run", ["--parallel.ep=1"])
    ckdir = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["latest", "step_00000003", "step_00000006"]
    # Truncate the newest checkpoint's shard file.
    shard = os.path.join(ckdir, "step_00000006", "shards_rank00000.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    before = sorted(os.listdir(ckdir))
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={tmp_path / 'x'}",
                        "--checkpoint.resume=" + os.path.join(ckdir, "step_00000006")])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "shards_rank00000.safetensors has" in r.stderr and "truncated" in r.stderr
    # auto skips the damaged one with a warning and resumes from step 3.
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                        "--checkpoint.resume=auto", "--train.max_steps=6"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: skipping checkpoint" in r.stderr and "at step 3" in r.stdout
    # A different model: exit 2, naming what differs, writing nothing.
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={tmp_path / 'y'}",
                        "--model.hidden_size=32", "--checkpoint.resume="
                        + os.path.join(ckdir, "step_00000003")])
    assert r.returncode == 2
    assert "model.hidden_size: checkpoint has 64, this run has 32" in r.stderr
    assert not os.path.exists(tmp_path / "y" / "checkpoints")
    assert before[0] == "latest"


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               **hooks.env_for("slow_save", LOCMOE_TEST_SLOW_SAVE="30"))
    cmd = [sys.executable, "-m", "locmoe_train.train", *TINY, f"--data.path={tiny_data}",
           f"--logging.run_dir={run_dir}", "--train.max_steps=9"]
    # First a run that completes its step-3 and step-6 saves quickly...
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                        "--train.max_steps=9", "--train.exit_at_step=6"])
    assert r.returncode == 0
    # ...then one that is killed with SIGKILL while writing its step-9 checkpoint.
    proc = subprocess.Popen(cmd + ["--checkpoint.resume=auto"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp_dir = os.path.join(run_dir, "checkpoints", "step_00000009.tmp")
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(tmp_dir, "shards_rank00000.safetensors")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckdir = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckdir, "latest")).read().strip() == "step_00000006"
    assert not os.path.exists(os.path.join(ckdir, "step_00000009"))
    # auto-resume ignores the half-written directory and finishes from step 6.
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                        "--train.max_steps=9", "--checkpoint.resume=auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 6" in r.stdout
    meta = json.load(open(os.path.join(ckdir, "step_00000009", "meta.json")))
    assert meta["step"] == 9


def test_torchrun_restart_resumes_by_itself(tmp_path, tiny_data):
    """A rank dies after step 5; torchrun --max-restarts=1 restarts the job, which
    resumes from the step-3 checkpoint and ends exactly like an uninterrupted run."""
    from helpers import free_port

    straight, _ = train(tmp_path, tiny_data, "straight", ["--parallel.ep=2"], 2)
    run_dir = tmp_path / "restarted"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               **hooks.env_for("crash", LOCMOE_TEST_CRASH=f"5:1:{tmp_path / 'crashed'}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--max-restarts=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "locmoe_train.train", *TINY, f"--data.path={tiny_data}", "--parallel.ep=2",
           f"--logging.run_dir={run_dir}", "--checkpoint.resume=auto"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "crashed").exists()  # the crash did happen
    assert "at step 3" in r.stdout
    got = losses(run_dir)
    assert got == losses(straight)
    # The records of steps redone after the restart are not duplicated.
    steps = [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]
    assert steps == sorted(set(steps))
    a, b = shards(straight, 6), shards(run_dir, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_checkpoint(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, tiny_data, "run", ["--train.max_steps=3"])
    r = run_cli(["inspect-checkpoint", str(run_dir / "checkpoints"), "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["step"] == 3 and info["status"] == "ok"
    assert info["path"].endswith("step_00000003") and info["model_parameters"] > 0
    os.remove(run_dir / "checkpoints" / "step_00000003" / "trainer.pt")
    r = run_cli(["inspect-checkpoint", str(run_dir / "checkpoints" / "step_00000003")])
    assert r.returncode == 2 and "trainer.pt is missing" in r.stderr


def test_megatron_impl_checkpoint_reshards(tmp_path, tiny_data):
    """megatron-core's MoELayer: per-expert weights saved at EP=2 load on 1 rank."""
    impl = ["--moe.impl=megatron", "--parallel.ep=2"]
    straight, _ = train(tmp_path, tiny_data, "straight", impl, 2)
    split, _ = train(tmp_path, tiny_data, "split", impl + ["--train.exit_at_step=3"], 2)
    resumed, _ = train(tmp_path, tiny_data, "split", ["--moe.impl=megatron", "--parallel.ep=1",
                                                      "--checkpoint.resume=auto"], 1)
    got, want = losses(resumed), losses(straight)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5)
