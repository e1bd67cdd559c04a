"""Hierarchical dispatch equals flat dispatch bit for bit (4 ranks as 2 simulated nodes),
and the byte accounting matches a hand count.

4 ranks as 2 simulated nodes x 2 ranks, EP=4. For each scenario the same layer
(same weights, same input) runs forward and backward once with the flat
dispatcher and once with the hierarchical one; each rank returns both results
and the traffic counters, plus hand counts from the routing map: the flat
traffic, and the hierarchical cross-node bytes (a token's row once per remote
node, metadata per slot, one row per slot back).
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from harness import run_ranks
from locmoe_train.config import load_config
from locmoe_train.model.gpt import transformer_config
from locmoe_train.model.init import init_parameters
from locmoe_train.moe.dispatcher import AllToAllDispatcher
from locmoe_train.moe.hierarchical import META_BYTES, HierarchicalDispatcher
from locmoe_train.moe.layer import MoELayer
from locmoe_train.parallel.state import destroy_parallel, init_parallel

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
    # Three slots per token: a per-node sum (forward or backward) would change the fp32 order.
    "top3": ["moe.top_k=3"],
}


def _run_scenario(name: str) -> dict:
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
    results["hand_hier_cross"] = _hier_cross_hand_count(routing, node, me,
                                                        cfg.moe.pad_to_capacity)
    expert_node = torch.tensor(node)[torch.arange(E) // (E // 4)]
    nodes_used = [len(set(expert_node[row].tolist())) for row in routing.routing_map_TE]
    results["max_nodes_used"] = max(nodes_used)
    parallel_state.destroy_model_parallel()
    return results


def _hier_cross_hand_count(routing, node: list[int], me: int, padded: bool) -> int:
    """Cross-node bytes this rank's tokens cause on the hierarchical path, both ways."""
    expert_node = torch.tensor(node)[torch.arange(E) // (E // 4)]
    total = 0
    for n in set(node) - {node[me]}:
        kept_TE = routing.routing_map_TE[:, expert_node == n]
        kept = int(kept_TE.sum())
        slots = routing.capacity * kept_TE.shape[1] if padded else kept
        # One row per token with an expert on node n, plus the padding row once
        # when some of n's slots are empty.
        rows = int(kept_TE.any(1).sum()) + (1 if slots > kept else 0)
        total += rows * D * 4 + slots * META_BYTES  # dispatch: rows, then slot metadata
        total += slots * D * 4  # combine: one row per slot
    return total


def _scenarios(rank: int) -> dict:
    """This rank's results of each scenario."""
    results = {name: _run_scenario(name) for name in SCENARIOS}
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def results():
    return run_ranks(_scenarios, 4)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_hierarchical_equals_flat(results, name):
    totals = {"flat": 0, "hier": 0, "hand_hier": 0}
    messages = {"flat": 0, "hier": 0}
    for rank in range(4):
        res = results[rank][name]
        flat, hier = res["flat"], res["hier"]
        for key in ("out", "dx", "w13", "w2", "router"):
            assert torch.equal(flat[key], hier[key]), (name, rank, key)  # bit for bit
        # The flat path's accounting equals the hand count from the routing map.
        assert flat["traffic"] == res["hand"], (rank, flat["traffic"], res["hand"])
        if name == "node_limited":
            assert res["max_nodes_used"] == 1  # never over the node budget
        elif name == "dropless":
            assert res["max_nodes_used"] == 2  # without a limit tokens do span nodes
        for kind in messages:
            totals[kind] += res[kind]["traffic"]["bytes_cross_node"]
            messages[kind] += res[kind]["traffic"]["messages_cross_node"]
        totals["hand_hier"] += res["hand_hier_cross"]
    # Relays count what they forward, so only the sum over ranks matches per-rank hand counts.
    assert totals["hier"] == totals["hand_hier"], totals
    if name in ("dropless", "node_limited"):
        assert totals["hier"] < totals["flat"], totals
    # Hierarchical uses one message per ordered node pair and direction.
    assert messages["hier"] <= 2 * 2
    if name == "empty_node":
        # Nobody sends to node 1; node 1 still sends its tokens to node 0 and gets them back.
        assert messages["hier"] == 2 and messages["flat"] > messages["hier"]
    if name == "dropless":
        assert messages["flat"] == 2 * 4 * 2  # every rank talks to both remote ranks, both ways


def test_node_limit_cuts_cross_node_bytes(results):
    """Top-2 with both experts of every token on one node: a remote token's row crosses
    once, not twice, so node-limited routing now sends fewer cross-node bytes."""
    def cross(name, kind):
        return sum(results[r][name][kind]["traffic"]["bytes_cross_node"] for r in range(4))

    flat, hier = cross("node_limited", "flat"), cross("node_limited", "hier")
    # Flat: every remote slot crosses once each way, D*4 bytes each.
    remote_slots = flat // (2 * D * 4)
    assert remote_slots > 0 and flat == remote_slots * 2 * D * 4
    # Per remote token (2 slots): one row saved, two slots' metadata paid.
    assert flat - hier == remote_slots // 2 * (D * 4 - 2 * META_BYTES), (flat, hier)
    assert hier < cross("dropless", "hier"), (hier, cross("dropless", "hier"))
