"""Routers, capacity/drop rules and auxiliary losses on small hand-computed cases.

Legend: T tokens, D hidden size, E experts, K experts per token.

Most router cases use D = E and ``router.weight = I`` so that the router
logits are exactly the input rows, which are written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from locmoe_train.config import MoEConfig
from locmoe_train.moe.losses import router_z_loss, switch_load_balancing_loss
from locmoe_train.moe.routers import (RouterSetup, AuxFreeRouter, ExpertChoiceRouter, HashRouter,
                                      TopKRouter)
from locmoe_train.moe.routing import RoutingResult, drop_over_capacity, expert_capacity


def _router(cls, logits_TE=None, **moe_kwargs):
    """A router whose logits equal its input (weight = identity, D = E)."""
    cfg = MoEConfig(**moe_kwargs)
    router = cls(cfg, cfg.num_experts)
    with torch.no_grad():
        router.weight.copy_(torch.eye(cfg.num_experts))
    return router


def _bool(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ---- expert_capacity ------------------------------------------------------------


def test_expert_capacity_exact_rounding_and_minimum():
    assert expert_capacity(10, 4, 2, 1.0) == 5  # 1.0 * 10 * 2 / 4
    assert expert_capacity(10, 4, 2, 1.25) == 7  # 6.25 rounds up
    assert expert_capacity(8, 4, 1, 1.25) == 3  # 2.5 rounds up
    assert expert_capacity(8, 4, 1, 1.0) == 2  # exact: no rounding up
    assert expert_capacity(16, 8, 2, 2.0) == 8
    assert expert_capacity(1, 64, 1, 1.0) == 1  # 1/64 rounds up to 1
    assert expert_capacity(3, 8, 1, 0.01) == 1  # minimum 1
    assert expert_capacity(0, 8, 2, 1.0) == 1  # even for no tokens
    # The paper's baseline factor: 1.1 * 25 * 2 / 5 is 11 exactly, not 11.000000000000002.
    assert expert_capacity(25, 5, 2, 1.1) == 11


# ---- drop_over_capacity ---------------------------------------------------------

# Six tokens, three experts. Expert 0 has 5 tokens, expert 1 four, expert 2 three.
MAP_6x3 = _bool([[1, 1, 0],
                 [1, 0, 1],
                 [1, 1, 0],
                 [0, 1, 1],
                 [1, 0, 1],
                 [1, 1, 0]])
# t0 and t2 tie at 0.5 for expert 0 (the last kept place at capacity 3); t3's
# priority 5.0 for expert 0 is outside the map and must be ignored.
PRIORITY_6x3 = torch.tensor([[0.5, 0.2, 0.0],
                             [0.9, 0.0, 0.3],
                             [0.5, 0.8, 0.0],
                             [5.0, 0.1, 0.6],
                             [0.7, 0.0, 0.3],
                             [0.1, 0.9, 0.0]])


def test_drop_over_capacity_probs_keeps_highest_priority_ties_to_earlier_token():
    kept = drop_over_capacity(MAP_6x3, PRIORITY_6x3, 3, "probs")
    # expert 0: t1 (.9), t4 (.7), then t0 beats t2 on the .5 tie; expert 1: t5, t2, t0;
    # expert 2: its three tokens all fit.
    expected = _bool([[1, 1, 0],
                      [1, 0, 1],
                      [0, 1, 0],
                      [0, 0, 1],
                      [1, 0, 1],
                      [0, 1, 0]])
    assert kept.dtype == torch.bool
    assert torch.equal(kept, expected)


def test_drop_over_capacity_probs_tie_at_every_place_keeps_token_order():
    map_TE = _bool([[1], [1], [1], [1], [1]])
    priority = torch.tensor([[0.5], [0.9], [0.5], [0.1], [0.5]])
    kept = drop_over_capacity(map_TE, priority, 2, "probs")
    assert torch.equal(kept, _bool([[1], [1], [0], [0], [0]]))
    kept = drop_over_capacity(map_TE, priority, 3, "probs")
    assert torch.equal(kept, _bool([[1], [1], [1], [0], [0]]))
    # Larger ties (an unstable sort reorders these): 20 tokens, every third at 0.9,
    # the rest at 0.5; capacity 10 keeps the seven 0.9s, then t1, t2, t4.
    map_TE = torch.ones(20, 2, dtype=torch.bool)
    priority = torch.full((20, 2), 0.5)
    priority[::3, 0] = 0.9
    kept = drop_over_capacity(map_TE, priority, 10, "probs")
    expected_0 = torch.zeros(20, dtype=torch.bool)
    expected_0[[0, 3, 6, 9, 12, 15, 18, 1, 2, 4]] = True
    assert torch.equal(kept[:, 0], expected_0)
    assert torch.equal(kept[:, 1], torch.arange(20) < 10)  # all tied: the first ten


def test_drop_over_capacity_position_keeps_earliest():
    kept = drop_over_capacity(MAP_6x3, PRIORITY_6x3, 3, "position")
    expected = _bool([[1, 1, 0],
                      [1, 0, 1],
                      [1, 1, 0],
                      [0, 1, 1],
                      [0, 0, 1],
                      [0, 0, 0]])
    assert torch.equal(kept, expected)
    kept1 = drop_over_capacity(MAP_6x3, PRIORITY_6x3, 1, "position")
    assert torch.equal(kept1, _bool([[1, 1, 0],
                                     [0, 0, 1],
                                     [0, 0, 0],
                                     [0, 0, 0],
                                     [0, 0, 0],
                                     [0, 0, 0]]))


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_drop_over_capacity_never_adds_and_respects_capacity(policy):
    for capacity in range(1, 6):
        kept = drop_over_capacity(MAP_6x3, PRIORITY_6x3, capacity, policy)
        assert not (kept & ~MAP_6x3).any()
        assert torch.equal(kept.sum(0), torch.clamp(MAP_6x3.sum(0), max=capacity))


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity", [6, 7, 100])
def test_drop_over_capacity_large_capacity_is_identity(policy, capacity):
    kept = drop_over_capacity(MAP_6x3, PRIORITY_6x3, capacity, policy)
    assert torch.equal(kept, MAP_6x3)


def test_drop_over_capacity_unknown_policy():
    with pytest.raises(ValueError, match="unknown drop policy"):
        drop_over_capacity(MAP_6x3, PRIORITY_6x3, 2, "random")


# ---- TopKRouter -----------------------------------------------------------------

# E=4, K=2. Chosen experts by hand: t0 {0,1}, t1 {2,3}, t2 {1,3}, t3 {0,2}.
TOPK_LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                            [0.0, -1.0, 3.0, 2.5],
                            [-2.0, 1.5, 0.5, 1.0],
                            [1.0, -3.0, 0.8, 0.0]])
TOPK_CHOSEN = _bool([[1, 1, 0, 0],
                     [0, 0, 1, 1],
                     [0, 1, 0, 1],
                     [1, 0, 1, 0]])


def test_topk_router_choice_and_unnormalised_gates():
    router = _router(TopKRouter, num_experts=4, top_k=2, aux_loss_coeff=0.0)
    out = router(TOPK_LOGITS)
    assert isinstance(out, RoutingResult)
    assert torch.equal(out.routing_map_TE, TOPK_CHOSEN)
    probs = torch.softmax(TOPK_LOGITS, dim=-1)
    # Row 0 by hand: softmax([2, 1, 0, -1]).
    e = [math.exp(v) for v in (2.0, 1.0, 0.0, -1.0)]
    row0 = torch.tensor([e[0], e[1], 0.0, 0.0]) / sum(e)
    torch.testing.assert_close(out.gates_TE[0], row0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.gates_TE, probs * TOPK_CHOSEN, rtol=0, atol=0)
    assert (out.gates_TE.sum(-1) < 1).all()  # not renormalised
    torch.testing.assert_close(out.scores_TE, TOPK_LOGITS)
    assert out.requested_slots == 4 * 2
    assert out.capacity is None  # dropless
    assert out.aux == {}  # aux_loss_coeff = z_loss_coeff = 0


def test_topk_router_renormalised_gates_sum_to_one():
    router = _router(TopKRouter, num_experts=4, top_k=2, renormalize=True, aux_loss_coeff=0.0)
    out = router(TOPK_LOGITS)
    assert torch.equal(out.routing_map_TE, TOPK_CHOSEN)
    torch.testing.assert_close(out.gates_TE.sum(-1), torch.ones(4))
    # Row 0: softmax over the chosen logits [2, 1] alone.
    row0 = torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1), 0.0, 0.0])
    torch.testing.assert_close(out.gates_TE[0], row0)
    assert (out.gates_TE[~TOPK_CHOSEN] == 0).all()


# E=4, K=1, T=8, capacity_factor 1.0 -> C = 2. Expert 0 is chosen by t0, t1, t3, t5
# with probabilities .475, .870, .711, .948 (softmax of [a, 0, 0, 0] = e^a / (e^a + 3)).
CAP_LOGITS = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [3.0, 0.0, 0.0, 0.0],
                           [0.0, 2.0, 0.0, 0.0],
                           [2.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 2.0, 0.0],
                           [4.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 2.0],
                           [0.0, 0.0, 0.0, 0.5]])
CAP_CHOSEN = _bool([[1, 0, 0, 0],
                    [1, 0, 0, 0],
                    [0, 1, 0, 0],
                    [1, 0, 0, 0],
                    [0, 0, 1, 0],
                    [1, 0, 0, 0],
                    [0, 0, 0, 1],
                    [0, 0, 0, 1]])


@pytest.mark.parametrize("policy,dropped", [("probs", [0, 3]), ("position", [3, 5])])
def test_topk_router_capacity_drop_order(policy, dropped):
    router = _router(TopKRouter, num_experts=4, top_k=1, capacity_factor=1.0,
                     drop_policy=policy, aux_loss_coeff=1.0)
    out = router(CAP_LOGITS)
    assert out.capacity == 2
    assert out.requested_slots == 8
    expected = CAP_CHOSEN.clone()
    expected[dropped, 0] = False
    assert torch.equal(out.routing_map_TE, expected)
    probs = torch.softmax(CAP_LOGITS, dim=-1)
    torch.testing.assert_close(out.gates_TE, probs * expected, rtol=0, atol=0)
    assert (out.gates_TE[dropped] == 0).all()
    # The balance loss counts the choices before the drop: f = [4, 1, 1, 2] / 8.
    f = torch.tensor([4.0, 1.0, 1.0, 2.0]) / 8
    expected_lb = 4 * torch.sum(f * probs.mean(0))
    torch.testing.assert_close(out.aux["load_balancing_loss"], expected_lb)


def test_topk_router_capacity_larger_than_tokens_drops_nothing():
    router = _router(TopKRouter, num_experts=4, top_k=1, capacity_factor=4.0,
                     aux_loss_coeff=0.0)
    out = router(CAP_LOGITS)
    assert out.capacity == 8
    assert torch.equal(out.routing_map_TE, CAP_CHOSEN)


def test_topk_router_load_balancing_loss_hand_computed():
    router = _router(TopKRouter, num_experts=4, top_k=2, aux_loss_coeff=0.01)
    out = router(TOPK_LOGITS)
    assert set(out.aux) == {"load_balancing_loss"}
    # Choices t0 {0,1}, t1 {2,3}, t2 {1,3}, t3 {0,2}: each expert twice -> f_i = 2/8.
    probs = torch.softmax(TOPK_LOGITS, dim=-1)
    p_E = probs.sum(0) / 4
    expected = 4 * sum(0.25 * p_E[i] for i in range(4))
    torch.testing.assert_close(out.aux["load_balancing_loss"], expected)
    # Since every f_i = 1/E here, the loss is exactly sum_i P_i = 1.
    torch.testing.assert_close(out.aux["load_balancing_loss"], torch.tensor(1.0))
    # The loss is unweighted by the coefficient and carries the router's gradient.
    out.aux["load_balancing_loss"].backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_topk_router_load_balancing_loss_unbalanced_case():
    logits = torch.tensor([[2.0, 0.0, 0.0],
                           [1.0, 0.0, 0.0],
                           [0.0, 1.0, 0.0]])
    router = _router(TopKRouter, num_experts=3, top_k=1, aux_loss_coeff=1.0)
    out = router(logits)
    assert torch.equal(out.routing_map_TE, _bool([[1, 0, 0], [1, 0, 0], [0, 1, 0]]))
    a, b = math.exp(2.0), math.exp(1.0)
    probs = [[a / (a + 2), 1 / (a + 2), 1 / (a + 2)],
             [b / (b + 2), 1 / (b + 2), 1 / (b + 2)],
             [1 / (b + 2), b / (b + 2), 1 / (b + 2)]]
    P = [sum(row[i] for row in probs) / 3 for i in range(3)]
    f = [2 / 3, 1 / 3, 0.0]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, P))
    assert out.aux["load_balancing_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert expected > 1.0


def test_topk_router_load_balancing_loss_is_one_for_uniform_routing():
    # Each expert gets half the tokens and half the probability mass.
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.0], [0.0, 0.5]])
    router = _router(TopKRouter, num_experts=2, top_k=1, aux_loss_coeff=1.0)
    out = router(logits)
    assert torch.equal(out.routing_map_TE, _bool([[1, 0], [0, 1], [1, 0], [0, 1]]))
    assert out.aux["load_balancing_loss"].item() == pytest.approx(1.0, abs=1e-6)
    # All-zero logits: every probability is 1/E, whatever the tie-break picks.
    router4 = _router(TopKRouter, num_experts=4, top_k=2, aux_loss_coeff=1.0)
    out4 = router4(torch.zeros(6, 4))
    assert out4.aux["load_balancing_loss"].item() == pytest.approx(1.0, abs=1e-6)


def test_topk_router_z_loss():
    router = _router(TopKRouter, num_experts=4, top_k=2, aux_loss_coeff=0.0, z_loss_coeff=1e-3)
    out = router(TOPK_LOGITS)
    assert set(out.aux) == {"z_loss"}
    lse = [math.log(sum(math.exp(v) for v in row)) for row in TOPK_LOGITS.tolist()]
    expected = sum(z * z for z in lse) / 4
    assert out.aux["z_loss"].item() == pytest.approx(expected, rel=1e-6)
    both = _router(TopKRouter, num_experts=4, top_k=2, aux_loss_coeff=0.1,
                   z_loss_coeff=1e-3)(TOPK_LOGITS)
    assert set(both.aux) == {"load_balancing_loss", "z_loss"}


def test_router_logits_come_from_the_weight():
    cfg = MoEConfig(num_experts=3, top_k=1)
    router = TopKRouter(cfg, 2, RouterSetup(sequence_parallel=True))
    assert router.weight.shape == (3, 2)
    assert getattr(router.weight, "sequence_parallel") is True
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, -1.0], [-1.0, 0.5]])
    torch.testing.assert_close(router.logits(x), torch.tensor([[2.0, -1.0, 1.0],
                                                                [-1.0, 0.5, -0.5]]))
    out = router(x)
    assert torch.equal(out.routing_map_TE, _bool([[1, 0, 0], [0, 1, 0]]))
    # Logits are fp32 even for a low-precision input.
    assert router.logits(x.to(torch.bfloat16)).dtype == torch.float32


# ---- ExpertChoiceRouter ---------------------------------------------------------

# E=3, T=6. Per-expert softmax scores (rounded):
#   expert 0: t0 .91, t1 .47, t2 .04, t3 .04, t4 .21, t5 .33 -> top-2 {t0, t1}
#   expert 1: t0 .04, t1 .47, t2 .91, t3 .04, t4 .21, t5 .33 -> top-2 {t2, t1}
#   expert 2: t0 .04, t1 .06, t2 .04, t3 .91, t4 .58, t5 .33 -> top-2 {t3, t4}
EC_LOGITS = torch.tensor([[3.0, 0.0, 0.0],
                          [2.0, 2.0, 0.0],
                          [0.0, 3.0, 0.0],
                          [0.0, 0.0, 3.0],
                          [0.0, 0.0, 1.0],
                          [0.0, 0.0, 0.0]])


def test_expert_choice_router_default_capacity_from_top_k():
    router = _router(ExpertChoiceRouter, num_experts=3, top_k=1, aux_loss_coeff=0.01)
    out = router(EC_LOGITS)
    assert out.capacity == 2  # ceil(1 * 6 / 3)
    expected = _bool([[1, 0, 0],
                      [1, 1, 0],  # t1 goes to two experts
                      [0, 1, 0],
                      [0, 0, 1],
                      [0, 0, 1],
                      [0, 0, 0]])  # t5 goes to none
    assert torch.equal(out.routing_map_TE, expected)
    assert torch.equal(out.routing_map_TE.sum(0), torch.tensor([2, 2, 2]))
    probs = torch.softmax(EC_LOGITS, dim=-1)
    torch.testing.assert_close(out.gates_TE, probs * expected, rtol=0, atol=0)
    assert out.requested_slots == 6
    assert out.aux == {}  # balanced by construction: no balance loss


def test_expert_choice_router_capacity_factor_and_top_k():
    out = _router(ExpertChoiceRouter, num_experts=3, top_k=1, capacity_factor=0.5)(EC_LOGITS)
    assert out.capacity == 1  # ceil(0.5 * 6 / 3)
    assert torch.equal(out.routing_map_TE, _bool([[1, 0, 0], [0, 0, 0], [0, 1, 0],
                                                  [0, 0, 1], [0, 0, 0], [0, 0, 0]]))
    # top_k=2 without a factor: C = ceil(2 * 6 / 3) = 4.
    # expert 0 adds t5 (.33) and t4 (.21); expert 1 likewise; expert 2 adds t5 (.33), t1 (.06).
    out = _router(ExpertChoiceRouter, num_experts=3, top_k=2)(EC_LOGITS)
    assert out.capacity == 4
    expected = _bool([[1, 0, 0],
                      [1, 1, 1],
                      [0, 1, 0],
                      [0, 0, 1],
                      [1, 1, 1],
                      [1, 1, 1]])
    assert torch.equal(out.routing_map_TE, expected)
    assert out.requested_slots == 12
    # A factor larger than E is clamped to all T tokens per expert.
    out = _router(ExpertChoiceRouter, num_experts=3, top_k=1, capacity_factor=5.0)(EC_LOGITS)
    assert out.capacity == 6
    assert out.routing_map_TE.all()


def test_expert_choice_router_z_loss():
    out = _router(ExpertChoiceRouter, num_experts=3, top_k=1, z_loss_coeff=0.1)(EC_LOGITS)
    assert set(out.aux) == {"z_loss"}
    torch.testing.assert_close(out.aux["z_loss"],
                               torch.logsumexp(EC_LOGITS, -1).pow(2).mean())


# ---- AuxFreeRouter --------------------------------------------------------------

# sigmoid(1) = .731, sigmoid(.5) = .622, sigmoid(0) = .5, sigmoid(-1) = .269.
AF_LOGITS = torch.tensor([[1.0, 0.5, 0.0],
                          [-1.0, 0.0, 0.5]])


def test_aux_free_router_bias_flips_choice_but_not_gates():
    router = _router(AuxFreeRouter, num_experts=3, top_k=1, aux_loss_coeff=0.0)
    out = router(AF_LOGITS)
    assert torch.equal(out.routing_map_TE, _bool([[1, 0, 0], [0, 0, 1]]))
    # K=1: the chosen score normalised by itself.
    torch.testing.assert_close(out.gates_TE, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    # Bias +0.2 on expert 1: t0 scores become .731, .822, .5 -> expert 1.
    # t1: .269, .700, .622 -> expert 1 as well.
    router.expert_bias.copy_(torch.tensor([0.0, 0.2, 0.0]))
    out = router(AF_LOGITS)
    assert torch.equal(out.routing_map_TE, _bool([[0, 1, 0], [0, 1, 0]]))
    assert out.requested_slots == 2
    assert out.capacity is None


def test_aux_free_router_top2_gates_normalised_sigmoid_scores():
    router = _router(AuxFreeRouter, num_experts=3, top_k=2, aux_loss_coeff=0.0)
    out = router(AF_LOGITS)
    s = torch.sigmoid(AF_LOGITS)
    assert torch.equal(out.routing_map_TE, _bool([[1, 1, 0], [0, 1, 1]]))
    expected = torch.tensor([[s[0, 0] / (s[0, 0] + s[0, 1]), s[0, 1] / (s[0, 0] + s[0, 1]), 0.0],
                             [0.0, s[1, 1] / (s[1, 1] + s[1, 2]), s[1, 2] / (s[1, 1] + s[1, 2])]])
    torch.testing.assert_close(out.gates_TE, expected)
    # Bias [-0.5, 0.1, 0]: t0's scores + bias are .231, .722, .5 -> experts 1, 2;
    # the gates are the unbiased sigmoid scores .622 and .5, normalised.
    router.expert_bias.copy_(torch.tensor([-0.5, 0.1, 0.0]))
    out = router(AF_LOGITS)
    assert torch.equal(out.routing_map_TE, _bool([[0, 1, 1], [0, 1, 1]]))
    g1, g2 = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(0.0))
    torch.testing.assert_close(out.gates_TE[0], torch.stack([torch.tensor(0.0), g1 / (g1 + g2),
                                                             g2 / (g1 + g2)]))
    torch.testing.assert_close(out.gates_TE.sum(-1), torch.ones(2))


def test_aux_free_router_balance_loss_uses_normalised_scores():
    router = _router(AuxFreeRouter, num_experts=3, top_k=1, aux_loss_coeff=0.5)
    out = router(AF_LOGITS)
    s = torch.sigmoid(AF_LOGITS)
    probs = s / s.sum(-1, keepdim=True)
    f = torch.tensor([0.5, 0.0, 0.5])  # t0 -> 0, t1 -> 2
    torch.testing.assert_close(out.aux["load_balancing_loss"], 3 * torch.sum(f * probs.mean(0)))


def test_aux_free_router_step_end_moves_bias_against_the_load():
    router = _router(AuxFreeRouter, num_experts=4, top_k=1, bias_update_rate=0.01)
    assert "expert_bias" in router.state_dict()
    assert "expert_bias" not in dict(router.named_parameters())
    torch.testing.assert_close(router.expert_bias, torch.zeros(4))
    router.step_end(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    router.step_end(torch.tensor([0, 4, 4, 4]))  # integer counts, mean 3
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.0, -0.01, -0.01]))
    torch.testing.assert_close(router.state_dict()["expert_bias"],
                               torch.tensor([0.0, 0.0, -0.01, -0.01]))
    assert router.adapts_to_load and not TopKRouter.adapts_to_load


def test_aux_free_router_bias_round_trips_through_state_dict():
    a = _router(AuxFreeRouter, num_experts=3, top_k=1)
    a.step_end(torch.tensor([9.0, 0.0, 0.0]))
    b = _router(AuxFreeRouter, num_experts=3, top_k=1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.expert_bias, a.expert_bias)


# ---- HashRouter -----------------------------------------------------------------


def _hash(vocab_size=10, seed=0, num_experts=4):
    cfg = MoEConfig(router="hash", num_experts=num_experts, top_k=1)
    return HashRouter(cfg, 8, RouterSetup(vocab_size=vocab_size, seed=seed))


def test_hash_router_same_token_same_expert_gate_one():
    router = _hash()
    ids = torch.tensor([3, 7, 3, 0, 9, 7, 3])
    out = router(torch.randn(7, 8), ids)
    expert_T = out.routing_map_TE.float().argmax(-1)
    assert torch.equal(out.routing_map_TE.sum(-1), torch.ones(7, dtype=torch.int64))
    assert torch.equal(expert_T, router.table[ids])
    assert expert_T[0] == expert_T[2] == expert_T[6] and expert_T[1] == expert_T[5]
    torch.testing.assert_close(out.gates_TE, out.routing_map_TE.float(), rtol=0, atol=0)
    assert out.requested_slots == 7
    # The input itself plays no part; a second call gives the same routing.
    out2 = router(torch.randn(7, 8), ids)
    assert torch.equal(out2.routing_map_TE, out.routing_map_TE)


def test_hash_router_table_is_balanced_and_seeded():
    for vocab_size in (10, 13, 4096):
        counts = torch.bincount(_hash(vocab_size).table, minlength=4)
        assert counts.sum() == vocab_size
        assert counts.max() - counts.min() <= 1
    assert torch.equal(_hash(100, seed=3).table, _hash(100, seed=3).table)
    assert not torch.equal(_hash(100, seed=0).table, _hash(100, seed=1).table)
    assert "table" not in _hash().state_dict()  # rebuilt from the seed


def test_hash_router_needs_token_ids():
    router = _hash()
    with pytest.raises(RuntimeError, match="token ids"):
        router(torch.randn(3, 8))
    assert router.needs_token_ids and not TopKRouter.needs_token_ids
    assert not list(router.parameters())  # no learned router


# ---- losses ---------------------------------------------------------------------


def test_switch_load_balancing_loss_hand_numbers():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    selected = _bool([[1, 0], [0, 1], [1, 0]])
    # f = [2/3, 1/3], P = [2.0/3, 1.0/3] -> 2 * (4/9 + 1/9) = 10/9.
    loss = switch_load_balancing_loss(probs, selected, top_k=1)
    assert loss.item() == pytest.approx(10 / 9, rel=1e-6)
    # K=2, every token picks both experts: f = [1/2, 1/2] -> 2 * (1/3 + 1/6) = 1.
    loss2 = switch_load_balancing_loss(probs, torch.ones(3, 2, dtype=torch.bool), top_k=2)
    assert loss2.item() == pytest.approx(1.0, rel=1e-6)
    # Gradient flows to the probabilities only: dL/dP_ti = E * f_i / T.
    p = probs.clone().requires_grad_(True)
    switch_load_balancing_loss(p, selected, top_k=1).backward()
    torch.testing.assert_close(p.grad, torch.tensor([[4 / 9, 2 / 9]] * 3))


def test_router_z_loss_hand_numbers():
    ln2 = math.log(2.0)
    logits = torch.tensor([[0.0, 0.0],  # logsumexp = ln 2
                           [0.0, math.log(3.0)],  # ln 4
                           [ln2, ln2]])  # ln 4
    loss = router_z_loss(logits)
    # (ln2^2 + (2 ln2)^2 + (2 ln2)^2) / 3 = 3 ln2^2
    assert loss.item() == pytest.approx(3 * ln2 ** 2, rel=1e-6)
    assert router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32
