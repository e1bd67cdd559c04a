"""The non-finite guard through the CLI, at world 1 and 2: skipped steps leave the
checkpointed state untouched, a streak stops the run with status 3 and one error
line, and no checkpoint of that state is written.

Losses are poisoned by the ``hooks:poison`` test hook (tests/hooks.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import read_metrics, run_cli, strict_loads
from hooks import env_for
from locmoe_train.checkpoint import read_full_tensors

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--moe.num_experts=4", "--data.seq_len=32",
        "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.eval_interval=0",
        "--train.eval_samples=4", "--logging.log_interval=1", "--logging.console=false",
        "--checkpoint.interval=1", "--checkpoint.keep=10", "--optim.warmup_steps=0"]
TRIES = ("Try a lower optim.lr, more optim.warmup_steps, optim.grad_clip=1.0 or "
         "train.precision=fp32")


def _train(tmp_path, tiny_data, poison: str, nproc: int, *extra: str):
    run_dir = tmp_path / "run"
    r = run_cli(TINY + [f"--parallel.ep={nproc}", f"--data.path={tiny_data}",
                        f"--logging.run_dir={run_dir}", *extra],
                nproc=nproc, env=env_for("poison", LOCMOE_TEST_POISON=poison))
    return r, str(run_dir)


def _ckpt(run_dir: str, step: int) -> dict:
    return read_full_tensors(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), "")[1]


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    return all(torch.equal(a[k], b[k]) for k in a)


def _guard_fields(run_dir: str) -> list[tuple]:
    return [(r["step"], r["skipped_steps"], r["skipped_total"], r.get("nonfinite"))
            for r in read_metrics(run_dir) if "loss" in r]


def test_streak_stops_with_status_3_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    r, run_dir = _train(tmp_path, tiny_data, "4-100:0:grad", 1, "--train.max_steps=20",
                        "--train.nonfinite_patience=3")
    assert r.returncode == 3, r.stderr[-3000:]
    kept = os.path.join(run_dir, "checkpoints", "step_00000005")
    assert [line for line in r.stderr.splitlines() if "error:" in line] == [
        f"error: grad norm is NaN at step 6 (3 steps in a row (4-6) were skipped, "
        f"train.nonfinite_patience=3); kept the last checkpoint, {kept}. {TRIES}, then "
        f"resume from it with --checkpoint.resume=auto."]
    # Every skipped step is counted and its cause recorded.
    cause = "grad norm is NaN"
    assert _guard_fields(run_dir) == [
        (1, 0, 0, None), (2, 0, 0, None), (3, 0, 0, None), (4, 1, 1, {"step": 4, "cause": cause}),
        (5, 1, 2, {"step": 5, "cause": cause}), (6, 1, 3, {"step": 6, "cause": cause})]
    # Nothing saved at the stop; the skipped steps changed no weight nor Adam state.
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "latest"] + [f"step_{i:08d}" for i in range(1, 6)]
    assert _same(_ckpt(run_dir, 3), _ckpt(run_dir, 5))
    assert not _same(_ckpt(run_dir, 2), _ckpt(run_dir, 3))
    summary = open(os.path.join(run_dir, "summary.json")).read()
    assert '"outcome": "nonfinite"' in summary and '"steps": 6' in summary


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["plain", "distributed"])
def test_two_ranks_skip_when_one_rank_is_poisoned(tmp_path, tiny_data, optim):
    # Only rank 1's loss is NaN at step 3: both ranks skip it, and training goes on.
    # With optim.distributed the skipped step leaves every rank's piece of Adam alone too.
    r, run_dir = _train(tmp_path, tiny_data, "3:1:nan", 2, "--train.max_steps=4",
                        f"--optim.distributed={str(optim == 'distributed').lower()}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [f[1:] for f in _guard_fields(run_dir)] == [
        (0, 0, None), (0, 0, None), (1, 1, {"step": 3, "cause": "loss is NaN"}), (0, 1, None)]
    assert _same(_ckpt(run_dir, 2), _ckpt(run_dir, 3))
    assert not _same(_ckpt(run_dir, 3), _ckpt(run_dir, 4))


@pytest.mark.slow
def test_two_ranks_stop_mode_exits_3(tmp_path, tiny_data):
    r, run_dir = _train(tmp_path, tiny_data, "3:1:inf", 2, "--train.max_steps=10",
                        "--train.nonfinite=stop")
    out = r.stdout + r.stderr
    # torchrun itself exits 1 and names the first worker's status as the root cause
    # (it may end the other rank once the first has exited).
    root = out.split("Root Cause")[-1]
    assert r.returncode == 1 and "exitcode  : 3 " in root, out[-3000:]
    kept = os.path.join(run_dir, "checkpoints", "step_00000002")
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        f"error: loss is inf at step 3 (train.nonfinite=stop); kept the last checkpoint, "
        f"{kept}. {TRIES}, then resume from it with --checkpoint.resume=auto."]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "latest", "step_00000001", "step_00000002"]


def test_resume_continues_the_streak(tmp_path, tiny_data, monkeypatch, megatron_reset):
    # Patience 2. The first run saves at step 2, its first skipped step (streak 1), and
    # exits; the resumed run's step 3 is the second in a row: it must stop there.
    from locmoe_train.train import main

    for key, value in env_for("poison", LOCMOE_TEST_POISON="2-3:0:nan").items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    args = TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                   "--parallel.ep=1", "--train.max_steps=6", "--train.nonfinite_patience=2",
                   "--checkpoint.interval=2"]
    assert main(args + ["--train.exit_at_step=2"]) == 0
    kept = os.path.join(run_dir, "checkpoints", "step_00000002")
    assert main(args + ["--checkpoint.resume=auto"]) == 3
    assert _guard_fields(str(run_dir))[1:] == [
        (2, 1, 1, {"step": 2, "cause": "loss is NaN"}),
        (3, 1, 2, {"step": 3, "cause": "loss is NaN"})]  # the total goes on too
    # metrics.jsonl is strict JSON (read_metrics refuses NaN): a window of skipped steps
    # has no loss and a NaN grad norm, written as null.
    assert [(r["loss"], r["grad_norm"]) for r in read_metrics(str(run_dir))
            if r["step"] in (2, 3)] == [(None, None)] * 2
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["latest", "step_00000002"]
    summary = strict_loads((run_dir / "summary.json").read_text())
    assert (summary["outcome"], summary["steps"]) == ("nonfinite", 3)

