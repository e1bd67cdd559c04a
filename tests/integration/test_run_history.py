"""Checkpoints follow the run's history in a real, reused run directory (issue 23, item 1):
a second fresh run is refused (or moves the first run's checkpoints aside when asked), an
explicit resume from an older step moves the newer checkpoints aside, and "auto" among only
damaged checkpoints exits 2. In-process ``train.main`` calls: no subprocess is needed."""

import os

import pytest
import torch

from locmoe_train.train import main
from test_checkpoint import TINY


@pytest.fixture
def train(tiny_data, tmp_path, capsys):
    """``train(*overrides) -> (status, stdout, stderr)`` of one run in ``tmp_path/run``."""
    def run(*extra):
        status = main(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={tmp_path / 'run'}",
                              *extra])
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def listing(d):
    return sorted(os.listdir(d))


def latest(d):
    return open(os.path.join(d, "latest")).read().strip()


def files(d):
    """Every file under ``d``, by relative path, with its bytes."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), d)] = f.read()
    return out


def superseded(ck):
    [name] = [n for n in os.listdir(ck) if n.startswith("superseded-")]
    return os.path.join(ck, name)


def test_a_second_fresh_run_is_refused_and_moves_aside_only_when_asked(train, tmp_path):
    """The issue's case: the same run directory trained twice, keep=1."""
    ck = str(tmp_path / "run" / "checkpoints")
    assert train("--checkpoint.keep=1")[0] == 0
    first = files(ck)
    assert listing(ck) == ["latest", "step_00000006"]
    want = (f"error: checkpoint directory {ck} already holds checkpoints of another run "
            f"(step_00000006); this run starts from step 0 (checkpoint.resume=null), and its "
            f"saves would mix with them. Either continue them with --checkpoint.resume=auto, or "
            f"give this run another --checkpoint.dir or --logging.run_dir, or move them aside "
            f"with --checkpoint.existing=move_aside (nothing is deleted).\n")
    status, _, err = train("--checkpoint.keep=1", "--check")
    assert (status, err) == (2, want)
    status, _, err = train("--checkpoint.keep=1", "--train.max_steps=3")
    assert (status, err) == (2, want)
    assert files(ck) == first  # nothing written
    # Asked to: the old checkpoints move, byte for byte, and the new run keeps its own.
    status, out, _ = train("--checkpoint.keep=1", "--train.max_steps=3",
                           "--checkpoint.existing=move_aside", "--train.seed=7")
    assert status == 0
    aside = superseded(ck)
    assert (f"note: moved the 1 checkpoints of the earlier run in {ck} to {aside}/ "
            f"(--checkpoint.existing=move_aside)") in out
    assert files(aside) == first
    assert listing(ck) == sorted(["latest", os.path.basename(aside), "step_00000003"])
    assert latest(ck) == "step_00000003"
    # "auto" later continues the new run, not the old one.
    status, out, _ = train("--checkpoint.keep=1", "--checkpoint.resume=auto", "--train.seed=7")
    assert status == 0 and f"resumed from {ck}/step_00000003 at step 3" in out
    assert listing(ck) == sorted(["latest", os.path.basename(aside), "step_00000006"])
    assert files(aside) == first
    new, old = (torch.load(os.path.join(d, "step_00000006", "trainer.pt"), weights_only=True)
                for d in (ck, aside))
    assert new["loader"] != old["loader"]  # seed 7's data order, not the first run's


def test_resume_from_an_older_step_moves_the_newer_ones_aside(train, tmp_path):
    ck = str(tmp_path / "run" / "checkpoints")
    assert train("--checkpoint.keep=3", "--train.max_steps=9")[0] == 0
    before = files(ck)
    assert listing(ck) == ["latest", "step_00000003", "step_00000006", "step_00000009"]
    # Resumed from step 3 and stopped there: `latest` already names step 3, not a moved one.
    status, out, _ = train("--checkpoint.keep=3", "--train.max_steps=3",
                           f"--checkpoint.resume={ck}/step_00000003")
    assert status == 0
    aside = superseded(ck)
    assert (f"note: resuming from step 3: moved the newer checkpoints step_00000006, "
            f"step_00000009 to {aside}/") in out
    assert listing(ck) == sorted(["latest", os.path.basename(aside), "step_00000003"])
    assert latest(ck) == "step_00000003"
    assert {k: v for k, v in files(aside).items() if k != "latest"} == \
        {k: v for k, v in before.items() if k.startswith(("step_00000006", "step_00000009"))}
    assert latest(aside) == "step_00000009"
    # The rolled-back history goes on from step 3; the moved checkpoints stay as they were.
    status, out, _ = train("--checkpoint.keep=3", "--checkpoint.resume=auto")
    assert status == 0 and f"resumed from {ck}/step_00000003 at step 3" in out
    assert listing(ck) == sorted(["latest", os.path.basename(aside), "step_00000003",
                                  "step_00000006"])
    assert latest(ck) == "step_00000006"
    assert files(os.path.join(aside, "step_00000009")) == \
        {k.split("/", 1)[1]: v for k, v in before.items() if k.startswith("step_00000009/")}
    # Back to the moved history: the current checkpoints move aside in turn.
    status, out, _ = train("--checkpoint.keep=3", "--train.max_steps=12",
                           f"--checkpoint.resume={aside}/step_00000009",
                           "--checkpoint.existing=move_aside")
    assert status == 0 and f"resumed from {aside}/step_00000009 at step 9" in out
    [second] = [os.path.join(ck, n) for n in os.listdir(ck)
                if n.startswith("superseded-") and os.path.join(ck, n) != aside]
    assert listing(second) == ["latest", "step_00000003", "step_00000006"]
    assert latest(ck) == "step_00000012"


def test_auto_among_only_damaged_checkpoints_exits_2(train, tmp_path):
    """Only trainer.pt is gone; every shard can still be read. Nothing may be overwritten."""
    ck = str(tmp_path / "run" / "checkpoints")
    assert train()[0] == 0
    for step in ("step_00000003", "step_00000006"):
        os.remove(os.path.join(ck, step, "trainer.pt"))
    before = files(ck)
    status, _, err = train("--checkpoint.resume=auto")
    assert status == 2
    assert err.endswith(
        f"error: checkpoint.resume=auto: every checkpoint in {ck} is damaged: step_00000006 "
        f"(trainer.pt is missing); step_00000003 (trainer.pt is missing). Nothing was started "
        f"or changed. Resume from a repaired one with checkpoint.resume=PATH, or start over in "
        f"another directory, or start over here with checkpoint.resume=null and "
        f"checkpoint.existing=move_aside, which moves them aside.\n")
    assert files(ck) == before
