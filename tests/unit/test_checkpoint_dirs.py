"""Step-directory primitives shared by pre-training and Ada-K checkpoints, on real
directories: publishing, pruning by the run's history, the `latest` pointer, moving
checkpoints aside instead of deleting them."""

import json
import os

import pytest

from locmoe_train.checkpoint import find_resume, publish_step_dir, resolve, validate_checkpoint
from locmoe_train.checkpoint_dirs import check_fresh_start, roll_back
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


# ---- the run's history (issue 23, items 1 and 8) ------------------------------------------

def _names(d):
    return sorted(n for n in os.listdir(d) if n.startswith("step_"))


def _latest(d):
    return open(os.path.join(d, "latest")).read().strip()


def test_pruning_never_deletes_the_new_checkpoint_or_a_newer_one(tmp_path):
    """An older run left step_200 and step_300; a save of step 100 (keep=1) keeps itself
    and leaves the newer ones alone. Sorted-name pruning deleted step_100 at once, left
    `latest` naming nothing, and "auto" then continued the old run."""
    d = str(tmp_path)
    for step in (200, 300):
        _step(d, step, keep=2)
    new = _step(d, 100, keep=1)
    assert _names(d) == ["step_00000100", "step_00000200", "step_00000300"]
    assert _latest(d) == "step_00000100"
    assert find_resume("auto", d, "checkpoint.resume", validate_checkpoint) == new
    # keep counts the history up to the new step: step_50 goes, 100 and 150 stay.
    _step(d, 50, keep=5)
    _step(d, 150, keep=2)
    assert _names(d) == ["step_00000100", "step_00000150", "step_00000200", "step_00000300"]


def test_a_step_directory_in_the_way_is_moved_aside_not_deleted(tmp_path, capsys):
    d = str(tmp_path)
    _step(d, 20, payload=b"old run")
    _step(d, 20, payload=b"new run!")
    [aside] = [n for n in os.listdir(d) if n.startswith("superseded-")]
    assert open(os.path.join(d, aside, "step_00000020", "state.pt"), "rb").read() == b"old run"
    assert open(os.path.join(d, "step_00000020", "state.pt"), "rb").read() == b"new run!"
    assert f"moved it to {os.path.join(d, aside)}/" in capsys.readouterr().err


def test_auto_follows_latest_and_falls_back_with_a_warning(tmp_path, capsys):
    d = str(tmp_path / "ck")
    paths = [_step(d, s, keep=3) for s in (10, 20, 30)]
    latest = os.path.join(d, "latest")
    with open(latest, "w") as f:
        f.write("step_00000020\n")
    assert find_resume("auto", d, "checkpoint.resume", validate_checkpoint, warn=True) == paths[1]
    assert capsys.readouterr().err == ""
    # A pointer that leads out of the directory, even to a valid checkpoint, is not followed.
    outside = _step(str(tmp_path / "other"), 99)
    bad = ["../other/step_00000099", outside, "..\\other\\step_00000099", "step_1/..", "x"]
    for text in bad:
        with open(latest, "w") as f:
            f.write(text + "\n")
        assert find_resume("auto", d, "checkpoint.resume", validate_checkpoint,
                           warn=True) == paths[2]
        err = capsys.readouterr().err
        assert err == (f"warning: {latest} holds {text!r}, which is not the name of a step_* "
                       f"directory beside it (no '/', '\\', '..' or absolute path); "
                       f"checkpoint.resume=auto takes the newest valid checkpoint instead\n")
        with pytest.raises(UserError) as e:  # inspect-checkpoint DIR, adak --checkpoint DIR
            resolve(d)
        assert str(e.value).startswith(f"{latest} holds {text!r}, which is not the name")
    os.remove(latest)
    assert find_resume("auto", d, "checkpoint.resume", validate_checkpoint,
                       warn=True) == paths[2]
    assert capsys.readouterr().err == (f"warning: {latest} is missing; checkpoint.resume=auto "
                                       f"takes the newest valid checkpoint instead\n")


def test_auto_refuses_a_directory_whose_checkpoints_are_all_damaged(tmp_path):
    d = str(tmp_path)
    paths = [_step(d, s) for s in (10, 20)]
    os.remove(os.path.join(paths[0], "state.pt"))
    with open(os.path.join(paths[1], "state.pt"), "wb") as f:
        f.write(b"x")
    with pytest.raises(UserError) as e:
        find_resume("auto", d, "checkpoint.resume", validate_checkpoint)
    assert str(e.value) == (
        f"checkpoint.resume=auto: every checkpoint in {d} is damaged: step_00000020 (state.pt "
        f"has 1 bytes, expected 10 (truncated?)); step_00000010 (state.pt is missing). Nothing "
        f"was started or changed. Resume from a repaired one with checkpoint.resume=PATH, or "
        f"start over in another directory, or start over here with checkpoint.resume=null and "
        f"checkpoint.existing=move_aside, which moves them aside.")
    assert _names(d) == ["step_00000010", "step_00000020"]


def test_rolling_back_moves_the_newer_checkpoints_aside(tmp_path, capsys):
    d = str(tmp_path)
    paths = [_step(d, s, keep=3) for s in (10, 20, 30)]
    before = {p: open(os.path.join(p, "meta.json")).read() for p in paths[1:]}
    dest = roll_back(d, paths[0])
    assert capsys.readouterr().out == (f"note: resuming from step 10: moved the newer checkpoints "
                                       f"step_00000020, step_00000030 to {dest}/\n")
    assert _names(d) == ["step_00000010"] and _latest(d) == "step_00000010"
    assert _names(dest) == ["step_00000020", "step_00000030"] and _latest(dest) == "step_00000030"
    for p, text in before.items():
        assert open(os.path.join(dest, os.path.basename(p), "meta.json")).read() == text
    _step(d, 20, keep=1)  # the new history goes on; the moved one is not touched
    assert _names(d) == ["step_00000020"] and _names(dest) == ["step_00000020", "step_00000030"]
    assert roll_back(d, paths[0].replace(d, str(tmp_path / "elsewhere"))) is None


def test_a_fresh_start_among_checkpoints_is_refused(tmp_path):
    d = str(tmp_path / "ck")
    for s in (1, 2, 3, 4):
        _step(d, s, keep=4)
    with pytest.raises(UserError) as e:
        check_fresh_start(d, None, "refuse")
    assert str(e.value) == (
        f"checkpoint directory {d} already holds checkpoints of another run (step_00000002, "
        f"step_00000003, step_00000004 and 1 older); this run starts from step 0 "
        f"(checkpoint.resume=null), and its saves would mix with them. Either continue them "
        f"with --checkpoint.resume=auto, or give this run another --checkpoint.dir or "
        f"--logging.run_dir, or move them aside with --checkpoint.existing=move_aside (nothing "
        f"is deleted).")
    elsewhere = _step(str(tmp_path / "other"), 7)
    with pytest.raises(UserError, match="this run continues .*step_00000007, which is not in"):
        check_fresh_start(d, elsewhere, "refuse")
    for ok in [(d, "auto", "refuse"), (d, os.path.join(d, "step_00000002"), "refuse"),
               (d, None, "move_aside"), (str(tmp_path / "none"), None, "refuse")]:
        check_fresh_start(*ok)
