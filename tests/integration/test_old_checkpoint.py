"""Checkpoints and configs written before the MoE surface redesign still load.

``tests/fixtures/checkpoint_v1_locmoe_plus`` was written by the code before
it (commit 40b574c): a 1-layer LocMoE+ model saved at step 2 of 4, with its
capacity-controller state, and that run's ``config.yaml`` in the old
spelling (``moe.impl: locmoe``, ``moe.locmoe``). ``continuation.json`` holds
the old code's records of steps 3-4 of the same, uninterrupted run, recorded
on another machine: floats are compared to 1e-6 relative, integers exactly
(``helpers.assert_records_match`` says why). That code
re-estimated C with METHOD's q, so the resumed run selects it
(``moe.capacity.statistic=outsider_q``; the new default differs), and its
records are compared without the gauge it did not log (``capacity_estimate``)
nor the non-finite guard's counters (always 0 here).
"""

from __future__ import annotations

import json
import os
import shutil

from helpers import REPO, assert_records_match, read_metrics, run_cli

FIXTURE = os.path.join(REPO, "tests", "fixtures", "checkpoint_v1_locmoe_plus")


# Fields the old code did not log: timings, and the non-finite guard's counters.
NOT_IN_OLD_RECORDS = ("tokens_per_s", "step_time_s", "skipped_steps", "skipped_total")


def _timeless(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in NOT_IN_OLD_RECORDS}
    for layer in out.get("moe", {}).values():
        layer.pop("capacity_estimate", None)
    return out


def test_checkpoint_from_before_the_redesign_resumes(tmp_path, tiny_data):
    ckpt = tmp_path / "old" / "step_00000002"
    shutil.copytree(os.path.join(FIXTURE, "step_00000002"), ckpt)
    run_dir = tmp_path / "run"
    r = run_cli(["--config", os.path.join(FIXTURE, "config.yaml"), f"--data.path={tiny_data}",
                 f"--logging.run_dir={run_dir}", f"--checkpoint.resume={ckpt}",
                 "--checkpoint.dir=null", "--moe.capacity.statistic=outsider_q"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: moe.impl=locmoe is deprecated, use moe.impl=native" in r.stderr
    assert "note: moe.locmoe is deprecated, use moe.locmoe_plus" in r.stderr
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    with open(os.path.join(FIXTURE, "continuation.json")) as f:
        expected = json.load(f)
    assert_records_match([_timeless(rec) for rec in read_metrics(str(run_dir))], expected)
