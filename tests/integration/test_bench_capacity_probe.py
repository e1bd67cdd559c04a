"""The loss probe's overhead benchmark runs on CPU (tiny config) and writes its JSON."""

import json
import subprocess
import sys

from helpers import REPO


def test_bench_capacity_probe_cpu_smoke(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/bench_capacity_probe.py", "--config",
                        "configs/quickstart.yaml", "--model.vocab_size=512",
                        "--model.num_layers=2", "--data.seq_len=64", "--parallel.ep=1",
                        "--train.global_batch_size=4", "--train.micro_batch_size=2",
                        "--steps", "2", "--warmup", "1", "--probes", "2", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    # quickstart: top-2 over 8 experts at s = 64: C0 = ceil(1.1 * 64 * 2 / 8) = 18, floor 8.
    assert data["candidates"] == [18, 16, 13, 11, 8] and data["micro_batches_per_step"] == 2
    assert data["step_s"] > 0 and data["probe_s"] > 0 and data["interval"] == 100
    assert data["probe_over_step"] == data["probe_s"] / data["step_s"]
    assert data["share_of_training"] == data["probe_s"] / (100 * data["step_s"] + data["probe_s"])
