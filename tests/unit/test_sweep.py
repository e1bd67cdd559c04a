"""Sweep files: expansion into runs, names, errors, run state, the table, the SLURM script."""

import csv
import json
import os

import pytest
import yaml

from locmoe_train.errors import UserError
from locmoe_train.sweep import main
from locmoe_train.sweep.runner import config_changes, preflight, sbatch_script, status_of
from locmoe_train.sweep.spec import build_sweep, load_sweep
from locmoe_train.sweep.summary import write_summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = {"model": {"num_layers": 2, "hidden_size": 64}, "moe": {"num_experts": 4, "top_k": 2},
        "parallel": {"ep": 1}, "optim": {"lr": 0.003}}


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def sweep_of(tmp_path, spec, cli=None):
    spec = {"base": "base.yaml", "output_dir": str(tmp_path / "out"), **spec}
    return build_sweep(spec, "sw.yaml", "sw", str(tmp_path), cli)


def test_grid_is_a_cartesian_product_with_readable_names(tmp_path, base_file):
    sweep = sweep_of(tmp_path, {"grid": {"moe.top_k": [1, 2], "optim.lr": [0.001, 2.0e-3]},
                                "overrides": {"train": {"max_steps": 7}}})
    assert [r.name for r in sweep.runs] == ["top_k-1_lr-0.001", "top_k-1_lr-0.002",
                                            "top_k-2_lr-0.001", "top_k-2_lr-0.002"]
    assert [(r.cfg.moe.top_k, r.cfg.optim.lr) for r in sweep.runs] == [
        (1, 0.001), (1, 0.002), (2, 0.001), (2, 0.002)]
    assert all(r.cfg.train.max_steps == 7 and r.cfg.model.hidden_size == 64 for r in sweep.runs)
    run = sweep.runs[3]
    assert run.index == 3 and run.dir == str(tmp_path / "out" / "top_k-2_lr-0.002")
    assert run.cfg.logging.run_dir == run.dir
    assert run.cfg.checkpoint.dir == os.path.join(run.dir, "checkpoints")
    assert run.cfg.checkpoint.resume == "auto"
    assert sweep.columns == ["moe.top_k", "optim.lr"]


def test_runs_times_grid_precedence_and_names(tmp_path, base_file):
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**BASE, "moe": {"num_experts": 8}}))
    sweep = sweep_of(tmp_path, {
        "overrides": {"optim.lr": 0.01, "moe.top_k": 1},
        "runs": [{"name": "plain"},
                 {"overrides": {"moe.router": "hash", "optim.lr": 0.02}},
                 {"config": "other.yaml"}],
        "grid": {"train.seed": [1, 2]}}, cli=["train.max_steps=3"])
    assert [r.name for r in sweep.runs] == [
        "plain_seed-1", "plain_seed-2", "router-hash_lr-0.02_seed-1", "router-hash_lr-0.02_seed-2",
        "other_seed-1", "other_seed-2"]
    lrs = [r.cfg.optim.lr for r in sweep.runs]
    # the sweep's overrides beat the config file, a run's own beat the sweep's
    assert lrs == [0.01, 0.01, 0.02, 0.02, 0.01, 0.01]
    assert [r.cfg.moe.num_experts for r in sweep.runs] == [4, 4, 4, 4, 8, 8]
    assert {r.cfg.train.max_steps for r in sweep.runs} == {3}  # command-line overrides last
    # Columns: what the sweep sets per run, then other keys that differ (from other.yaml).
    assert sweep.columns == ["train.seed", "moe.router", "optim.lr", "moe.num_experts"]


def test_keys_with_the_same_last_part_keep_enough_of_their_path(tmp_path, base_file):
    sweep = sweep_of(tmp_path, {"grid": {"model.ffn_hidden_size": [128],
                                         "moe.ffn_hidden_size": [64, 128]}})
    assert [r.name for r in sweep.runs] == [
        "model.ffn_hidden_size-128_moe.ffn_hidden_size-64",
        "model.ffn_hidden_size-128_moe.ffn_hidden_size-128"]


def test_no_grid_and_no_runs_is_one_run_named_base(tmp_path, base_file):
    sweep = sweep_of(tmp_path, {})
    assert [r.name for r in sweep.runs] == ["base"] and sweep.columns == []


@pytest.mark.parametrize("spec, message", [
    ({"grids": {}}, "sw.yaml: unknown sweep key 'grids'. Valid keys: base, output_dir, nproc, "
                    "overrides, grid, runs, slurm."),
    ({"grid": {"moe.topk": [1, 2]}},
     "sw.yaml: grid: unknown config key 'moe.topk'. Did you mean 'top_k'?"),
    ({"grid": {"moe.top_k": 2}},
     "sw.yaml: grid['moe.top_k']=2 must be a non-empty list of values, e.g. moe.top_k: [2]."),
    ({"grid": {"moe.top_k": [1, "two"]}},
     "sw.yaml: grid: moe.top_k='two' has the wrong type: expected int, got str."),
    ({"overrides": {"optim.lr": "fast"}},
     "sw.yaml: overrides: optim.lr='fast' has the wrong type: expected float, got str."),
    ({"runs": [{"name": "a", "overides": {}}]},
     "sw.yaml: runs[0]: unknown key 'overides'. Valid keys: name, config, overrides."),
    ({"runs": [{"name": "a", "overrides": {"moe.routr": "hash"}}]},
     "sw.yaml: runs[0] (a): overrides: unknown config key 'moe.routr'. Did you mean 'router'?"),
    ({"runs": [{"name": "a"}, {"name": "a", "overrides": {"optim.lr": 0.1}}]},
     "sw.yaml: run name 'a' is used by runs 0 and 1: give the entries of 'runs' distinct names."),
    ({"runs": [{"name": "x/y"}]},
     "sw.yaml: runs[0]: name 'x/y' is not usable as a directory name"),
    ({"runs": [{"name": "a", "overrides": {"moe.top_k": 1}}], "grid": {"moe.top_k": [1, 2]}},
     "sw.yaml: runs[0] (a) and grid both set 'moe.top_k': set it in one place only."),
    ({"nproc": 0}, "sw.yaml: nproc=0 must be a positive integer"),
    ({"grid": {"moe.top_k": [8]}},
     "sw.yaml: run 'top_k-8': moe.top_k=8 exceeds moe.num_experts=4"),
])
def test_bad_sweeps_name_the_key(tmp_path, base_file, spec, message):
    with pytest.raises(UserError) as e:
        sweep_of(tmp_path, spec)
    assert str(e.value).startswith(message), str(e.value)


def test_missing_base_is_an_error(tmp_path):
    with pytest.raises(UserError, match="sw.yaml: no 'base' config: add 'base: CONFIG.yaml'"):
        build_sweep({"grid": {"moe.top_k": [1]}}, "sw.yaml", "sw", str(tmp_path))


def test_layout_is_checked_for_nproc(tmp_path, base_file):
    sweep = sweep_of(tmp_path, {"nproc": 3, "overrides": {"parallel.ep": 2}})
    with pytest.raises(UserError, match="sw.yaml: run 'base' with nproc=3: parallel.ep=2 x expert "
                                        "tensor parallel 1 = 2 does not divide the world size 3"):
        preflight(sweep, sweep.runs, force=False, need_data=False)


def _fake_run(run, status="completed", outcome="completed", config=None, metrics=()):
    os.makedirs(run.dir, exist_ok=True)
    with open(os.path.join(run.dir, "sweep_run.json"), "w") as f:
        json.dump({"status": status, "config": config or run.cfg.to_dict()}, f)
    if outcome:
        with open(os.path.join(run.dir, "summary.json"), "w") as f:
            json.dump({"outcome": outcome, "steps": 20, "val_loss": 4.5, "wall_time_s": 12.5}, f)
    with open(os.path.join(run.dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in metrics)


def test_changed_config_is_refused_unless_forced(tmp_path, base_file):
    sweep = sweep_of(tmp_path, {"grid": {"moe.top_k": [1, 2]}})
    old = sweep.runs[1].cfg.to_dict()
    old["optim"]["lr"] = 0.5
    old["logging"]["console"] = False  # not a change that matters
    old["model"]["retired_key"] = 1  # keys of another schema version are ignored
    _fake_run(sweep.runs[1], config=old)
    assert config_changes(old, sweep.runs[1].cfg.to_dict()) == ["optim.lr: 0.5 -> 0.003"]
    assert status_of(sweep.runs[1]) == "changed" and status_of(sweep.runs[0]) == "pending"
    with pytest.raises(UserError) as e:
        preflight(sweep, sweep.runs, force=False, need_data=False)
    assert str(e.value) == (
        "run 'top_k-2' was started with another config (optim.lr: 0.5 -> 0.003). Delete those "
        "run directories, give the runs other names, or pass --force to start them again from "
        "scratch.")
    preflight(sweep, sweep.runs, force=True, need_data=False)
    os.makedirs(sweep.runs[0].dir)
    open(os.path.join(sweep.runs[0].dir, "metrics.jsonl"), "w").close()
    assert status_of(sweep.runs[0]) == "unknown"
    with pytest.raises(UserError, match="top_k-1 exists but was not started by a sweep"):
        preflight(sweep, sweep.runs[:1], force=False, need_data=False)


def test_summary_has_one_row_per_run_with_final_metrics(tmp_path, base_file):
    sweep = sweep_of(tmp_path, {"grid": {"moe.top_k": [1, 2], "optim.lr": [0.001]}})
    layer = {"tokens_per_expert": [3, 1], "max_over_mean": 1.5, "dropped_fraction": 0.25,
             "unrouted_fraction": 0.1, "same_node_share": 0.5}
    metrics = [
        {"step": 1, "loss": 6.0, "tokens_per_s": 10.0, "moe": {"layer_0": layer}},
        {"step": 10, "loss": 5.0, "tokens_per_s": 300.0, "moe_imbalance": 1.7, "moe_capacity": 24,
         "moe": {"layer_0": layer, "layer_1": {**layer, "dropped_fraction": 0.75}}},
        {"step": 10, "val_loss": 5.5, "val_ppl": 244.7},
        {"step": 20, "loss": 4.0, "tokens_per_s": 500.0, "moe_imbalance": 1.25,
         "moe_capacity": 16, "bytes_cross_node": 2.5e6,
         "moe": {"layer_0": layer, "layer_1": {**layer, "dropped_fraction": 0.75}}},
        {"step": 20, "val_loss": 4.5, "val_ppl": 90.0},
        '{"step": 21, "lo',  # torn by a crash
    ]
    _fake_run(sweep.runs[0], metrics=metrics[:-1])
    with open(os.path.join(sweep.runs[0].dir, "metrics.jsonl"), "a") as f:
        f.write(metrics[-1])
    _fake_run(sweep.runs[1], status="failed", outcome=None, metrics=metrics[:2])
    markdown, rows = write_summary(sweep)
    with open(tmp_path / "out" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["top_k-1_lr-0.001", "top_k-2_lr-0.001"]
    assert list(table[0]) == ["run", "moe.top_k", "optim.lr", "status", "steps", "train_loss",
                              "val_loss", "tokens_per_s", "imbalance", "dropped", "unrouted",
                              "same_node", "cross_node_MB", "capacity", "tokens_per_expert",
                              "wall_s"]
    assert table[0] == {"run": "top_k-1_lr-0.001", "moe.top_k": "1", "optim.lr": "0.001",
                        "status": "completed", "steps": "20", "train_loss": "4.0",
                        "val_loss": "4.5", "tokens_per_s": "400.0", "imbalance": "1.25",
                        "dropped": "0.5", "unrouted": "0.1", "same_node": "0.5",
                        "cross_node_MB": "2.5", "capacity": "16",
                        # each record sums its window: (2 + 2 + 2) over 20 steps
                        "tokens_per_expert": "0.3", "wall_s": "12.5"}
    assert table[1]["status"] == "failed" and table[1]["steps"] == "10"
    assert table[1]["val_loss"] == "" and table[1]["cross_node_MB"] == ""
    assert (tmp_path / "out" / "summary.md").read_text() == markdown
    lines = markdown.splitlines()
    assert lines[0] == ("| run | moe.top_k | optim.lr | status | steps | train_loss | val_loss | "
                        "tokens_per_s | imbalance | dropped | unrouted | same_node | "
                        "cross_node_MB | capacity | tokens_per_expert | wall_s |")
    assert lines[2] == ("| top_k-1_lr-0.001 | 1 | 0.001 | completed | 20 | 4.0000 | 4.5000 | 400 "
                        "| 1.25 | 0.500 | 0.100 | 0.500 | 2.50 | 16 | 0.3 | 12 |")
    assert lines[3] == ("| top_k-2_lr-0.001 | 2 | 0.001 | failed | 10 | 5.0000 | - | 300 | 1.70 "
                        "| 0.500 | 0.100 | 0.500 | - | 24 | 0.4 | - |")
    assert len(lines) == 4


def test_slurm_writes_an_array_script(tmp_path, base_file, capsys):
    spec = {"base": "base.yaml", "output_dir": str(tmp_path / "out"),
            "grid": {"moe.top_k": [1, 2], "train.seed": [1, 2, 3]},
            "slurm": {"partition": "gpu", "time": "04:00:00", "gpus_per_node": 8,
                      "exclusive": True, "max_parallel": 2,
                      "setup": ["module load cuda", "source .venv/bin/activate"]}}
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main([str(path), "--slurm", "--train.max_steps=9"]) == 0
    script = (tmp_path / "out" / "sweep.sbatch").read_text()
    assert f"wrote {tmp_path / 'out' / 'sweep.sbatch'} (6 array tasks)" in capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --array=0-5%2", "#SBATCH --job-name=sweep-sw", "#SBATCH --nodes=1",
                      "#SBATCH --ntasks-per-node=1",
                      f"#SBATCH --output={tmp_path / 'out'}/slurm-%A_%a.out",
                      "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive"]
    assert lines.index("module load cuda") < lines.index("source .venv/bin/activate")
    assert lines[-1] == (f'"$PYTHON" -m locmoe_train.train sweep {path} --index '
                         f'"$SLURM_ARRAY_TASK_ID" --train.max_steps=9')
    # A subset of runs becomes a list of array indices.
    sweep = load_sweep(str(path))
    assert "#SBATCH --array=1,4%2\n" in sbatch_script(sweep, [sweep.runs[1], sweep.runs[4]])


@pytest.mark.parametrize("name, count, first", [("routers", 6, "baseline_top1_cf1.1"),
                                                ("capacity", 9, "interval-10_min_fraction-0.2")])
def test_shipped_sweeps_pass_dry_run(name, count, first, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main([f"configs/sweeps/{name}.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"sweep configs/sweeps/{name}.yaml: {count} runs, 2 rank(s) each, outputs "
                      f"in runs/sweeps/{name}/")
    assert len(out) == 1 + count
    assert out[1].split()[:2] == ["[0]", first]


def test_index_out_of_range(tmp_path, base_file):
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"moe.top_k": [1, 2]}}))
    with pytest.raises(UserError, match=r"--index 2 is out of range: .* has 2 runs \(0 to 1\)"):
        main([str(path), "--index", "2", "--dry-run"])
