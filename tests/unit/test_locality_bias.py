"""The locality node bias (``moe.locality_node_bias``): the rank-dependent routing term
the locality loss trains (docs/locality.md).

Legend: T tokens, D hidden, E experts; 8 experts on 2 nodes, {e0..e3} and {e4..e7}.
"""

from __future__ import annotations

import pytest
import torch

from locmoe_train.config import MoEConfig
from locmoe_train.errors import UserError
from locmoe_train.moe.impls import impl_class
from locmoe_train.moe.losses import locality_loss
from locmoe_train.moe.routers import RouterSetup, router_class
from locmoe_train.moe.routers.base import node_bias_active
from locmoe_train.optim.optimizer import param_groups

NODES = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _router(name, node=1, coeff=0.01, bias="auto", nodes=NODES, top_k=1):
    cfg = MoEConfig(router=name, num_experts=8, top_k=top_k, locality_loss_coeff=coeff,
                    locality_node_bias=bias)
    if name == "locmoe_plus":
        cfg.locmoe_plus.mode = "tcr"
    local = None if nodes is None else nodes == node
    return router_class(name)(cfg, 16, RouterSetup(expert_node_E=nodes, local_experts_E=local,
                                                  seq_len=64, max_steps=10))


def _x(T=256, seed=0):
    return torch.randn(T, 16, generator=torch.Generator().manual_seed(seed))


def test_auto_is_on_exactly_when_the_locality_loss_acts():
    cfg = MoEConfig(locality_loss_coeff=0.01)
    assert node_bias_active(cfg, 2) and not node_bias_active(cfg, 1)
    assert not node_bias_active(MoEConfig(), 2)  # no locality loss
    assert node_bias_active(MoEConfig(locality_node_bias=True), 2)
    assert not node_bias_active(MoEConfig(locality_loss_coeff=0.1, locality_node_bias=False), 2)
    assert _router("topk", nodes=None).node_bias is None  # one node: nothing to bias
    assert _router("topk", coeff=0.0).node_bias is None


@pytest.mark.parametrize("name", ["topk", "locmoe_plus"])
def test_a_zero_bias_routes_exactly_as_without_it(name):
    torch.manual_seed(0)
    with_bias = _router(name)
    torch.manual_seed(0)
    without = _router(name, bias=False)
    assert with_bias.node_bias.shape == (2, 8) and not with_bias.node_bias.any()
    a, b = with_bias(_x()), without(_x())
    assert torch.equal(a.routing_map_TE, b.routing_map_TE)
    torch.testing.assert_close(a.gates_TE, b.gates_TE, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["topk", "locmoe_plus"])
def test_the_locality_loss_trains_only_this_nodes_row_towards_its_experts(name):
    router = _router(name, node=1)
    out = router(_x())
    local = NODES == 1
    locality_loss(out.probs_TE, local, 0.1).backward()
    grad = router.node_bias.grad
    assert not grad[0].any()  # node 0's row: no gradient from a node-1 rank
    assert (grad[1][local] < 0).all() and (grad[1][~local] > 0).all()  # descent raises local
    # One gradient step on the bias alone raises the share routed to node 1.
    share0 = out.routing_map_TE[:, local].any(-1).float().mean()  # top-1
    with torch.no_grad():
        router.node_bias -= 50.0 * grad
    share1 = router(_x()).routing_map_TE[:, local].any(-1).float().mean()
    assert share1 > share0 + 0.2


def test_a_large_bias_keeps_every_token_on_its_node():
    router = _router("locmoe_plus", node=0, top_k=2)
    with torch.no_grad():
        router.node_bias[0, :4] = 1e3
    map_TE = router(_x()).routing_map_TE
    assert (map_TE[:, :4].sum(-1) == 2).all() and not map_TE[:, 4:].any()


def test_the_bias_is_not_weight_decayed_and_old_checkpoints_start_it_at_zero():
    router = _router("topk")
    decay, no_decay = param_groups(router, 0.1)
    assert any(p is router.node_bias for p in no_decay["params"])
    assert all(p is not router.node_bias for p in decay["params"])
    state = {k: v for k, v in router.state_dict().items() if k != "node_bias"}
    with torch.no_grad():
        router.node_bias.fill_(3.0)
    router.load_state_dict(state)  # strict: a checkpoint from before the bias
    assert not router.node_bias.any()


def test_routers_without_it_refuse_true():
    cfg = MoEConfig(router="hash", num_experts=8, top_k=1, locality_node_bias=True)
    with pytest.raises(UserError, match=r"moe.locality_node_bias=true is not supported by "
                                        r"moe.router=hash \(topk and locmoe_plus have it\): "
                                        r"set it to auto or false."):
        cfg.validate()  # the section's own checks pass; the router refuses:
        impl_class(cfg.impl).validate(cfg)


def test_model_init_keeps_the_zero_bias_and_the_learned_tau_start():
    from locmoe_train.config import load_config
    from locmoe_train.model.init import init_parameters

    cfg = MoEConfig(router="locmoe_plus", num_experts=8, top_k=1, locality_loss_coeff=0.01)
    cfg.locmoe_plus.learn_tau = True  # tau auto: 1 / sqrt(16)
    router = router_class("locmoe_plus")(cfg, 16, RouterSetup(
        expert_node_E=NODES, local_experts_E=NODES == 0, seq_len=64, max_steps=10))
    # Both are constants the module chose; the layout-independent init must not redraw
    # them (before, it drew every non-1-D parameter from N(0, init_std)).
    init_parameters(router, load_config(None, []), pctx=None)
    assert not router.node_bias.any()
    assert float(router.temperature()) == pytest.approx(0.25)


def test_hf_export_warns_that_the_node_bias_is_left_out():
    from locmoe_train.config import load_config
    from locmoe_train.hf.plan import plan_export

    cfg = load_config(None, ["moe.router=locmoe_plus", "moe.top_k=1",
                             "moe.locality_loss_coeff=0.01"])
    assert any(w.startswith("moe.locality_node_bias: training added a learned per-node bias")
               for w in plan_export(cfg).warnings)
    cfg.moe.locality_node_bias = False
    assert not any("locality_node_bias" in w for w in plan_export(cfg).warnings)
    cfg.moe.locality_node_bias, cfg.moe.locality_loss_coeff = True, 0.0  # on without the loss
    assert any("locality_node_bias" in w for w in plan_export(cfg).warnings)


# ---- locality-aware capacity (LocMoE+ expert choice with the node bias) -----------------


def test_per_expert_capacity_keeps_each_experts_best_and_equals_the_uniform_cut():
    from locmoe_train.moe.routing import drop_over_capacity, drop_over_capacity_per_expert

    g = torch.Generator().manual_seed(1)
    map_TE = torch.rand(40, 6, generator=g) < 0.5
    prio_TE = torch.randn(40, 6, generator=g)
    for c in (1, 3, 7, 40):
        assert torch.equal(drop_over_capacity_per_expert(map_TE, prio_TE, torch.full((6,), c)),
                           drop_over_capacity(map_TE, prio_TE, c, "probs"))
    caps = torch.tensor([0, 1, 2, 5, 9, 40])
    kept = drop_over_capacity_per_expert(map_TE, prio_TE, caps)
    for e in range(6):  # brute force: the cap[e] highest priorities among e's candidates
        cand = [t for t in range(40) if map_TE[t, e]]
        best = sorted(cand, key=lambda t: -float(prio_TE[t, e]))[:int(caps[e])]
        assert sorted(torch.nonzero(kept[:, e]).flatten().tolist()) == sorted(best)


def _ecr_router(node=0):
    cfg = MoEConfig(router="locmoe_plus", num_experts=8, top_k=1, locality_loss_coeff=0.01)
    cfg.capacity.factor0 = 1.0
    cfg.capacity.policy = "fixed"
    r = router_class("locmoe_plus")(cfg, 16, RouterSetup(
        expert_node_E=NODES, local_experts_E=NODES == node, seq_len=64, max_steps=100))
    return r.train()


def test_capacity_follows_the_measured_same_node_share():
    router = _ecr_router(node=0)
    x = _x(T=256)
    assert router.locality_share == 0.5  # 4 of 8 experts local: uniform caps
    cfg = MoEConfig(router="locmoe_plus", num_experts=8, top_k=1)  # no locality: no bias
    cfg.capacity.factor0, cfg.capacity.policy = 1.0, "fixed"
    same = router_class("locmoe_plus")(cfg, 16, RouterSetup(
        expert_node_E=NODES, local_experts_E=NODES == 0, seq_len=64, max_steps=100)).train()
    a, b = router(x), same(x)
    assert a.capacity == b.capacity == 32  # C0 = 8 per 64-token sequence, 256 tokens
    assert torch.equal(a.routing_map_TE, b.routing_map_TE)
    # Pull routing to node 0: the share measured over 10 steps raises the local caps.
    router = _ecr_router(node=0)
    with torch.no_grad():
        router.node_bias[0, :4] = 2.0
    for step in range(1, 11):
        out = router(x)
        router.step_end(torch.zeros(8), step=step)
    share = float(out.selected_TE[:, :4].sum() / out.selected_TE.sum())
    assert share > 0.8 and router.locality_share == pytest.approx(share)
    out = router(x)
    w_local, w_remote = share / 0.5, (1 - share) / 0.5
    caps = [min(256, -(-32 * w * 10**9 // 10**9)) for w in (w_local, w_remote)]
    kept_E = out.routing_map_TE.sum(0)
    assert out.capacity == max(caps)
    assert (kept_E[:4] <= caps[0]).all() and (kept_E[4:] <= caps[1]).all()
    assert int(kept_E[:4].max()) > 32  # more than a uniform cap would have let through
    assert router.gauges()["locality_share"] == pytest.approx(share)
    # Resume (a save follows a step): the share and this rank's pending demand come back.
    router(x)
    router.step_end(torch.zeros(8), step=11)
    state = router.checkpoint_state()
    fresh = _ecr_router(node=0)
    fresh.load_checkpoint_state(state)
    assert fresh.locality_share == router.locality_share
    assert router._demand is not None and torch.equal(fresh._demand, router._demand)
