"""The locality-aware capacity on 2 ranks (each its own node): every rank ends up with
the same same-node share, the one of all ranks' token choices together, and caps that
favour its own node's experts."""

from __future__ import annotations

import torch

from harness import run_ranks
from locmoe_train.config import MoEConfig
from locmoe_train.moe.routers import RouterSetup, router_class

NODES = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _worker(rank: int) -> dict:
    cfg = MoEConfig(router="locmoe_plus", num_experts=8, top_k=1, locality_loss_coeff=0.01)
    cfg.capacity.factor0, cfg.capacity.policy = 1.0, "fixed"
    router = router_class("locmoe_plus")(cfg, 16, RouterSetup(
        expert_node_E=NODES, local_experts_E=NODES == rank, seq_len=64, max_steps=100)).train()
    with torch.no_grad():  # each rank's row pulls towards its node, by different amounts
        router.node_bias[rank, 4 * rank:4 * rank + 4] = 0.5 + rank
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(rank))
    local = chosen = 0
    for step in range(1, 11):
        out = router(x)
        local += int(out.selected_TE[:, 4 * rank:4 * rank + 4].sum())
        chosen += int(out.selected_TE.sum())
        router.step_end(torch.zeros(8), step=step)
    caps = router._capacity_per_expert(router.controller.local_capacity(256), 256)
    return {"share": router.locality_share, "local": local, "chosen": chosen,
            "caps": caps.tolist()}


def test_every_rank_gets_the_global_same_node_share():
    r0, r1 = run_ranks(_worker, 2)
    expected = (r0["local"] + r1["local"]) / (r0["chosen"] + r1["chosen"])
    assert r0["share"] == r1["share"] == expected
    assert r0["local"] / r0["chosen"] != r1["local"] / r1["chosen"]  # the ranks differ
    # C_local = 32 for 256 tokens; each rank's own node gets the larger caps.
    assert r0["caps"][:4] == r1["caps"][4:] and r0["caps"][4:] == r1["caps"][:4]
    assert min(r0["caps"][:4]) > 32 > max(r0["caps"][4:])
