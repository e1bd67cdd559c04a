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

import pytest

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


FIXTURE_V2 = os.path.join(REPO, "tests", "fixtures", "checkpoint_v2_zero_ep2")


def test_format_2_checkpoint_resumes_at_its_layout_and_at_another(tmp_path, tiny_data):
    """``tests/fixtures/checkpoint_v2_zero_ep2`` was written by the code before per-rank
    writing (commit 15ada76, format 2: ``shards_rank*.pt``, the ZeRO-1 state gathered onto
    data-parallel rank 0): 2 layers, EP=2 on 2 ranks, ``optim.distributed``, saved at
    step 2 of 4. ``continuation.json`` holds that run's records of steps 3-4 (without
    timings). Resumed on 2 ranks at its layout, today's code matches them; on 1 rank (EP=1,
    DP=1, the sharded state resharded) it matches them to float rounding."""
    ckpt = tmp_path / "old" / "step_00000002"
    shutil.copytree(os.path.join(FIXTURE_V2, "step_00000002"), ckpt)
    with open(os.path.join(FIXTURE_V2, "continuation.json")) as f:
        expected = json.load(f)
    for nproc, layout in ((2, []), (1, ["--parallel.ep=1"])):
        run_dir = tmp_path / f"run{nproc}"
        r = run_cli(["--config", os.path.join(FIXTURE_V2, "config.yaml"), *layout,
                     f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                     f"--checkpoint.resume={ckpt}", "--checkpoint.dir=null"], nproc=nproc)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "at step 2" in r.stdout
        got = [{k: v for k, v in rec.items() if k not in ("tokens_per_s", "step_time_s")}
               for rec in read_metrics(str(run_dir))]
        if nproc == 2:
            assert_records_match(got, expected)
        else:
            assert "layout changed" in r.stdout
            assert [g["step"] for g in got] == [e["step"] for e in expected]
            for g, e in zip(got, expected):
                for k in ("loss", "val_loss"):
                    if k in e:
                        assert g[k] == pytest.approx(e[k], rel=1e-5), (g["step"], k)
