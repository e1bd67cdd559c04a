"""``locmoe-train report`` on real tiny runs: every plot, the summary table, the errors."""

import os
import shutil
import struct
import sys

import pytest

from helpers import read_metrics, run_main
from locmoe_train import report
from locmoe_train.report import plots
from locmoe_train.report.runs import Run, capacity_kind, tokens_per_expert_per_step
from locmoe_train.errors import UserError

TINY = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--moe.num_experts=4", "--data.seq_len=32", "--train.global_batch_size=4",
        "--train.micro_batch_size=4", "--optim.warmup_steps=3", "--optim.lr=5e-3",
        "--optim.min_lr=5e-4", "--train.eval_samples=8", "--logging.log_interval=4",
        "--train.max_steps=16", "--train.eval_interval=8", "--parallel.ep=1"]
LINE_PLOTS = ["loss", "lr", "tokens_per_s", "imbalance", "capacity", "capacity_frontier",
              "dropped_fraction", "same_node_share"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """Two runs whose directories share a basename: top-2 dropless, and LocMoE+ with a
    capacity schedule (so capacity, events and drops are logged)."""
    root = tmp_path_factory.mktemp("report_runs")
    plans = {"topk/run": ["--config", "configs/quickstart_topk.yaml", "--moe.top_k=2"],
             "locmoe/run": ["--config", "configs/ablations/locmoe_plus_linear_decay.yaml",
                            "--moe.capacity.decay_fraction=0.5"]}
    dirs = []
    for sub, args in plans.items():
        run_dir = root / sub
        r = run_main([*args, *TINY, f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
                      "--logging.console=false"])
        assert r.returncode == 0, r.stderr[-3000:]
        dirs.append(str(run_dir))
    return dirs


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, path
    return struct.unpack(">II", head[16:24])


def final_values(run_dir: str) -> tuple[float, float]:
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    return train[-1]["loss"], min(r["val_loss"] for r in records if "val_loss" in r)


def table_row(md: str, name: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, md
    return [c.strip() for c in rows[0].strip("|").split("|")]


@pytest.mark.slow  # builds the module's two training runs (~30 s on 2 shared cores)
def test_two_runs_overlaid(runs, tmp_path):
    out = tmp_path / "report"
    r = run_main(["report", *runs, f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: 10 plots and {out}/report.md for 2 run(s)" in r.stdout
    line_w, line_h = (round(x * report.DPI) for x in report.FIG_SIZE)
    # Same basename "run": names take the parent directory, and so do the heatmap files.
    expected = {f"{p}.png": (line_w, line_h) for p in LINE_PLOTS}
    for name in ("topk_run", "locmoe_run"):
        expected[f"expert_load_{name}.png"] = (line_w, round(report._heatmap_height(2) * 100))
    assert sorted(os.listdir(out)) == sorted([*expected, "report.md"])
    for name, size in expected.items():
        assert png_size(out / name) == size, name
        assert os.path.getsize(out / name) > 15_000, name  # axes, lines and text, not blank

    md = (out / "report.md").read_text()
    top, loc = table_row(md, "topk/run"), table_row(md, "locmoe/run")
    for row, run_dir in ((top, runs[0]), (loc, runs[1])):
        loss, best_val = final_values(run_dir)
        assert row[1] == "16"
        assert row[2] == f"{loss:.4f}" and row[3] == f"{best_val:.4f}"
    last = [r for r in read_metrics(runs[1]) if "loss" in r][-1]
    # Top-2 dropless on one node: nothing dropped, everything local, no capacity.
    assert top[7:10] == ["0.000", "1.000", "-"]
    assert loc[6] == f"{last['moe_imbalance']:.3f}"
    assert loc[9] == str(last["moe_capacity"]) and last["moe_capacity"] < 9  # C0 = 9, decayed
    images = [line[line.index("(") + 1:-1] for line in md.splitlines() if line.startswith("![")]
    assert sorted(images) == sorted(expected)
    assert "## Notes" not in md


@pytest.mark.slow  # uses the module's training runs
def test_single_run_defaults_and_damaged_files(runs, tmp_path):
    run_dir = tmp_path / "myrun"
    shutil.copytree(runs[0], run_dir)
    # An earlier run rotated aside, and a line torn by a crash: both must not break the report.
    shutil.copy(run_dir / "metrics.jsonl", run_dir / "metrics.1.jsonl")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 17, "loss": 1.0, "lr"')
    assert report.main([str(run_dir)]) == 0
    out = run_dir / "report"
    plots = [f"{p}.png" for p in LINE_PLOTS if p not in ("capacity", "capacity_frontier")]
    plots += ["expert_load_myrun.png"]
    assert sorted(os.listdir(out)) == sorted([*plots, "report.md"])
    md = (out / "report.md").read_text()
    loss, best_val = final_values(runs[0])
    assert table_row(md, "myrun")[2:4] == [f"{loss:.4f}", f"{best_val:.4f}"]
    assert f"- skipped 1 unreadable line(s) in {run_dir}/metrics.jsonl" in md
    assert f"- ignored metrics.1.jsonl in {run_dir} (earlier runs in the same directory)" in md
    assert "- no capacity plot: no run has a capacity" in md
    assert "- no capacity-frontier plot: it needs two or more runs" in md


def test_missing_metrics_exits_2(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    r = run_main(["report", str(tmp_path)])
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: {tmp_path}/metrics.jsonl not found: '{tmp_path}' is not a run directory with "
        f"metrics (pass the logging.run_dir of a run that had logging.jsonl=true).")
    assert not (tmp_path / "report").exists()


def test_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match=r"pip install 'locmoe-train\[report\]'"):
        report.main([str(tmp_path)])


def test_run_names():
    assert report.run_names(["x/a/run", "y/a/run", "z/run"]) == ["x/a/run", "y/a/run", "z/run"]
    assert report.run_names(["r", "r/"]) == ["r", "r#2"]
    assert report.file_safe("x/a run") == "x_a_run"


def _run(name, moe, records, val=4.0):
    return Run(name, "/x", train=records, evals=[{"step": records[-1]["step"], "val_loss": val}],
               config={"moe": moe})


def test_frontier_points_average_tokens_per_expert_over_the_logged_windows():
    # Records sum their window: step 1 alone, then steps 2-10 and 11-20.
    recs = [{"step": 1, "loss": 1.0, "moe": {"layer_0": {"tokens_per_expert": [4, 0]},
                                            "layer_1": {"tokens_per_expert": [2, 2]}}},
            {"step": 10, "loss": 1.0, "moe": {"layer_0": {"tokens_per_expert": [18, 18]},
                                             "layer_1": {"tokens_per_expert": [36, 0]}}},
            {"step": 20, "loss": 1.0, "moe": {"layer_0": {"tokens_per_expert": [10, 10]},
                                             "layer_1": {"tokens_per_expert": [20, 0]}}}]
    # Per expert and layer: (2 + 18 + 10) over 20 steps.
    assert tokens_per_expert_per_step(_run("a", {}, recs)) == pytest.approx(1.5)
    runs = [_run("cf1.1", {"router": "topk", "top_k": 1, "capacity_factor": 1.1}, recs, 4.1),
            _run("drop", {"router": "topk", "top_k": 2}, recs, 3.9),
            _run("lp", {"router": "locmoe_plus", "top_k": 1}, recs, 4.0),
            _run("lp_fixed", {"router": "locmoe_plus", "top_k": 1,
                              "capacity": {"policy": "fixed"}}, recs, 4.2),
            _run("lp_tcr", {"router": "locmoe_plus", "locmoe_plus": {"mode": "tcr"}}, recs),
            Run("nomoe", "/x", train=[{"step": 1, "loss": 1.0}], evals=[])]
    points = {p["name"]: p for p in plots.frontier_points(runs)}
    assert {n: p["kind"] for n, p in points.items()} == {
        "cf1.1": "fixed", "drop": "dropless", "lp": "adaptive", "lp_fixed": "fixed",
        "lp_tcr": "dropless"}
    assert points["cf1.1"]["val_loss"] == 4.1 and points["drop"]["top_k"] == 2
    assert capacity_kind(Run("n", "/x", [], [])) == "unknown"
