"""Ada-K's dynamic k under EP=2 (gloo) equals one rank: outputs, chosen k and gradients.

Both the forced k pattern (1..E over the tokens) and k sampled from the
allocator with per-shard seeded generators.

One MoELayer with an Ada-K allocator: a fixed global input ``[G*s, b, D]``
is cut into G sequence shards (G = the world size of the parallel run). Rank r
runs shard r; the 1-rank reference runs every shard in turn with the same
weights. The per-token k is either a fixed pattern over the global tokens
(``forced``) or sampled, with the allocator's generator seeded by the shard
index (``sampled``), so both runs draw the same k for the same token. Per
shard: a PPO loss on the recorded decisions (fixed advantages) gives the
allocator gradient, and a projection of the output gives the input, router and
expert gradients. Rank 0 returns outputs, input gradients and k per shard, and
the gradients summed over ranks (experts gathered over EP).
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from locmoe_train.adak.allocator import AdaKRouter
from locmoe_train.adak.ppo import ppo_loss
from locmoe_train.config import load_config
from locmoe_train.model.gpt import transformer_config
from locmoe_train.model.init import init_parameters
from locmoe_train.moe.layer import MoELayer
from locmoe_train.moe.routers import RouterSetup
from locmoe_train.parallel.state import init_parallel
from workers import parallel_and_reference

S, B, D, F, E = 8, 2, 32, 16, 4


def _run_scenario(scenario: str, world: int, num_shards: int) -> dict | None:
    overrides = [f"moe.num_experts={E}", "moe.top_k=2", f"model.hidden_size={D}",
                 "model.num_attention_heads=4", f"data.seq_len={S}"]
    if world > 1:
        overrides.append(f"parallel.ep={world}")
    cfg = load_config(None, overrides)
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 1)
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe, ffn_hidden_size=F,
                     parallel=pctx.moe, setup=RouterSetup(seq_len=S))
    init_parameters(layer, cfg, pctx)
    layer.router = AdaKRouter(layer.router, D)
    layer.train()

    shards = num_shards
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.router.base.weight.mul_(20.0)  # sharper router: varied expert choices
        layer.router.alloc_weight.copy_(torch.randn(E, D, generator=gen))
    x_full = torch.randn(S * shards, B, D, generator=gen)
    proj = torch.randn(x_full.shape, generator=gen)
    adv_full = torch.randn(S * shards * B, generator=gen)
    pattern = torch.arange(S * shards * B) % E + 1  # k = 1..E over the global tokens
    xs, projs = torch.chunk(x_full, shards), torch.chunk(proj, shards)
    advs, ks = torch.chunk(adv_full, shards), torch.chunk(pattern, shards)

    router = layer.router
    router.mode = "forced" if scenario == "forced" else "sample"
    calls = [pctx.rank] if world > 1 else list(range(shards))
    outs, dxs, k_chosen = {}, {}, {}
    for i in calls:
        router.forced_k = ks[i]
        router.generator = torch.Generator().manual_seed(100 + i)
        x = xs[i].clone().requires_grad_(True)
        out, _ = layer(x)
        d = router.last
        alloc_loss, _ = ppo_loss(router.log_policy(d.x_TD), d.k_T, d.logp_T, advs[i],
                                 clip=0.2, k_penalty=3e-3, normalizer=float(adv_full.numel()))
        ((out * projs[i]).sum() + alloc_loss).backward()
        outs[i], dxs[i], k_chosen[i] = out.detach(), x.grad, d.k_T

    grads = {"alloc": router.alloc_weight.grad.clone(), "router": router.base.weight.grad.clone(),
             "w13": layer.experts.w13.grad.clone(), "w2": layer.experts.w2.grad.clone()}
    if world > 1:
        for key in ("alloc", "router"):
            dist.all_reduce(grads[key])
        for key in ("w13", "w2"):
            parts = [torch.empty_like(grads[key]) for _ in range(pctx.ep)]
            dist.all_gather(parts, grads[key].contiguous(), group=pctx.ep_group)
            grads[key] = torch.cat(parts)
        gathered = [None] * world
        dist.all_gather_object(gathered, (outs, dxs, k_chosen))
        for o, g, k in gathered:
            outs.update(o)
            dxs.update(g)
            k_chosen.update(k)
    counts = layer.stats.tokens_per_expert.clone()
    if world > 1:
        dist.all_reduce(counts)
    parallel_state.destroy_model_parallel()
    if pctx.rank == 0:
        return {"out": [outs[i] for i in range(shards)], "dx": [dxs[i] for i in range(shards)],
                "k": [k_chosen[i] for i in range(shards)], "counts": counts, **grads}
    return None


SCENARIOS = ["forced", "sampled"]


@pytest.fixture(scope="module")
def results():
    return parallel_and_reference(_run_scenario, 2, SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_adak_ep2_matches_single_rank(results, name):
    par, ref = (r[name] for r in results)
    for a, b in zip(par["k"], ref["k"]):
        assert torch.equal(a, b)
    k = torch.cat(ref["k"])
    assert set(k.tolist()) == {1, 2, 3, 4}  # every count from 1 to E occurs
    for a, b in zip(par["out"], ref["out"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(par["dx"], ref["dx"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("alloc", "router", "w13", "w2"):
        torch.testing.assert_close(par[key], ref[key], rtol=1e-5, atol=1e-6)
    assert par["alloc"].abs().sum() > 0
    # Dropless: the experts together took exactly sum(k) tokens.
    assert torch.equal(par["counts"], ref["counts"]) and int(ref["counts"].sum()) == int(k.sum())
