"""The checkpoint benchmark runs end to end (a small model, 2 gloo ranks, ZeRO-1, the old
code from git against this checkout) and writes its JSON: the old code wrote everything
from data-parallel rank 0, the new one splits the bytes evenly, and both loaded back the
weights they saved."""

import importlib.util
import json
import os
import subprocess

from helpers import REPO


def test_bench_checkpoint_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_checkpoint", os.path.join(REPO, "scripts", "bench_checkpoint.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    # The baseline is extracted from git history; a shallow clone may not hold it.
    has_old = subprocess.run(["git", "-C", REPO, "cat-file", "-e", "15ada76^{commit}"],
                             capture_output=True).returncode == 0
    assert bench.main(["--quick", "--world", "2", "--layouts", "dp4_zero1", "--out", str(out),
                       "--old-ref", "15ada76" if has_old else "none"]) == 0
    row = json.loads(out.read_text())["layouts"]["dp4_zero1"]
    new = row["new"]
    assert new["loaded_exactly"] and new["busiest_over_even_share"] <= 1.1
    if has_old:
        old = row["old"]
        assert old["loaded_exactly"] and "async_blocked_s" not in old
        assert old["busiest_over_even_share"] > 1.5  # rank 0 wrote every tensor
    assert row["targets_met"]["busiest_at_most_1.5x_share"]
    assert new["async_blocked_s"] > 0
