"""A run whose capacity comes from the loss probe resumes exactly (in-process CLI).

The probe decides at steps 2, 4, 6 and 8 of a tiny LocMoE+ run with dropout on;
one run goes straight to step 8, the other stops at step 4 (a checkpoint) and
resumes. The losses, the capacity events and every logged capacity gauge
(capacity, target, the probe's loss change) must be the same, bit for bit.
"""

from __future__ import annotations

from helpers import read_metrics
from locmoe_train import train

TINY = ["--config", "configs/quickstart.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--model.num_attention_heads=4", "--moe.num_experts=4",
        "--moe.top_k=1", "--data.seq_len=32", "--parallel.ep=1", "--train.global_batch_size=8",
        "--train.micro_batch_size=4", "--train.max_steps=8", "--train.eval_interval=0",
        "--train.eval_samples=8", "--optim.warmup_steps=2", "--optim.lr=5e-3",
        "--model.attention_dropout=0.1", "--model.hidden_dropout=0.1",
        "--logging.log_interval=1", "--logging.console=false", "--checkpoint.interval=2",
        "--moe.capacity.estimator=loss_probe", "--moe.capacity.warmup=2",
        "--moe.capacity.interval=2", "--moe.capacity.probe_tolerance=0.02"]
GAUGES = ("capacity", "capacity_target", "capacity_estimate", "probe_rise")


def _trace(run_dir):
    out = {}
    for r in read_metrics(str(run_dir)):
        if "loss" in r:
            layers = {k: [v.get(g) for g in GAUGES] for k, v in r["moe"].items()}
            out[r["step"]] = (r["loss"], layers, r.get("capacity_events"))
    return out


def test_probe_state_resumes_exactly(tmp_path, tiny_data, megatron_reset):
    args = TINY + [f"--data.path={tiny_data}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(args + [f"--logging.run_dir={straight}"]) == 0
    assert train.main(args + [f"--logging.run_dir={split}", "--train.exit_at_step=4"]) == 0
    assert train.main(args + [f"--logging.run_dir={split}", "--checkpoint.resume=auto"]) == 0
    want, got = _trace(straight), _trace(split)
    assert sorted(want) == list(range(1, 9)) and got == want
    # The probe acted: it moved C, and its gauge is logged from step 2 on.
    assert any(events for _, _, events in want.values())
    assert all(layers["layer_0"][3] is not None for s, (_, layers, _) in want.items() if s >= 2)
