"""``train.recompute`` under EP=2 (2 gloo ranks, each its own node): same gradients and counts.

The full recompute runs each MoE layer's router and both all-to-alls again in
backward. With LocMoE+ (expert choice with a binding capacity re-estimated
every step, the locality node bias and its locality-aware per-rank caps,
the same-node share re-measured every 2 steps) and with top-k through the
hierarchical dispatcher, every rank must train, count tokens and cross-node
bytes, observe and adapt exactly as without recompute.
"""

from __future__ import annotations

from harness import run_ranks
from recompute_runs import assert_same_run, train_steps

LOCMOE_EP2 = ["parallel.ep=2", "parallel.ranks_per_node=1", "train.global_batch_size=8",
              "moe.router=locmoe_plus", "moe.capacity.factor0=0.6", "moe.capacity.warmup=1",
              "moe.capacity.interval=1", "moe.locality_loss_coeff=0.01"]
# Top-k with capacity drops through the hierarchical (three-hop, deduplicating) dispatcher.
TOPK_HIER_EP2 = ["parallel.ep=2", "parallel.ranks_per_node=1", "train.global_batch_size=8",
                 "moe.router=topk", "moe.capacity_factor=1.0", "moe.dispatcher=hierarchical"]


def _worker(rank: int) -> dict:
    from locmoe_train.moe.routers import locmoe_plus

    locmoe_plus.LOCALITY_INTERVAL = 2  # re-measure the share within the 3 steps
    runs = {mode: train_steps(LOCMOE_EP2, mode) for mode in ("none", "selective", "full")}
    runs.update({f"hier_{mode}": train_steps(TOPK_HIER_EP2, mode, steps=2)
                 for mode in ("none", "full")})
    return runs


def test_recompute_matches_no_recompute_at_ep2():
    for runs in run_ranks(_worker, 2):
        for ref in (runs["none"], runs["hier_none"]):
            assert sum(float(m["moe/bytes_cross_node"].sum()) for m in ref["metrics"]) > 0
        assert all("locality_share" in g for g in runs["none"]["gauges"].values())
        for mode in ("selective", "full"):
            assert_same_run(runs["none"], runs[mode])
        assert_same_run(runs["hier_none"], runs["hier_full"])
