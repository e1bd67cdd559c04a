"""A checkpoint volume that fills up (issue 23, item 12): the run ends with exit status 4
and one ``error:`` line naming the directory, the space needed and free and the last
complete checkpoint; the partial ``step_N.tmp`` is removed and ``latest`` keeps the last
good checkpoint. The volume is a real 7 MiB tmpfs (a checkpoint of the tiny model is about
4.6 MiB, so the second save fails half-way), at 1 rank in-process and at 2 ranks under
torchrun, where neither rank may hang."""

import errno
import os
import re
import subprocess

import pytest

from helpers import read_metrics, run_cli
from locmoe_train import checkpoint, checkpoint_pieces
from locmoe_train.checkpoint import validate_checkpoint
from locmoe_train.train import main
from test_checkpoint import TINY

SIZE = 7 * 2**20


def _mount(path: str) -> str | None:
    """Mount a SIZE tmpfs on ``path``; None if it worked, else why not."""
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", path],
                           capture_output=True, text=True, timeout=30)
    except OSError as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"status {r.returncode}")


@pytest.fixture
def volume(tmp_path):
    """``(path, why_not)``: a directory on a SIZE tmpfs, or why none could be mounted."""
    path = tmp_path / "volume"
    path.mkdir()
    why_not = _mount(str(path))
    yield str(path), why_not
    if why_not is None:
        subprocess.run(["umount", str(path)], check=True)


class _Budget:
    """A file that raises the kernel's ENOSPC once SIZE bytes were written through all of
    them: the full volume where no tmpfs can be mounted (not root, no CAP_SYS_ADMIN)."""
    left = SIZE

    def __init__(self, path, mode="r", *args, **kwargs):
        self.f = open(path, mode, *args, **kwargs)

    def write(self, data):
        if len(data) > _Budget.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _Budget.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def expect_failed_save(ckpt_dir: str, err: str, world: int, full: bool = True) -> None:
    """``full``: the volume really was full (not the write budget), so it had less free."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    who = r" \(rank [01]\)" if world > 1 else ""
    assert re.fullmatch(
        rf"error: checkpoint of step 6 not saved in {re.escape(ckpt_dir)}{who}: "
        rf"(shards_rank0000[01]\.safetensors|rng_rank0000[01]\.pt): \[Errno 28\] "
        rf"No space left on device; it needs about "
        rf"(\d+\.\d) MiB \(the size of step_00000003\) and (\d+\.\d) MiB was free when the save "
        rf"began\. Removed the partial step_00000006\.tmp; the last complete checkpoint is "
        rf"{re.escape(ckpt_dir)}/step_00000003 \(latest names it\)\. Free space or set "
        rf"checkpoint\.dir to a larger volume, then continue with --checkpoint\.resume=auto\.",
        lines[0]), lines[0]
    needed, free = map(float, re.search(r"about (\S+) MiB .* and (\S+) MiB was free",
                                        lines[0]).groups())
    size = sum(os.path.getsize(os.path.join(ckpt_dir, "step_00000003", f))
               for f in os.listdir(os.path.join(ckpt_dir, "step_00000003")))
    assert needed == round(size / 2**20, 1) and (free < needed or not full)
    # No traceback of ours; under torchrun the launcher adds its own ChildFailedError report.
    assert err.count("Traceback (most recent call last)") == (world > 1), err[-3000:]
    for raw in ("locmoe_train/", "OSError", "inline_container", "RuntimeError"):
        assert raw not in err, err[-3000:]
    assert sorted(os.listdir(ckpt_dir)) == ["latest", "step_00000003"]
    assert open(os.path.join(ckpt_dir, "latest")).read() == "step_00000003\n"
    assert validate_checkpoint(os.path.join(ckpt_dir, "step_00000003")) is None


def _budget(monkeypatch) -> None:
    """The same ENOSPC, raised by the shard and RNG files' writes."""
    _Budget.left = SIZE
    for module in (checkpoint, checkpoint_pieces):
        monkeypatch.setattr(module, "open", _Budget, raising=False)


def test_a_full_volume_ends_the_run_with_one_line(tiny_data, tmp_path, volume, capsys,
                                                  monkeypatch):
    path, why_not = volume
    if why_not is not None:
        _budget(monkeypatch)
    ckpt_dir = os.path.join(path, "ck")
    status = main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={tmp_path / 'run'}",
                          f"--checkpoint.dir={ckpt_dir}"])
    err = capsys.readouterr().err
    assert status == 4, err[-3000:]
    expect_failed_save(ckpt_dir, err, 1, full=why_not is None)


def test_a_full_volume_stops_an_async_run_at_the_next_step(tiny_data, tmp_path, volume, capsys,
                                                           monkeypatch):
    """checkpoint.async: the step-6 save fails in the background writer; the run learns of
    it after a following step (not at its end, step 9) and stops the same way."""
    path, why_not = volume
    if why_not is not None:
        _budget(monkeypatch)
    ckpt_dir, run_dir = os.path.join(path, "ck"), tmp_path / "run"
    status = main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                          f"--checkpoint.dir={ckpt_dir}", "--checkpoint.async=true",
                          "--train.max_steps=9"])
    err = capsys.readouterr().err
    assert status == 4, err[-3000:]
    expect_failed_save(ckpt_dir, err, 1, full=why_not is None)
    steps = [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]
    assert 6 <= max(steps) < 9, steps


def test_a_full_volume_stops_both_ranks(tiny_data, tmp_path, volume):
    path, why_not = volume
    if why_not is not None:
        pytest.skip(f"needs a real small volume for 2 processes; mount -t tmpfs failed: "
                    f"{why_not}")
    ckpt_dir = os.path.join(path, "ck")
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={tmp_path / 'run'}",
                        f"--checkpoint.dir={ckpt_dir}", "--parallel.ep=2"], nproc=2, timeout=300)
    assert r.returncode != 0
    assert "exitcode  : 4" in r.stderr, r.stderr[-3000:]  # torchrun's summary of the worker
    expect_failed_save(ckpt_dir, r.stderr, 2)
