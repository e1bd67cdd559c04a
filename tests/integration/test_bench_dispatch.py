"""The dispatch benchmark runs on CPU (tiny sizes) and writes its JSON."""

import json
import subprocess
import sys

from helpers import REPO


def test_bench_dispatch_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_dispatch.py", "--nodes", "2",
                        "--ranks-per-node", "2", "--tokens", "64", "--hidden", "16",
                        "--experts", "4", "--iters", "1", "--warmup", "0", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| uniform | flat |" in r.stdout and "projected per MoE layer" in r.stdout
    data = json.loads(out.read_text())
    measured = {(m["routing"], m["dispatcher"]): m for m in data["measured"]}
    for routing in ("uniform", "local_bias", "node_limited"):
        flat, hier = measured[routing, "flat"], measured[routing, "hierarchical"]
        # The way back is one row per slot in both; the way out sends a row once per node.
        assert hier["bytes_cross_node_combine"] == flat["bytes_cross_node_combine"] > 0
        assert flat["rows_per_remote_slot"] == 1.0 >= hier["rows_per_remote_slot"]
        assert hier["messages_cross_node"] < flat["messages_cross_node"]
    # Top-2 on one node per token: each remote token's row crosses once for its two slots.
    limited = measured["node_limited", "hierarchical"]
    assert limited["rows_per_remote_slot"] == 0.5
    assert limited["bytes_cross_node"] < measured["node_limited", "flat"]["bytes_cross_node"]
    # Biasing routing towards the local node keeps more slots on it.
    assert measured["local_bias", "flat"]["same_node_share"] > \
        measured["uniform", "flat"]["same_node_share"]
    proj = data["projected"]
    assert {p["nodes"] for p in proj} == {2, 4, 8, 16, 32, 64}
    at64 = {p["dispatcher"]: p for p in proj if p["nodes"] == 64 and p["routing"] == "uniform"}
    assert at64["hierarchical"]["cross_messages"] < at64["flat"]["cross_messages"]
    limited64 = {p["dispatcher"]: p for p in proj if p["nodes"] == 64
                 and p["routing"] == "node_limited"}
    assert limited64["hierarchical"]["cross_node_MB"] < limited64["flat"]["cross_node_MB"]
