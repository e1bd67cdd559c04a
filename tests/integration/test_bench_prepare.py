"""The preparation benchmark runs end to end on a tiny corpus and writes its JSON."""

import json
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_bench_prepare_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_prepare.py", "--size-mb", "0.5",
                        "--small-mb", "0.2", "--tokenizer-mb", "0.3", "--workers", "1,2",
                        "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["corpus"]["bytes"] >= 500_000
    runs = data["runs"]
    assert [x["workers"] for x in runs] == [1, 2]
    assert data["identical_outputs"] is True and len({x["digest"] for x in runs}) == 1
    assert runs[0]["tokens"] == runs[1]["tokens"] > 100_000
    for x in runs:
        assert x["tokens_per_s"] == pytest.approx(x["tokens"] / x["wall_s"], rel=0.01)
        assert x["peak_rss_main_mib"] > 0
    assert runs[0]["peak_rss_largest_worker_mib"] == 0 < runs[1]["peak_rss_largest_worker_mib"]
    assert data["memory_vs_size"]["small"]["tokens"] < data["memory_vs_size"]["large"]["tokens"]
    best = max(x["tokens_per_s"] for x in runs)
    assert data["projection_10B_tokens_hours"] == round(1e10 / best / 3600, 1)
