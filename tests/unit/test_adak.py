"""Ada-K: allocator-driven routing against a hand-written reference, k = K reproducing
top-K exactly, the PPO loss / advantage / top-p targets against hand computations,
and the config and support checks.

Legend: s sequence, b batch, T = s*b tokens, D hidden, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locmoe_train.adak import ppo
from locmoe_train.adak.allocator import AdaKRouter, topk_per_token
from locmoe_train.errors import UserError

D, FFN, E = 8, 4, 4
S, B = 4, 3
T = S * B


def _layer(overrides=()):
    """A MoELayer (TP=EP=1) with larger-than-init random weights, its router wrapped."""
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, [f"moe.num_experts={E}", "moe.top_k=2", f"model.hidden_size={D}",
                             "model.num_attention_heads=2", f"moe.ffn_hidden_size={FFN}",
                             "moe.experts=loop", *overrides])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe, ffn_hidden_size=FFN)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    layer.router = AdaKRouter(layer.router, D)
    with torch.no_grad():
        layer.router.alloc_weight.copy_(torch.randn(E, D, generator=g))
    return layer


def _input(seed=1):
    return torch.randn(S, B, D, generator=torch.Generator().manual_seed(seed))


def _reference(layer, x_sbD, k_T):
    """Each token's k most probable experts by a Python loop, gates as the top-k router's."""
    x_TD = x_sbD.reshape(T, D)
    probs = torch.softmax(x_TD @ layer.router.base.weight.t(), dim=-1)
    w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
    out, chosen = torch.zeros(T, D), []
    for t in range(T):
        experts = sorted(range(E), key=lambda e: -float(probs[t, e]))[:int(k_T[t])]
        gates = {e: probs[t, e] for e in experts}
        if layer.moe_cfg.renormalize:
            total = sum(gates.values())
            gates = {e: g / total for e, g in gates.items()}
        for e in experts:
            gate_up = x_TD[t] @ w13[e]
            out[t] += gates[e] * ((F.silu(gate_up[:FFN]) * gate_up[FFN:]) @ w2[e])
        chosen.append(set(experts))
    return out.view(S, B, D), chosen


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("mode", ["forced", "argmax"])
def test_allocator_routing_matches_reference(megatron_reset, mode, renormalize):
    layer = _layer([f"moe.renormalize={str(renormalize).lower()}"])
    router = layer.router
    router.mode = mode
    pattern = torch.tensor([1, 2, 3, 4, 2, 1, 4, 3, 1, 1, 2, 4])
    router.forced_k = pattern
    x = _input()
    with torch.no_grad():
        y, _ = layer(x)
    decision = router.last
    if mode == "argmax":
        expected_k = (x.reshape(T, D) @ router.alloc_weight.detach().t()).argmax(-1) + 1
        assert len(set(expected_k.tolist())) > 1  # the test exercises several k
    else:
        expected_k = pattern
    assert torch.equal(decision.k_T, expected_k)
    # The recorded log-probability is log softmax(W_alloc s) at the chosen k.
    logp = torch.log_softmax(x.reshape(T, D) @ router.alloc_weight.detach().t(), -1)
    torch.testing.assert_close(decision.logp_T, logp.gather(1, (expected_k - 1)[:, None])[:, 0])
    ref, chosen = _reference(layer, x, expected_k)
    routing = router(x.reshape(T, D))
    assert [set(torch.nonzero(row).flatten().tolist()) for row in routing.routing_map_TE] == chosen
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert int(routing.requested_slots) == int(expected_k.sum())


@pytest.mark.parametrize("renormalize", [False, True])
def test_forced_k_equal_to_top_k_reproduces_top_k_bit_for_bit(megatron_reset, renormalize):
    layer = _layer([f"moe.renormalize={str(renormalize).lower()}"])
    x = _input(seed=3)
    outs, grads = [], []
    for mode in ("topk", "forced"):
        layer.router.mode, layer.router.forced_k = mode, 2
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


def test_sampling_is_inverse_cdf_on_the_router_generator(megatron_reset):
    layer = _layer()
    router = layer.router
    router.mode = "sample"
    router.generator = torch.Generator().manual_seed(11)
    x_TD = _input(seed=4).reshape(T, D)
    router(x_TD)
    pi = torch.softmax(x_TD @ router.alloc_weight.detach().t(), -1)
    u = torch.rand(T, generator=torch.Generator().manual_seed(11))
    expected = [next((n + 1 for n in range(E) if float(pi[t, :n + 1].sum()) >= float(u[t])), E)
                for t in range(T)]
    assert router.last.k_T.tolist() == expected
    # The same generator state draws the same k; the next draw differs.
    first = router.last.k_T.clone()
    router.generator.manual_seed(11)
    router(x_TD)
    assert torch.equal(router.last.k_T, first)


def test_allocator_is_a_router_but_not_a_router_choice(megatron_reset):
    from locmoe_train.moe.routers import ROUTERS, Router, TopKRouter

    router = _layer().router
    assert isinstance(router, Router) and isinstance(router.base, TopKRouter)
    assert AdaKRouter not in ROUTERS.values() and AdaKRouter.name == ""


def test_topk_per_token_is_stable_for_ties():
    scores = torch.tensor([[0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    got = topk_per_token(scores, torch.tensor([2, 3]))
    assert got.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_advantage_hand_computed():
    reward = torch.tensor([-1.0, -2.0])
    reward_topk = torch.tensor([-1.5, -1.0])
    adv = ppo.advantages(reward, reward_topk, num_layers=3, gamma=0.5)
    # R - R* = [0.5, -1]; layer l of 3 gets gamma^(3-l): 0.25, 0.5, 1.
    assert adv.tolist() == [[0.125, -0.25], [0.25, -0.5], [0.5, -1.0]]


def test_ppo_loss_hand_computed():
    pi = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    logits = pi.log().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    k = torch.tensor([1, 2])
    old = torch.tensor([0.4, 0.4]).log()  # ratios 1.25 and 1.5
    adv = torch.tensor([2.0, -1.0])
    loss, stats = ppo.ppo_loss(logp, k, old, adv, clip=0.2, k_penalty=0.1, normalizer=2.0)
    # token 0: min(1.25*2, 1.2*2) = 2.4 (clipped); token 1: min(-1.5, -1.2) = -1.5.
    # E[k]: 0.5 + 0.6 + 0.6 = 1.7 and 0.1 + 1.2 + 0.9 = 2.2.
    assert loss.item() == pytest.approx((-2.4 + 1.5 + 0.1 * (1.7 + 2.2)) / 2, abs=1e-6)
    assert stats["surrogate"].item() == pytest.approx(0.9, abs=1e-6)
    assert stats["expected_k"].item() == pytest.approx(3.9, abs=1e-6)
    assert stats["clipped"].item() == 2
    loss.backward()
    # Token 0 is clipped: only the penalty moves it, lambda/N * p_n (n - E[k]).
    expected0 = [0.05 * p * (n - 1.7) for n, p in zip((1, 2, 3), (0.5, 0.3, 0.2))]
    torch.testing.assert_close(logits.grad[0], torch.tensor(expected0), rtol=1e-5, atol=1e-7)
    # Token 1: d(-r A)/dz = -A r (onehot(k) - p) / N, plus the penalty term.
    p1 = torch.tensor([0.1, 0.6, 0.3])
    surr1 = 1.0 * 1.5 * (torch.tensor([0.0, 1.0, 0.0]) - p1) / 2
    pen1 = 0.05 * p1 * (torch.tensor([1.0, 2.0, 3.0]) - 2.2)
    torch.testing.assert_close(logits.grad[1], surr1 + pen1, rtol=1e-5, atol=1e-7)


def test_ppo_ratio_one_at_first_epoch_gives_plain_policy_gradient():
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    loss, stats = ppo.ppo_loss(logp, torch.tensor([3]), logp.detach()[:, 2], torch.tensor([0.7]),
                               clip=0.2, k_penalty=0.0, normalizer=1.0)
    assert loss.item() == pytest.approx(-0.7) and stats["clipped"].item() == 0
    loss.backward()
    p = torch.softmax(logits.detach(), -1)[0]
    torch.testing.assert_close(logits.grad[0], -0.7 * (torch.tensor([0.0, 0.0, 1.0]) - p))


def test_top_p_counts_and_p_star():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.25, 0.4, 0.35]])
    assert ppo.top_p_counts(probs, 0.5).tolist() == [1, 2]
    assert ppo.top_p_counts(probs, 0.7).tolist() == [2, 2]
    assert ppo.top_p_counts(probs, 0.95).tolist() == [3, 3]
    assert ppo.top_p_counts(probs, 1.0).tolist() == [3, 3]  # never more than E
    grid = torch.tensor([0.0, 0.5, 0.7, 0.95])
    sums = ppo.top_p_count_sums(probs, grid)
    assert sums.tolist() == [2, 3, 4, 6]
    # The rank trick agrees with counting token by token, on random data too.
    many = torch.softmax(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 2, -1)
    fine = ppo.p_grid(101)
    assert ppo.top_p_count_sums(many, fine).tolist() == [
        int(ppo.top_p_counts(many, float(p)).sum()) for p in fine]
    # Mean counts per grid point: 1, 1.5, 2, 3 -> a target of 2 picks 0.7.
    assert ppo.pick_p_star(sums, 2, grid, 2.0) == pytest.approx(0.7)
    assert ppo.pick_p_star(sums, 2, grid, 1.6) == pytest.approx(0.5)


def test_warm_start_loss_is_cross_entropy_to_target_count():
    logp = torch.log_softmax(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), -1)
    loss = ppo.warm_start_loss(logp, torch.tensor([1, 3]), normalizer=2.0)
    assert loss.item() == pytest.approx(-(logp[0, 0] + logp[1, 2]).item() / 2)


@pytest.mark.parametrize("override, message", [
    ("adak.clip=0", "adak.clip=0.0 must be > 0."),
    ("adak.gamma=1.5", "adak.gamma=1.5 must lie in (0, 1]"),
    ("adak.ppo_epochs=0", "adak.ppo_epochs=0 must be >= 1."),
    ("adak.warm_start_mean_k=9", "adak.warm_start_mean_k=9.0 must lie in [1, moe.num_experts=8]"),
    ("adak.k_penalty=-1", "adak.k_penalty=-1.0 must be >= 0."),
])
def test_adak_config_validation(override, message):
    from locmoe_train.config import load_config

    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["moe.impl=megatron"], "locmoe-train adak needs moe.impl=native (our MoE layer), got "
                            "moe.impl='megatron'"),
    (["moe.router=aux_free"], "builds on a top-k softmax router, got moe.router='aux_free'"),
    (["moe.capacity_factor=1.25"], "pass --moe.capacity_factor=null"),
    (["moe.max_nodes_per_token=1"], "pass --moe.max_nodes_per_token=null"),
])
def test_stage_refuses_unsupported_moe(overrides, message):
    from locmoe_train.adak.stage import check_supported
    from locmoe_train.config import load_config

    with pytest.raises(UserError) as e:
        check_supported(load_config(None, overrides))
    assert message in str(e.value)


def test_sampled_k_distribution_matches_policy(megatron_reset):
    """Many draws for one state: the empirical k frequencies approach pi(k|s)."""
    layer = _layer()
    router = layer.router
    router.mode = "sample"
    router.generator = torch.Generator().manual_seed(5)
    x_TD = _input(seed=6).reshape(T, D)[:1].expand(4000, D)
    router(x_TD)
    pi = torch.softmax(x_TD[0] @ router.alloc_weight.detach().t(), -1)
    freq = torch.bincount(router.last.k_T - 1, minlength=E).float() / 4000
    # 4000 draws: the standard error of each frequency is below 0.008.
    assert (freq - pi).abs().max() < 0.03
    assert math.isclose(float(freq.sum()), 1.0)
