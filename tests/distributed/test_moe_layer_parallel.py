"""Our MoE layer under EP=2, EP=4 and TP=2 (gloo) equals one rank: outputs and gradients.

Covers token dropping (capacity, with and without padding to capacity, for
top-k and LocMoE+),
expert choice, an expert that receives no token and EP ranks that receive
no token.

The input is a fixed global tensor ``[G*s, b, D]`` cut into G sequence shards
(G = world size). Rank r runs shard r (for TP that is its sequence-parallel
shard; for EP/DP its data shard). The 1-rank reference runs the same shards
with the same weights: one call per shard for EP (capacity is per rank),
one call on the whole sequence for TP (sequence parallelism spans it).
Rank 0 returns: outputs and input gradients per shard, the router and full
expert gradients (summed over the ranks that hold a copy), and the aux loss.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from locmoe_train.config import load_config
from locmoe_train.model.gpt import transformer_config
from locmoe_train.model.init import init_parameters
from locmoe_train.moe.layer import MoELayer
from locmoe_train.moe.routers import RouterSetup
from locmoe_train.parallel.state import init_parallel
from workers import parallel_and_reference

S, B, D, F, E = 8, 2, 32, 16, 4

SCENARIOS = {
    # name: (overrides at world > 1, kind, capacity/router overrides)
    "ep": (["parallel.ep={world}"], "ep", []),
    "ep_capacity": (["parallel.ep={world}"], "ep", ["moe.capacity_factor=0.75"]),
    "ep_padded": (["parallel.ep={world}"], "ep",
                  ["moe.capacity_factor=0.75", "moe.pad_to_capacity=true"]),
    "ep_empty_expert": (["parallel.ep={world}"], "ep", []),
    "ep_empty_rank": (["parallel.ep={world}"], "ep", []),
    "ep_expert_choice": (["parallel.ep={world}"], "ep", ["moe.router=expert_choice"]),
    "tp": (["parallel.tp={world}"], "tp", []),
    # LocMoE+ with expert choice ranked over the sequence-parallel group equals
    # ranking the whole sequence on one rank (capacity binds: factor0 0.5).
    "tp_locmoe_global": (["parallel.tp={world}"], "tp",
                         ["moe.router=locmoe_plus", "moe.locmoe_plus.ranking=global",
                          "moe.capacity.factor0=0.5"]),
    "ep_locmoe": (["parallel.ep={world}"], "ep",
                  ["moe.router=locmoe_plus", "moe.capacity.factor0=0.5"]),
    # The same two with static shapes (every expert padded to its capacity).
    "tp_locmoe_global_padded": (["parallel.tp={world}"], "tp",
                                ["moe.router=locmoe_plus", "moe.locmoe_plus.ranking=global",
                                 "moe.capacity.factor0=0.5", "moe.pad_to_capacity=true"]),
    "ep_locmoe_padded": (["parallel.ep={world}"], "ep",
                         ["moe.router=locmoe_plus", "moe.capacity.factor0=0.5",
                          "moe.pad_to_capacity=true"]),
}


def _run_scenario(scenario: str, world: int, num_shards: int) -> dict | None:
    layout, kind, extra = SCENARIOS[scenario]
    overrides = [f"moe.num_experts={E}", "moe.top_k=2", f"model.hidden_size={D}",
                 "model.num_attention_heads=4", f"data.seq_len={S * world}",
                 "moe.z_loss_coeff=0.001", *extra]
    if world > 1:
        overrides += [o.format(world=world) for o in layout]
    cfg = load_config(None, overrides)
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 1)
    # LocMoE+ capacity is per sequence: an EP shard holds B sequences of S tokens,
    # a TP shard a 1/world slice of B sequences of S*world tokens.
    seq_len = S * num_shards if kind == "tp" else S
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe, ffn_hidden_size=F,
                     parallel=pctx.moe, setup=RouterSetup(seq_len=seq_len))
    init_parameters(layer, cfg, pctx)
    layer.train()

    gen = torch.Generator().manual_seed(7)
    x_full = torch.randn(S * num_shards, B, D, generator=gen)
    proj = torch.randn(x_full.shape, generator=gen)
    if scenario in ("ep_empty_expert", "ep_empty_rank"):
        # A constant channel plus strongly negative router weights on it keep
        # the last expert (or the last EP rank's experts) from ever being chosen.
        x_full[..., -1] = 3.0
        banned = [E - 1] if scenario == "ep_empty_expert" else list(range(E // 2, E))
        with torch.no_grad():
            layer.router.weight[banned, -1] = -10.0

    shards = list(torch.chunk(x_full, num_shards, dim=0))
    projs = list(torch.chunk(proj, num_shards, dim=0))
    if world > 1:
        calls = [[pctx.rank]]
    elif kind == "tp":
        calls = [list(range(len(shards)))]  # the whole sequence in one call
    else:
        calls = [[i] for i in range(len(shards))]

    outs, dxs, aux_total = {}, {}, torch.zeros(())
    for call in calls:
        x = torch.cat([shards[i] for i in call]).requires_grad_(True)
        out, _ = layer(x)
        aux = layer.pop_aux_loss()
        loss = (out * torch.cat([projs[i] for i in call])).sum() + aux
        loss.backward()
        aux_total += aux.detach()
        for i, o, g in zip(call, out.detach().chunk(len(call)), x.grad.chunk(len(call))):
            outs[i], dxs[i] = o, g

    # LocMoE+ has no router weights (fixed gate vectors): compare an empty tensor.
    weight = getattr(layer.router, "weight", None)
    router_grad = weight.grad.clone() if weight is not None else torch.zeros(0)
    w13_grad, w2_grad = layer.experts.w13.grad.clone(), layer.experts.w2.grad.clone()
    if world > 1:
        dist.all_reduce(router_grad)
        dist.all_reduce(aux_total)
        if pctx.edp > 1:
            dist.all_reduce(w13_grad, group=pctx.edp_group)
            dist.all_reduce(w2_grad, group=pctx.edp_group)
        if pctx.ep > 1:
            w13_grad = _gather(w13_grad, pctx.ep_group, pctx.ep)
            w2_grad = _gather(w2_grad, pctx.ep_group, pctx.ep)
        gathered = [None] * world
        dist.all_gather_object(gathered, (outs, dxs))
        for o, g in gathered:
            outs.update(o)
            dxs.update(g)
    counts = layer.stats.tokens_per_expert.clone()
    if world > 1:
        dist.all_reduce(counts)
    parallel_state.destroy_model_parallel()
    if pctx.rank == 0:
        return {"out": [outs[i] for i in range(len(shards))],
                "dx": [dxs[i] for i in range(len(shards))],
                "router": router_grad, "w13": w13_grad, "w2": w2_grad,
                "aux": aux_total, "counts": counts}
    return None


def _gather(t: torch.Tensor, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


TWO_RANK = ["ep", "ep_capacity", "ep_padded", "ep_empty_expert", "ep_empty_rank",
            "ep_expert_choice", "tp", "tp_locmoe_global", "ep_locmoe",
            "tp_locmoe_global_padded", "ep_locmoe_padded"]
FOUR_RANK = ["ep", "ep_capacity", "ep_empty_rank"]


@pytest.fixture(scope="module")
def results():
    return {world: parallel_and_reference(_run_scenario, world, names)
            for world, names in [(2, TWO_RANK), (4, FOUR_RANK)]}


@pytest.mark.parametrize("world, name", [(2, n) for n in TWO_RANK] + [(4, n) for n in FOUR_RANK])
def test_parallel_layer_matches_single_rank(results, world, name):
    par, ref = (r[name] for r in results[world])
    for a, b in zip(par["out"], ref["out"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(par["dx"], ref["dx"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("router", "w13", "w2"):
        torch.testing.assert_close(par[key], ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(par["aux"], ref["aux"], rtol=1e-5, atol=1e-7)
    assert torch.equal(par["counts"], ref["counts"])
    counts = ref["counts"]
    if name == "ep_empty_expert":
        assert counts[-1] == 0 and (counts[:-1] > 0).all()
        assert par["w13"][-1].abs().sum() == 0  # no token, no gradient
    if name == "ep_empty_rank":
        assert (counts[2:] == 0).all()  # the last EP rank(s) own experts nobody chose
    if name in ("ep_capacity", "ep_padded", "tp_locmoe_global", "ep_locmoe"):
        assert counts.sum() < 2 * sum(o.shape[0] * o.shape[1] for o in ref["out"])  # drops happened
