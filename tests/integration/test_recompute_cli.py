"""train.recompute through the CLI's main (startup summary, metrics), and the CPU benchmark
of what each mode keeps."""

import json
import subprocess
import sys

from helpers import REPO, read_metrics, run_main


def test_cli_trains_with_full_recompute(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    r = run_main(["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
                  "--model.hidden_size=64", "--data.seq_len=32", "--train.global_batch_size=4",
                  "--train.micro_batch_size=2", "--train.max_steps=2", "--train.eval_interval=0",
                  "--train.eval_samples=4", "--logging.log_interval=1", "--parallel.ep=1",
                  "--train.recompute=full", f"--data.path={tiny_data}",
                  f"--logging.run_dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precision fp32, recompute full" in r.stdout
    train = [x for x in read_metrics(str(run_dir)) if "loss" in x]
    # Counted once: dropless top-2, 4 sequences x 32 tokens per step, 2 slots each.
    assert [x["step"] for x in train] == [1, 2]
    assert all(sum(x["moe"]["layer_0"]["tokens_per_expert"]) == 4 * 32 * 2 for x in train)
    assert "recompute: full" in (run_dir / "config.yaml").read_text()


def test_bench_recompute_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_recompute.py", "--config",
                        "configs/quickstart.yaml", "--model.vocab_size=256",
                        "--model.num_layers=2", "--model.attention=megatron", "--data.seq_len=64",
                        "--train.global_batch_size=2", "--train.micro_batch_size=2",
                        "--steps", "1", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| full |" in r.stdout
    res = {x["recompute"]: x for x in json.loads(out.read_text())["results"]}
    assert list(res) == ["none", "selective", "full"]
    held = {m: x["forward_held_bytes"] for m, x in res.items()}
    # Selective drops at least the attention scores and probabilities, [b, h, s, s]
    # fp32 twice per layer; full keeps little more than the layer inputs and the logits.
    assert held["none"] - held["selective"] >= 2 * 2 * (2 * 4 * 64 * 64 * 4)
    assert held["full"] < held["selective"]
    assert len({x["loss"] for x in res.values()}) == 1  # the same step in every mode
