"""torchrun worker for test_moe_layer_parallel.py: one MoELayer under a parallel layout.

The input is a fixed global tensor ``[G*s, b, D]`` cut into G sequence shards
(G = world size). Rank r runs shard r (for TP that is its sequence-parallel
shard; for EP/DP its data shard). The 1-rank reference runs the same shards
with the same weights: one call per shard for EP (capacity is per rank),
one call on the whole sequence for TP (sequence parallelism spans it).
Saved on rank 0: outputs and input gradients per shard, the router and full
expert gradients (summed over the ranks that hold a copy), and the aux loss.

usage: worker.py OUT_DIR SCENARIO[,SCENARIO...]
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
from locmoe_train.moe.layer import MoELayer  # noqa: E402
from locmoe_train.moe.routers import RouterSetup  # noqa: E402
from locmoe_train.parallel.state import destroy_parallel, init_parallel  # noqa: E402

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


def run(scenario: str, out_dir: str, world: int) -> None:
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
    seq_len = S * _shards() if kind == "tp" else S
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe, ffn_hidden_size=F,
                     parallel=pctx.moe, setup=RouterSetup(seq_len=seq_len))
    init_parameters(layer, cfg, pctx)
    layer.train()

    gen = torch.Generator().manual_seed(7)
    x_full = torch.randn(S * _shards(), B, D, generator=gen)
    proj = torch.randn(x_full.shape, generator=gen)
    if scenario in ("ep_empty_expert", "ep_empty_rank"):
        # A constant channel plus strongly negative router weights on it keep
        # the last expert (or the last EP rank's experts) from ever being chosen.
        x_full[..., -1] = 3.0
        banned = [E - 1] if scenario == "ep_empty_expert" else list(range(E // 2, E))
        with torch.no_grad():
            layer.router.weight[banned, -1] = -10.0

    shards = list(torch.chunk(x_full, _shards(), dim=0))
    projs = list(torch.chunk(proj, _shards(), dim=0))
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
    if pctx.rank == 0:
        torch.save({"out": [outs[i] for i in range(len(shards))],
                    "dx": [dxs[i] for i in range(len(shards))],
                    "router": router_grad, "w13": w13_grad, "w2": w2_grad,
                    "aux": aux_total, "counts": counts},
                   os.path.join(out_dir, f"{scenario}.pt"))
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _shards() -> int:
    return int(os.environ.get("SHARDS", os.environ.get("WORLD_SIZE", "1")))


def _gather(t: torch.Tensor, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


if __name__ == "__main__":
    out_dir, names = sys.argv[1], sys.argv[2].split(",")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in names:
        run(name, out_dir, world)
    destroy_parallel()
