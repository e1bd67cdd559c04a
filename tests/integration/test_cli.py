"""The CLI end to end: loss falls on real text; bad input exits 2 and writes nothing.

One-rank runs call the CLI's ``main`` in this process (``helpers.run_main``); the
two-rank run goes through torchrun, and one bad input through a real process."""

import json
import os

import pytest

from helpers import read_metrics, run_cli, run_main

TINY = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--moe.num_experts=4", "--moe.top_k=2", "--data.seq_len=64",
        "--train.global_batch_size=8", "--train.micro_batch_size=4",
        "--optim.warmup_steps=5", "--optim.lr=5e-3", "--optim.min_lr=5e-4",
        "--train.eval_samples=16", "--logging.log_interval=5"]


def test_training_loss_falls(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    r = run_main(["--config", "configs/quickstart_topk.yaml", *TINY, f"--data.path={tiny_data}",
                  "--parallel.ep=1", "--train.max_steps=40", "--train.eval_interval=20",
                  f"--logging.run_dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 40/40" in r.stdout and "done: completed after 40 steps" in r.stdout
    records = read_metrics(str(run_dir))
    train = [x for x in records if "loss" in x]
    val = [x for x in records if "val_loss" in x]
    assert [x["step"] for x in train] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    previous = 0
    for x in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "moe"} <= x.keys()
        assert x["tokens_per_s"] > 0
        for layer in ("layer_0", "layer_1"):
            counts = x["moe"][layer]["tokens_per_expert"]
            assert len(counts) == 4
        # Dropless top-2: every token of every step since the last record went to 2 experts.
        steps, previous = x["step"] - previous, x["step"]
        assert sum(x["moe"]["layer_0"]["tokens_per_expert"]) == 8 * 64 * 2 * steps
        assert x["moe"]["layer_0"]["dropped_fraction"] == pytest.approx(0.0, abs=1e-6)
    # ln(512) = 6.24 at initialisation; 40 steps on real code must get well below it.
    assert train[0]["loss"] > 6.0
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert [x["step"] for x in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["steps"] == 40
    # The resolved config (vocab size filled in from the data) is in the run directory.
    assert "vocab_size: 512" in (run_dir / "config.yaml").read_text()


def test_the_quickstart_config_trains_with_locmoe_plus(tmp_path, tiny_data):
    """configs/quickstart.yaml itself (LocMoE+, top-2, TCR then ECR), shrunk: the loss
    falls, expert choice caps every expert at its capacity, evaluation routes by token
    choice."""
    run_dir = tmp_path / "run"
    r = run_main(["--config", "configs/quickstart.yaml", *TINY, f"--data.path={tiny_data}",
                  "--parallel.ep=1", "--train.max_steps=40", "--train.eval_interval=20",
                  f"--logging.run_dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_metrics(str(run_dir))
    train = [x for x in records if "loss" in x]
    val = [x for x in records if "val_loss" in x]
    assert train[0]["loss"] > 6.0 and train[-1]["loss"] < train[0]["loss"] - 1.0
    assert val[1]["val_loss"] < val[0]["val_loss"]
    # C0 = ceil(1.1 * 64 * 2 / 4) = 36 per 64-token sequence; 8 sequences per step.
    layer = train[-1]["moe"]["layer_0"]
    assert layer["capacity"] == 36 and "q" in layer
    steps = train[-1]["step"] - train[-2]["step"]
    assert max(layer["tokens_per_expert"]) <= 36 * 8 * steps
    assert "router locmoe_plus" in r.stdout or "locmoe_plus" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model.hiden_size=64"], "unknown config key 'model.hiden_size'. Did you mean 'hidden_size'?"),
    (["--parallel.ep=3"], "moe.num_experts=8 is not divisible by parallel.ep=3"),
    (["--parallel.ep=2"], "parallel.ep=2 x expert tensor parallel 1 = 2 does not divide the "
                          "world size 1"),
    (["--data.path=/nonexistent/data"], "locmoe-train prepare-data"),
    (["--train.global_batch_size=12", "--train.micro_batch_size=4", "--parallel.ep=2",
      "--check", "--world-size=2"],
     "train.global_batch_size (12) must be divisible by train.micro_batch_size (4) x "
     "data-parallel size (2) = 8; use train.global_batch_size 8 or 16"),
    (["--data.seq_len=100000"], "data.seq_len"),
    # Accepted before: a run with no validation, a run with a negative clip.
    (["--train.eval_interval=-5"],
     "error: train.eval_interval=-5 must be >= 0 (0: validate only at the end)."),
    (["--optim.grad_clip=-1"], "error: optim.grad_clip=-1.0 must be >= 0 (0 disables clipping)."),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_data, args, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = sorted(os.listdir(run_dir))
    data = [] if any(a.startswith("--data.path") for a in args) else [f"--data.path={tiny_data}"]
    r = run_main(["--config", "configs/quickstart_topk.yaml", f"--logging.run_dir={run_dir}",
                  "--parallel.ep=1", *data, *args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert r.stderr.strip().startswith("error:")
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(run_dir)) == before
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_missing_config_file_exits_2():
    """In a real process: the exit status is the interpreter's (the tests above call main)."""
    r = run_cli(["--config", "configs/nope.yaml"])
    assert r.returncode == 2
    assert "config file 'configs/nope.yaml' does not exist" in r.stderr


def test_check_mode_accepts_valid_layout(tiny_data):
    r = run_main(["--config", "configs/quickstart_topk.yaml", f"--data.path={tiny_data}",
                  "--check", "--world-size=2"])
    assert r.returncode == 0, r.stderr
    assert "config OK for world size 2" in r.stdout


@pytest.mark.parametrize("router_args", [
    ["--moe.router=expert_choice"],
    ["--moe.router=aux_free", "--moe.aux_loss_coeff=0"],
    ["--moe.router=hash", "--moe.top_k=1"],
    ["--moe.capacity_factor=1.0", "--moe.pad_to_capacity=true", "--moe.drop_policy=position",
     "--moe.z_loss_coeff=0.001"],
])
def test_routers_train_end_to_end(tmp_path, tiny_data, router_args):
    run_dir = tmp_path / "run"
    r = run_main(["--config", "configs/quickstart_topk.yaml", *TINY, f"--data.path={tiny_data}",
                  "--parallel.ep=1", "--train.max_steps=15", "--train.eval_interval=0",
                  f"--logging.run_dir={run_dir}", *router_args])
    assert r.returncode == 0, r.stderr[-3000:]
    train = [x for x in read_metrics(str(run_dir)) if "loss" in x]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    layer = train[-1]["moe"]["layer_0"]
    assert len(layer["tokens_per_expert"]) == 4
    if "--moe.z_loss_coeff=0.001" in router_args:
        assert layer["z_loss"] > 0 and layer["dropped_fraction"] > 0
    if "--moe.router=hash" in router_args:
        # One expert per token, never dropped.
        assert layer["dropped_fraction"] == pytest.approx(0.0, abs=1e-6)
        assert layer["unrouted_fraction"] == 0.0


def test_locmoe_plus_two_simulated_nodes(tmp_path, tiny_data):
    """LocMoE+ end to end on 2 ranks as 2 simulated nodes: capacity cuts, locality loss on.

    The features of a 12-step run are still near isotropic, where the default statistic
    rightly keeps C0; METHOD's first statistic (outsider_q) cuts there, which is what
    this test needs to see a cut travel through training, metrics and events.
    """
    run_dir = tmp_path / "run"
    r = run_cli(["--config", "configs/ablations/locmoe_plus.yaml", *TINY,
                 f"--data.path={tiny_data}", "--moe.top_k=1", "--train.max_steps=12",
                 "--train.eval_interval=12",
                 "--logging.log_interval=2", "--moe.capacity.warmup=2", "--moe.capacity.interval=2",
                 "--moe.capacity.ema=0.0", "--moe.capacity.multiple=1",
                 "--moe.capacity.statistic=outsider_q",
                 f"--logging.run_dir={run_dir}"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "capacity: controller from factor 1.1" in r.stdout
    records = read_metrics(str(run_dir))
    train = [x for x in records if "loss" in x]
    layer = train[-1]["moe"]["layer_0"]
    assert {"capacity", "capacity_target", "capacity_estimate", "q", "c_min", "delta0",
            "same_node_share", "locality_loss", "load_balancing_loss"} <= layer.keys()
    assert 0.0 <= layer["same_node_share"] <= 1.0 and layer["locality_loss"] > 0
    c0 = 18  # ceil(1.1 * 64 tokens * top-1 / 4 experts)
    assert train[0]["moe"]["layer_0"]["capacity"] == c0
    events = [e for x in train for e in x.get("capacity_events", [])]
    assert events, "outsider_q cuts near-isotropic features at initialisation"
    for e in events:
        assert e["reason"] in ("reestimate", "rollback") and e["new"] != e["old"]
    assert layer["capacity"] < c0 and layer["capacity"] >= 8  # floor: ceil(0.4 * 18)
    # A cut means fewer tokens processed: some slots are dropped.
    assert layer["dropped_fraction"] > 0
