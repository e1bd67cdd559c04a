"""scripts/locmoe_plus_results.py: the docs' tables and checks from sweep run directories."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location(
        "locmoe_plus_results", os.path.join(REPO, "scripts", "locmoe_plus_results.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake(root, name, moe, tpe, val, same=0.5, cross=4e6, cap=None):
    d = root / name
    d.mkdir()
    layer = {"tokens_per_expert": [tpe] * 8, "dropped_fraction": 0.1, "same_node_share": same}
    if cap is not None:
        layer["capacity"] = cap
    recs = [{"step": s, "loss": 4.0, "bytes_cross_node": cross,
             "moe": {"layer_0": layer, "layer_1": layer}} for s in (10, 20)]
    recs.append({"step": 20, "val_loss": val})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (d / "config.yaml").write_text(yaml.safe_dump({"moe": moe}))


def test_table_frontier_and_locality_checks(tmp_path, capsys):
    top1 = {"router": "topk", "top_k": 1}
    _fake(tmp_path, "top1_cf1.1", {**top1, "capacity_factor": 1.1}, 2000, 4.0)
    _fake(tmp_path, "top1_cf0.6", {**top1, "capacity_factor": 0.6}, 1000, 4.2)
    lp = {"router": "locmoe_plus", "top_k": 1}
    _fake(tmp_path, "locmoe_plus", lp, 1500, 4.05, cap=18)
    _fake(tmp_path, "locmoe_plus_locality", {**lp, "locality_loss_coeff": 0.01}, 1500, 4.08,
          same=0.8, cross=1.6e6, cap=18)
    mod = _script()
    assert mod.main([str(tmp_path), "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    # Each record sums 10 steps: 2000 tokens per expert per 10 steps = 200 per step.
    assert "| top1_cf1.1 | 20 | 4.0000 | +0.00% | 200.0 | 1.000 |" in out
    assert "| locmoe_plus | 20 | 4.0500 | +1.25% | 150.0 | 0.750 |" in out
    # The fixed line at 150 tokens/expert: halfway between 4.2 and 4.0.
    assert "- locmoe_plus: tokens/expert 150.0; frontier 4.1000 there: on or below (-0.0500)" in out
    assert ("- locality: same-node share 0.500 -> 0.800 (at the end 0.500 -> 0.800); "
            "cross-node MB/step 4.00 -> 1.60 (-60.0%; at the end -60.0%); "
            "val loss 4.0500 -> 4.0800 (+0.74%)") in out
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["locmoe_plus"]["kind"] == "adaptive" and rows["locmoe_plus"]["capacity_end"] == [18, 18]
    assert mod.frontier_at(list(rows.values()), 1, 2500) is None  # beyond the fixed runs
