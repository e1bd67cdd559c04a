"""The training benchmark runs on CPU (tiny config) for both MoE layers and writes JSON."""

import json
import subprocess
import sys

import pytest

from helpers import REPO


def test_bench_train_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_train.py", "--config",
                        "configs/quickstart.yaml", "--model.vocab_size=512",
                        "--model.num_layers=2", "--data.seq_len=64",
                        "--train.global_batch_size=4", "--train.micro_batch_size=2",
                        "--steps", "2", "--warmup", "1", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| locmoe | cpu float32 |" in r.stdout and "| megatron |" in r.stdout
    data = json.loads(out.read_text())
    assert [x["impl"] for x in data["results"]] == ["locmoe", "megatron"]
    for x in data["results"]:
        assert x["tokens_per_s"] > 0 and x["step_time_s"] > 0
        assert x["model_tflops"] == pytest.approx(
            data["flops_per_token"] * x["tokens_per_s"] / 1e12)
    # FLOPs per token (train) by hand: L=2, h=128, s=64, 4 heads (kv=128), ffn 384,
    # 8 experts top-2, vocab 512: 3 * (2*(attn) + 2*(moe) + 2*h*V).
    h, s, f, V = 128, 64, 384, 512
    attn = 2 * h * (h + 2 * h) + 2 * h * h + 4 * s * h
    moe = 2 * 3 * 2 * h * f + 2 * h * 8
    assert data["flops_per_token"] == 3 * (2 * attn + 2 * moe + 2 * h * V)
