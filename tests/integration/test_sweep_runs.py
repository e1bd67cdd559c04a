"""``locmoe-train sweep`` end to end: runs, table, skip finished, resume a crashed run."""

import csv
import json
import os

import yaml

import hooks
from helpers import read_metrics, run_cli

TINY = {"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
        "moe": {"num_experts": 4, "top_k": 2}, "parallel": {"ep": 1},
        "data": {"seq_len": 32},
        "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2,
                  "eval_interval": 0, "eval_samples": 8},
        "optim": {"warmup_steps": 1, "lr": 5e-3, "min_lr": 5e-4},
        "logging": {"log_interval": 2}, "checkpoint": {"interval": 2}}


def test_sweep_runs_skips_finished_and_resumes_a_crashed_run(tmp_path, tiny_data):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "data": {
        **TINY["data"], "path": tiny_data}}))
    out = tmp_path / "out"
    sweep = tmp_path / "sw.yaml"
    sweep.write_text(yaml.safe_dump({"base": "tiny.yaml", "output_dir": str(out),
                                     "grid": {"moe.top_k": [1, 2]}}))
    marker = tmp_path / "crashed"
    # The first run to finish step 3 (top_k-1) dies; its checkpoint of step 2 remains.
    r = run_cli(["sweep", str(sweep), "--quiet"],
                env=hooks.env_for("crash", LOCMOE_TEST_CRASH=f"3:0:{marker}"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert marker.exists()
    assert "[1/2] top_k-1: failed (exit status 1)" in r.stdout
    assert "[2/2] top_k-2: completed in" in r.stdout
    assert "failed: top_k-1 (see their train.log)" in r.stdout
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["run"], x["moe.top_k"], x["status"], x["steps"]) for x in rows] == [
        ("top_k-1", "1", "failed", "2"), ("top_k-2", "2", "completed", "6")]
    finished = {name: (out / name / "metrics.jsonl").read_text() for name in ("top_k-2",)}
    mtimes = {name: os.path.getmtime(out / name / "metrics.jsonl") for name in finished}

    r = run_cli(["sweep", str(sweep), "--quiet"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/2] top_k-1: resuming (attempt 2)" in r.stdout
    assert "[1/2] top_k-1: completed in" in r.stdout and "resumed at step 2" in r.stdout
    assert "[2/2] top_k-2: skipped (completed)" in r.stdout
    for name, text in finished.items():
        assert (out / name / "metrics.jsonl").read_text() == text
        assert os.path.getmtime(out / name / "metrics.jsonl") == mtimes[name]
    run_dir = out / "top_k-1"
    train = [x for x in read_metrics(str(run_dir)) if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 4, 6]
    log = (run_dir / "train.log").read_text()
    assert log.count("==== ") == 2 and "resumed from" in log
    record = json.loads((run_dir / "sweep_run.json").read_text())
    assert record["attempts"] == 2 and record["status"] == "completed"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["moe"]["top_k"] == 1

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["run"], x["status"], x["steps"]) for x in rows] == [
        ("top_k-1", "completed", "6"), ("top_k-2", "completed", "6")]
    for row in rows:
        last = [x for x in read_metrics(str(out / row["run"])) if "loss" in x][-1]
        assert float(row["train_loss"]) == last["loss"]
        assert float(row["imbalance"]) == last["moe_imbalance"]
        assert float(row["val_loss"]) > 0
    markdown = (out / "summary.md").read_text().splitlines()
    assert len(markdown) == 2 + 2 and markdown[2].startswith("| top_k-1 | 1 | completed | 6 | ")
    assert r.stdout.count("| top_k-") == 2  # the table is printed too
