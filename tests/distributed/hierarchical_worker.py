"""torchrun worker for test_hierarchical.py: flat vs hierarchical dispatch on the same layer.

4 ranks as 2 simulated nodes x 2 ranks, EP=4. For each scenario the same layer
(same weights, same input) runs forward and backward once with the flat
dispatcher and once with the hierarchical one; each rank saves both results
and the traffic counters, plus a hand count of the flat traffic from the
routing map.

usage: hierarchical_worker.py OUT_DIR
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from locmoe_train.config import load_config  # noqa: E402
from locmoe_train.model.gpt import transformer_config  # noqa: E402
from locmoe_train.model.init import init_parameters  # noqa: E402
from locmoe_train.moe.dispatcher import AllToAllDispatcher  # noqa: E402
from locmoe_train.moe.hierarchical import HierarchicalDispatcher  # noqa: E402
from locmoe_train.moe.layer import MoELayer  # noqa: E402
from locmoe_train.parallel.state import destroy_parallel, init_parallel  # noqa: E402

S, B, D, F, E = 8, 2, 32, 16, 8
SCENARIOS = {
    "dropless": [],
    "capacity_padded": ["moe.capacity_factor=0.5", "moe.pad_to_capacity=true"],
    # Experts 4-7 (node 1) never chosen: node 1 receives nothing, empty buckets everywhere.
    "empty_node": [],
    # Only expert 0 is ever chosen by rank 3's tokens... and every rank's top-2 is {0, 1}.
    "one_rank_busy": [],
    # DeepSeek-V3 node limit: each token's 2 experts on a single node.
    "node_limited": ["moe.max_nodes_per_token=1"],
}


def run(name, out_dir):
    cfg = load_config(None, [f"moe.num_experts={E}", "moe.top_k=2", f"model.hidden_size={D}",
                             "model.num_attention_heads=4", "parallel.ep=4",
                             "parallel.ranks_per_node=2", "moe.dispatcher=hierarchical",
                             *SCENARIOS[name]])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 1)
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe, ffn_hidden_size=F,
                     parallel=pctx.moe)
    init_parameters(layer, cfg, pctx)
    assert isinstance(layer.dispatcher, HierarchicalDispatcher)
    gen = torch.Generator().manual_seed(100 + pctx.rank)
    x = torch.randn(S, B, D, generator=gen)
    proj = torch.randn(S, B, D, generator=gen)
    if name in ("empty_node", "one_rank_busy"):
        x[..., -1] = 3.0
        banned = list(range(4, 8)) if name == "empty_node" else list(range(2, 8))
        with torch.no_grad():
            layer.router.weight[banned, -1] = -10.0
    hier = layer.dispatcher
    flat = AllToAllDispatcher(E, pctx.ep_group, 4, cfg.moe.pad_to_capacity,
                              pctx.ep_topology.node_of_ep, pctx.ep_rank)
    results = {}
    for kind, disp in (("flat", flat), ("hier", hier)):
        layer.dispatcher = disp
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        aux = layer.pop_aux_loss()
        ((out * proj).sum() + aux).backward()
        results[kind] = {"out": out.detach(), "dx": xi.grad, "w13": layer.experts.w13.grad.clone(),
                         "w2": layer.experts.w2.grad.clone(),
                         "router": layer.router.weight.grad.clone(),
                         "traffic": disp.pop_traffic()}
    # Hand count of the flat traffic from the routing: rows to each EP rank, both ways.
    layer.dispatcher = flat
    routing = layer.router(x.reshape(-1, D))
    if cfg.moe.pad_to_capacity:
        rows_to = [routing.capacity * (E // 4)] * 4
    else:
        counts = routing.routing_map_TE.sum(0)
        rows_to = [int(counts[r * 2:(r + 1) * 2].sum()) for r in range(4)]
    rows_from = torch.tensor(rows_to)
    recv = torch.empty_like(rows_from)
    dist.all_to_all_single(recv, rows_from)
    node = pctx.ep_topology.node_of_ep
    me = pctx.ep_rank
    hand = {"bytes_intra_node": 0, "bytes_cross_node": 0, "messages_cross_node": 0}
    for peer in range(4):
        if peer == me:
            continue
        for rows in (rows_to[peer], int(recv[peer])):  # dispatch sends, combine sends back
            if rows == 0:
                continue
            if node[peer] == node[me]:
                hand["bytes_intra_node"] += rows * D * 4
            else:
                hand["bytes_cross_node"] += rows * D * 4
                hand["messages_cross_node"] += 1
    results["hand"] = hand
    expert_node = torch.tensor(node)[torch.arange(E) // (E // 4)]
    nodes_used = [len(set(expert_node[row].tolist())) for row in routing.routing_map_TE]
    results["max_nodes_used"] = max(nodes_used)
    torch.save(results, os.path.join(out_dir, f"{name}_rank{pctx.rank}.pt"))
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    for scenario in SCENARIOS:
        run(scenario, sys.argv[1])
    destroy_parallel()
