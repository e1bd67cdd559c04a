"""Step-directory primitives shared by pre-training and Ada-K checkpoints."""

import json
import os

import pytest

from locmoe_train.checkpoint import find_resume, publish_step_dir, validate_checkpoint
from locmoe_train.errors import UserError


def _step(ckpt_dir, step, kind=None, keep=2, payload=b"x" * 10):
    tmp = os.path.join(ckpt_dir, f"step_{step:08d}.tmp")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        f.write(payload)
    meta = {"format": 1, "step": step, **({"kind": kind} if kind else {})}
    publish_step_dir(ckpt_dir, tmp, tmp[:-4], meta, keep)
    return tmp[:-4]


def test_publish_keeps_the_newest_and_points_latest(tmp_path):
    d = str(tmp_path)
    paths = [_step(d, s) for s in (10, 20, 30)]
    assert sorted(os.listdir(d)) == ["latest", "step_00000020", "step_00000030"]
    assert open(os.path.join(d, "latest")).read() == "step_00000030\n"
    meta = json.load(open(os.path.join(paths[-1], "meta.json")))
    assert meta["files"] == {"state.pt": 10} and meta["step"] == 30
    assert find_resume("auto", d, "checkpoint.resume", validate_checkpoint) == paths[-1]
    # A truncated newest one is skipped (with a warning) for the one before it.
    with open(os.path.join(paths[-1], "state.pt"), "wb") as f:
        f.write(b"x")
    assert find_resume("auto", d, "checkpoint.resume", validate_checkpoint) == paths[-2]
    with pytest.raises(UserError) as e:
        find_resume(paths[-1], d, "checkpoint.resume", validate_checkpoint)
    assert str(e.value) == (f"checkpoint.resume={paths[-1]!r}: state.pt has 1 bytes, "
                            f"expected 10 (truncated?)")
    assert find_resume(None, d, "checkpoint.resume", validate_checkpoint) is None
    assert find_resume("auto", str(tmp_path / "none"), "x", validate_checkpoint) is None


def test_kinds_are_not_mixed_up(tmp_path):
    pre = _step(str(tmp_path / "pre"), 5)
    stage = _step(str(tmp_path / "stage"), 5, kind="adak")
    assert validate_checkpoint(pre) is None
    assert validate_checkpoint(stage, kind="adak") is None
    assert validate_checkpoint(stage) == ("an Ada-K stage checkpoint, not a pre-training one "
                                          "(give it as adak.resume)")
    assert validate_checkpoint(pre, kind="adak") == (
        "not an Ada-K stage checkpoint (pre-training checkpoints go to --checkpoint)")
