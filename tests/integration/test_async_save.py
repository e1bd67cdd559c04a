"""``checkpoint.async: true`` through the real CLI.

A background save writes the same bytes as a synchronous one and resumes the same
run bit for bit; training goes on while it writes; a process killed (SIGKILL)
during the background write leaves the previous checkpoint as ``latest`` and
the next run continues from it. (A background write that fails is in
``test_save_failure.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import hooks
from helpers import REPO, read_metrics, run_cli
from locmoe_train.train import main
from test_checkpoint import TINY, losses

ASYNC = ["--checkpoint.async=true"]


def _step_dir(run_dir, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def test_async_checkpoints_equal_sync_ones_and_resume_exactly(tmp_path, tiny_data, capsys):
    sync, background = tmp_path / "sync", tmp_path / "async"
    assert main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={sync}"]) == 0
    assert main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={background}",
                        "--logging.console=true", *ASYNC]) == 0
    out = capsys.readouterr().out
    assert f"saved checkpoint {_step_dir(background, 3)}" in out  # published during the run
    assert losses(background) == losses(sync)
    for step in (3, 6):
        a, b = _step_dir(sync, step), _step_dir(background, step)
        names = sorted(os.listdir(a))
        assert names == sorted(os.listdir(b))
        for name in names:
            if name.endswith(".safetensors"):
                with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name),
                                                                   "rb") as fb:
                    assert fa.read() == fb.read(), (step, name)
        with open(os.path.join(a, "meta.json")) as fa, open(os.path.join(b, "meta.json")) as fb:
            assert json.load(fa)["tensors"] == json.load(fb)["tensors"]
    # Resumed (in the background mode too) from the step-3 checkpoint: the same run.
    assert main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={background}", *ASYNC,
                        f"--checkpoint.resume={_step_dir(background, 3)}"]) == 0
    assert losses(background) == losses(sync)


def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    args = TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                   "--train.max_steps=12"]
    assert main(args + ["--train.exit_at_step=6"]) == 0  # checkpoints of steps 3 and 6
    # The step-9 save sleeps 60 s in its writer thread, after the shard file; training
    # goes on meanwhile, and the process is killed at step 11.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               **hooks.env_for("slow_save", LOCMOE_TEST_SLOW_SAVE="60"))
    proc = subprocess.Popen([sys.executable, "-m", "locmoe_train.train", *args, *ASYNC,
                             "--checkpoint.resume=auto"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp_dir = _step_dir(run_dir, 9) + ".tmp"
    deadline = time.time() + 120
    while not (os.path.exists(os.path.join(tmp_dir, "shards_rank00000.safetensors"))
               and max(_steps(run_dir)) >= 11):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckdir = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckdir, "latest")).read().strip() == "step_00000006"
    assert not os.path.exists(_step_dir(run_dir, 9))
    assert not os.path.exists(os.path.join(tmp_dir, "meta.json"))
    with open(os.path.join(tmp_dir, "stray.bin"), "wb") as f:  # what else a crash left
        f.write(b"x")
    # The next run removes the unfinished step_9.tmp at start-up, continues from step 6 and
    # finishes; its step-9 save is written afresh, with nothing of the killed attempt.
    assert main(args + ["--checkpoint.resume=auto", *ASYNC]) == 0
    assert sorted(os.listdir(ckdir)) == ["latest", "step_00000009", "step_00000012"]
    assert "stray.bin" not in os.listdir(_step_dir(run_dir, 9))


def _steps(run_dir) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r] or [0]
    except (OSError, ValueError):  # not written yet, or a line being written
        return [0]


def test_two_ranks_agree_when_to_publish_and_write_what_a_sync_save_writes(tmp_path, tiny_data):
    """EP=2 on 2 ranks under torchrun: the ranks agree in the trainer's stop all-reduce
    that every write is done, then publish; the files and losses equal a sync run's."""
    runs = {}
    for name, extra in (("sync", []), ("async", ASYNC)):
        runs[name] = tmp_path / name
        r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={runs[name]}",
                            "--parallel.ep=2", "--logging.console=true", *extra], nproc=2)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert r.stdout.count("saved checkpoint") == 2, r.stdout[-2000:]
    assert losses(runs["async"]) == losses(runs["sync"])
    for step in (3, 6):
        a, b = _step_dir(runs["sync"], step), _step_dir(runs["async"], step)
        shards = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
        assert len(shards) == 2 and shards == sorted(f for f in os.listdir(b)
                                                     if f.endswith(".safetensors"))
        for name in shards:
            with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
                assert fa.read() == fb.read(), (step, name)
