"""The training benchmark runs on CPU (tiny config) for both MoE layers and writes JSON."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, free_port


def test_bench_train_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_train.py", "--config",
                        "configs/quickstart_topk.yaml", "--model.vocab_size=512",
                        "--model.num_layers=2", "--data.seq_len=64",
                        "--train.global_batch_size=4", "--train.micro_batch_size=2",
                        "--steps", "2", "--warmup", "1", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| ours | cpu float32 |" in r.stdout and "| megatron | cpu float32 |" in r.stdout
    data = json.loads(out.read_text())
    res = data["results"]
    assert [(x["variant"], x["impl"], x["attention"]) for x in res] == [
        ("ours", "native", "sdpa"), ("megatron", "megatron", "megatron")]
    for x in res:
        assert x["tokens_per_s"] > 0 and x["step_time_s"] > 0
        # AdamW's two fp32 moments per parameter and a step per tensor, as held after the steps.
        assert x["dp"] == 1 and not x["distributed_optimizer"]
        assert x["optimizer_bytes_per_rank"] == x["optimizer_bytes_held"] == [
            8 * x["parameters"] + 4 * x["parameter_tensors"]]
        assert x["model_tflops"] == pytest.approx(x["flops_per_token"] * x["tokens_per_s"] / 1e12)
        # Every phase was seen by the profiler, in both MoE implementations.
        phases = x["phases_ms"]
        for p in ("attention", "router", "dispatch", "experts", "combine", "backward",
                  "optimizer"):
            assert phases[p] > 0, (x["variant"], p, phases)
        assert sum(phases.values()) < 3 * x["step_time_s"] * 1e3
    # FLOPs per token (train) by hand: L=2, h=128, s=64, 4 heads (kv=128), ffn 384,
    # 8 experts top-2, vocab 512: 3 * (2*(attn) + 2*(moe) + 2*h*V).
    h, s, f, V = 128, 64, 384, 512
    attn = 2 * h * (h + 2 * h) + 2 * h * h + 4 * s * h
    moe = 2 * 3 * 2 * h * f + 2 * h * 8
    assert res[0]["flops_per_token"] == 3 * (2 * attn + 2 * moe + 2 * h * V)


def test_bench_train_routing_variants(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_train.py", "--config",
                        "configs/quickstart_topk.yaml", "--model.vocab_size=512",
                        "--model.num_layers=1", "--data.seq_len=32",
                        "--train.global_batch_size=2", "--train.micro_batch_size=2",
                        "--steps", "1", "--warmup", "1", "--profile-steps", "0",
                        "--variants", "top2_dropless,top1_cf1.1,locmoe_plus,x:moe.top_k=3",
                        "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [(x["variant"], x["router"]) for x in res] == [
        ("top2_dropless", "topk"), ("top1_cf1.1", "topk"), ("locmoe_plus", "locmoe_plus"),
        ("x", "topk")]
    assert "phases_ms" not in res[0]
    # What the router did, unforced: slots kept per expert and step, per layer.
    tokens = 2 * 32
    top2, top1 = res[0], res[1]
    assert len(top2["tokens_per_expert"]) == 1 and len(top2["tokens_per_expert"][0]) == 8
    assert sum(top2["tokens_per_expert"][0]) == pytest.approx(2 * tokens)
    assert top2["dropped_fraction"] == 0.0 and top2["max_over_mean"][0] >= 1.0
    # top-1 at factor 1.1: at most ceil(1.1 * 64 / 8) = 9 slots per expert.
    assert max(top1["tokens_per_expert"][0]) <= 9
    assert top1["dropped_fraction"] == pytest.approx(1 - sum(top1["tokens_per_expert"][0]) / tokens,
                                                     abs=1e-4)
    env = json.loads(out.read_text())["environment"]
    assert env["torch"] and env["device"] == "cpu" and env["megatron_core"]
    # top-1 does half the expert FLOPs of top-2, top-3 one and a half times.
    h, f = 128, 384
    per_expert = 3 * 3 * 2 * h * f
    assert res[0]["flops_per_token"] - res[1]["flops_per_token"] == per_expert
    assert res[3]["flops_per_token"] - res[0]["flops_per_token"] == per_expert


def test_bench_train_sharded_optimizer_halves_state_at_dp2(tmp_path):
    """Under torchrun at DP=2 with optim.distributed each rank holds half of Adam's state."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                        "scripts/bench_train.py", "--config", "configs/quickstart_topk.yaml",
                        "--model.vocab_size=512", "--model.num_layers=1", "--data.seq_len=32",
                        "--train.global_batch_size=4", "--train.micro_batch_size=2",
                        "--steps", "1", "--warmup", "1", "--profile-steps", "0",
                        "--variants", "zero:optim.distributed=true", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("| zero | cpu float32 |") == 1  # rank 0 reports
    (x,) = json.loads(out.read_text())["results"]
    assert x["dp"] == 2 and x["distributed_optimizer"]
    per_rank = x["optimizer_bytes_per_rank"]
    assert per_rank == x["optimizer_bytes_held"] and per_rank[0] == per_rank[1]
    # Half of 16 bytes per parameter (Adam's two moments, the fp32 slice and its
    # gradient), plus per bucket (at most 4: dense/expert x decay/no decay) a 4-byte
    # step and at most one padding element (16 bytes over 2 ranks).
    assert 8 * x["parameters"] < per_rank[0] <= 8 * x["parameters"] + 4 * (4 + 8)
