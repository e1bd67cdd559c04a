"""Node-limited routing (``moe.max_nodes_per_token``): the mask and every router under it.

Legend: T tokens, D hidden size, E experts, K experts per token, N nodes,
M = max_nodes_per_token.

Each token may use experts on at most M nodes; nodes are ranked per token by
their best expert score (DeepSeek-V3 style), then the router's usual
selection runs among the experts on the token's top-M nodes. Routers are
built directly, as in test_routers.py, and given the placement through
``router.expert_node_E`` the way the layer does.
"""

from __future__ import annotations

import pytest
import torch

from locmoe_train.config import MoEConfig
from locmoe_train.errors import UserError
from locmoe_train.moe.routers import RouterSetup
from locmoe_train.moe.routers.locmoe_plus import LocMoEPlusRouter, grap_affinity
from locmoe_train.moe.losses import switch_load_balancing_loss
from locmoe_train.moe.routers import AuxFreeRouter, ExpertChoiceRouter, HashRouter, TopKRouter
from locmoe_train.moe.routing import drop_over_capacity, node_limited_mask

# 8 experts on 4 nodes, as the layer places them (contiguous blocks per EP rank),
# and an interleaved placement with non-contiguous node ids.
BLOCKS_8x4 = [0, 0, 1, 1, 2, 2, 3, 3]
INTERLEAVED_8x4 = [3, 5, 7, 9, 3, 5, 7, 9]
PLACEMENTS = [BLOCKS_8x4, INTERLEAVED_8x4]


def _bool(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _nodes_per_token(map_TE: torch.Tensor, expert_node) -> torch.Tensor:
    """Distinct nodes among each token's routed experts."""
    node_E = torch.tensor(expert_node)
    return torch.tensor([node_E[row].unique().numel() for row in map_TE])


# ---- node_limited_mask ---------------------------------------------------------

# 6 experts on 3 nodes: node 0 = {e0, e1}, node 1 = {e2, e3}, node 2 = {e4, e5}.
NODES_6x3 = torch.tensor([0, 0, 1, 1, 2, 2])
SCORES_4x6 = torch.tensor([
    [0.1, 0.9, 0.5, 0.2, 0.3, 0.0],  # node scores 0.9 0.5 0.3
    [0.4, 0.1, 0.2, 0.3, 0.8, 0.7],  # node scores 0.4 0.3 0.8
    [0.1, 0.2, 0.7, 0.0, 0.3, 0.7],  # node scores 0.2 0.7 0.7: tie for first
    [0.5, 0.5, 0.5, 0.5, 0.9, 0.1],  # node scores 0.5 0.5 0.9: tie for second
])


def test_node_limited_mask_hand_case_one_node():
    expected = _bool([[1, 1, 0, 0, 0, 0],
                      [0, 0, 0, 0, 1, 1],
                      [0, 0, 1, 1, 0, 0],  # tie 1 vs 2: the lower node index wins
                      [0, 0, 0, 0, 1, 1]])
    assert torch.equal(node_limited_mask(SCORES_4x6, NODES_6x3, 1), expected)


def test_node_limited_mask_hand_case_two_nodes():
    expected = _bool([[1, 1, 1, 1, 0, 0],
                      [1, 1, 0, 0, 1, 1],
                      [0, 0, 1, 1, 1, 1],
                      [1, 1, 0, 0, 1, 1]])  # tie 0 vs 1 for second place: node 0
    assert torch.equal(node_limited_mask(SCORES_4x6, NODES_6x3, 2), expected)


@pytest.mark.parametrize("max_nodes", [3, 4, 100])
def test_node_limited_mask_allows_everything_when_the_limit_covers_all_nodes(max_nodes):
    assert node_limited_mask(SCORES_4x6, NODES_6x3, max_nodes).all()


def test_node_limited_mask_one_node_or_no_placement_is_no_limit():
    assert node_limited_mask(SCORES_4x6, None, 1).all()
    assert node_limited_mask(SCORES_4x6, torch.full((6,), 2), 1).all()


def test_node_limited_mask_node_ids_need_not_be_contiguous():
    # Same order of ids -> same tie-breaking -> same mask.
    renamed = torch.tensor([4, 4, 10, 10, 11, 11])
    for m in (1, 2):
        assert torch.equal(node_limited_mask(SCORES_4x6, renamed, m),
                           node_limited_mask(SCORES_4x6, NODES_6x3, m))


def test_node_limited_mask_handles_negative_scores_and_is_monotone_invariant():
    logits_TE = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) * 3 - 5
    node_E = torch.tensor(BLOCKS_8x4)
    for m in (1, 2, 3):
        mask = node_limited_mask(logits_TE, node_E, m)
        assert torch.equal(mask, node_limited_mask(torch.softmax(logits_TE, -1), node_E, m))
        assert (mask.sum(-1) == 2 * m).all()  # exactly M nodes of 2 experts each
        # Every allowed node scores at least as high as every disallowed one.
        node_score_TN = logits_TE.view(50, 4, 2).amax(-1)
        allowed_TN = mask.view(50, 4, 2)[..., 0]
        worst_in = node_score_TN.masked_fill(~allowed_TN, float("inf")).amin(-1)
        best_out = node_score_TN.masked_fill(allowed_TN, float("-inf")).amax(-1)
        assert (worst_in >= best_out).all()


# ---- every router: at most M nodes, K experts, unlimited when M >= N --------------

T = 64


def _x(seed: int, D: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)) * 2


def _topk(max_nodes, **kw):
    cfg = MoEConfig(num_experts=8, top_k=2, max_nodes_per_token=max_nodes, **kw)
    router = TopKRouter(cfg, 8)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))
    return router


def _expert_choice(max_nodes, **kw):
    cfg = MoEConfig(router="expert_choice", num_experts=8, top_k=2,
                    max_nodes_per_token=max_nodes, **kw)
    router = ExpertChoiceRouter(cfg, 8)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))
    return router


def _aux_free(max_nodes, **kw):
    cfg = MoEConfig(router="aux_free", num_experts=8, top_k=2, max_nodes_per_token=max_nodes,
                    **kw)
    router = AuxFreeRouter(cfg, 8)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))
        # A bias large enough to change choices, so nodes must be ranked by score + bias.
        router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.4, -0.5, 0.1, 0.2, -0.1]))
    return router


def _locmoe(mode):
    def build(max_nodes, **kw):
        cfg = MoEConfig(router="locmoe_plus", num_experts=8, top_k=2,
                        max_nodes_per_token=max_nodes, **kw)
        cfg.locmoe_plus.mode = mode
        cfg.capacity.factor0 = 0.8  # C < T * K / E: expert choice really drops
        cfg.capacity.multiple = 1
        return LocMoEPlusRouter(cfg, 16, RouterSetup(seq_len=T, max_steps=10))
    return build


ROUTER_BUILDERS = {
    "topk": (_topk, 8),
    "topk_capacity": (lambda m: _topk(m, capacity_factor=1.0), 8),
    "aux_free": (_aux_free, 8),
    "expert_choice": (_expert_choice, 8),
    "locmoe_plus_tcr_ecr": (_locmoe("tcr_ecr"), 16),
    "locmoe_plus_ecr": (_locmoe("ecr"), 16),
    "locmoe_plus_tcr": (_locmoe("tcr"), 16),
}
# Routers that give every token exactly top_k experts before capacity drops.
EXACT_K = {"topk", "aux_free", "locmoe_plus_tcr"}


def _route(name, max_nodes, placement, seed=0):
    build, D = ROUTER_BUILDERS[name]
    router = build(max_nodes)
    if placement is not None:
        router.expert_node_E = torch.tensor(placement, dtype=torch.int64)
    router.train()
    return router(_x(seed, D))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("max_nodes", [1, 2])
@pytest.mark.parametrize("name", sorted(ROUTER_BUILDERS))
def test_no_token_uses_more_than_max_nodes(name, max_nodes, placement):
    for seed in range(3):
        result = _route(name, max_nodes, placement, seed)
        map_TE = result.routing_map_TE
        assert (_nodes_per_token(map_TE, placement) <= max_nodes).all()
        assert map_TE.any()
        assert torch.equal(result.gates_TE != 0, map_TE)  # gates only where routed
        if name in EXACT_K:
            assert (map_TE.sum(-1) == 2).all()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", sorted(ROUTER_BUILDERS))
def test_unlimited_routing_spans_several_nodes(name, placement):
    """Sanity: without the limit some token uses 2 nodes, so the test above has teeth."""
    map_TE = _route(name, None, placement).routing_map_TE
    assert (_nodes_per_token(map_TE, placement) > 1).any()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("max_nodes", [4, 7])
@pytest.mark.parametrize("name", sorted(ROUTER_BUILDERS))
def test_limit_covering_all_nodes_equals_unlimited_routing(name, max_nodes, placement):
    for seed in range(2):
        limited = _route(name, max_nodes, placement, seed)
        free = _route(name, None, placement, seed)
        assert torch.equal(limited.routing_map_TE, free.routing_map_TE)
        assert torch.equal(limited.gates_TE, free.gates_TE)
        assert limited.requested_slots == free.requested_slots
        assert limited.capacity == free.capacity
        assert limited.aux.keys() == free.aux.keys()
        for key in free.aux:
            assert torch.equal(limited.aux[key], free.aux[key])


@pytest.mark.parametrize("name", sorted(ROUTER_BUILDERS))
def test_one_node_or_no_placement_is_no_limit(name):
    free = _route(name, None, None)
    for placement in (None, [0] * 8, [5] * 8):
        limited = _route(name, 1, placement)
        assert torch.equal(limited.routing_map_TE, free.routing_map_TE)
        assert torch.equal(limited.gates_TE, free.gates_TE)


def test_replacing_the_placement_takes_effect():
    router = _topk(1)
    x = _x(0, 8)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    limited = router(x).routing_map_TE
    assert (_nodes_per_token(limited, BLOCKS_8x4) == 1).all()
    router.expert_node_E = torch.zeros(8, dtype=torch.int64)
    assert torch.equal(router(x).routing_map_TE, _topk(None)(x).routing_map_TE)


# ---- top-k: the limit changes the choice, not the gates -------------------------


def _topk_4x2(max_nodes, renormalize=False):
    """4 experts on 2 nodes ({e0, e1}, {e2, e3}), top-2, logits = input."""
    cfg = MoEConfig(num_experts=4, top_k=2, max_nodes_per_token=max_nodes,
                    renormalize=renormalize)
    router = TopKRouter(cfg, 4)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    router.expert_node_E = torch.tensor([0, 0, 1, 1])
    return router


# t0: the best two experts (e0 on node 0, e2 on node 1) are on different nodes;
# node 0 is the best node (2.0 > 1.9), so M=1 takes e0 and e1.
# t1: node 1 is best (e3 = 3.0); both limits keep e3 and e2.
LOGITS_2x4 = torch.tensor([[2.0, 0.0, 1.9, 1.8],
                           [0.5, 1.0, 2.5, 3.0]])


def test_topk_limit_changes_the_chosen_experts():
    free = _topk_4x2(None)(LOGITS_2x4).routing_map_TE
    assert torch.equal(free, _bool([[1, 0, 1, 0], [0, 0, 1, 1]]))
    limited = _topk_4x2(1)(LOGITS_2x4).routing_map_TE
    assert torch.equal(limited, _bool([[1, 1, 0, 0], [0, 0, 1, 1]]))
    assert torch.equal(_topk_4x2(2)(LOGITS_2x4).routing_map_TE, free)


def test_topk_gates_are_the_unmasked_softmax_at_the_chosen_experts():
    probs = torch.softmax(LOGITS_2x4, dim=-1)
    result = _topk_4x2(1)(LOGITS_2x4)
    expected = torch.stack([probs[0] * torch.tensor([1.0, 1.0, 0.0, 0.0]),
                            probs[1] * torch.tensor([0.0, 0.0, 1.0, 1.0])])
    torch.testing.assert_close(result.gates_TE, expected, rtol=0, atol=0)
    assert result.gates_TE[0].sum() < 1  # not renormalised because of the mask
    # The balance loss sees the unmasked probabilities and the limited choice.
    torch.testing.assert_close(
        result.aux["load_balancing_loss"],
        switch_load_balancing_loss(probs, result.routing_map_TE, 2, None, 1))
    torch.testing.assert_close(result.probs_TE, probs)


def test_topk_renormalize_rescales_only_the_chosen_unmasked_probabilities():
    probs = torch.softmax(LOGITS_2x4, dim=-1)
    gates = _topk_4x2(1, renormalize=True)(LOGITS_2x4).gates_TE
    p0, p1 = probs[0, 0], probs[0, 1]
    torch.testing.assert_close(gates[0], torch.stack([p0, p1, 0 * p0, 0 * p0]) / (p0 + p1))


def test_topk_random_gates_are_unmasked_softmax_and_gradients_flow():
    router = _topk(1)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    x = _x(1, 8)
    result = router(x)
    probs = torch.softmax(x, dim=-1)
    torch.testing.assert_close(result.gates_TE, probs * result.routing_map_TE)
    # The chosen pair is the best node's two experts.
    best_node_T = x.view(T, 4, 2).amax(-1).argmax(-1)
    assert torch.equal(result.routing_map_TE.view(T, 4, 2).all(-1).float().argmax(-1),
                       best_node_T)
    result.gates_TE.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# ---- aux_free, expert choice, LocMoE+ against references ------------------------


def test_aux_free_ranks_nodes_by_biased_scores():
    router = _aux_free(1)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    x = _x(2, 8)
    result = router(x)
    select_TE = torch.sigmoid(x) + router.expert_bias
    allowed = node_limited_mask(select_TE, torch.tensor(BLOCKS_8x4), 1)
    top_TK = select_TE.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).indices
    expected = torch.zeros(T, 8, dtype=torch.bool).scatter_(1, top_TK, True)
    assert torch.equal(result.routing_map_TE, expected)
    # M=1 with 2 experts per node: each token takes exactly its best (biased) node.
    assert torch.equal(result.routing_map_TE, allowed)
    gates = torch.sigmoid(x) * expected
    torch.testing.assert_close(result.gates_TE, gates / gates.sum(-1, keepdim=True))


@pytest.mark.parametrize("max_nodes", [1, 2])
def test_expert_choice_takes_best_allowed_tokens(max_nodes):
    router = _expert_choice(max_nodes)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    x = _x(3, 8)
    result = router(x)
    probs = torch.softmax(x, dim=-1)
    allowed = node_limited_mask(probs, torch.tensor(BLOCKS_8x4), max_nodes)
    C = result.capacity
    assert C == 16  # ceil(2 * 64 / 8)
    for e in range(8):
        candidates = [t for t in range(T) if allowed[t, e]]
        best = sorted(candidates, key=lambda t: -probs[t, e].item())[:C]
        assert set(result.routing_map_TE[:, e].nonzero().flatten().tolist()) == set(best)


@pytest.mark.parametrize("max_nodes", [1, 2])
def test_locmoe_plus_tcr_picks_within_allowed_and_ecr_keeps_a_subset(max_nodes):
    x = _x(4, 16)
    node_E = torch.tensor(BLOCKS_8x4)
    delta = grap_affinity(x, 8)
    allowed = node_limited_mask(delta, node_E, max_nodes)
    top_TK = delta.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).indices
    tcr_expected = torch.zeros(T, 8, dtype=torch.bool).scatter_(1, top_TK, True)
    tcr = _route("locmoe_plus_tcr", max_nodes, BLOCKS_8x4, seed=4)
    assert torch.equal(tcr.routing_map_TE, tcr_expected)
    tcr_ecr = _route("locmoe_plus_tcr_ecr", max_nodes, BLOCKS_8x4, seed=4)
    assert torch.equal(tcr_ecr.routing_map_TE,
                       drop_over_capacity(tcr_expected, delta, tcr_ecr.capacity, "probs"))
    assert not torch.equal(tcr_ecr.routing_map_TE, tcr_expected)  # capacity did drop


@pytest.mark.parametrize("max_nodes", [1, 2])
def test_locmoe_plus_ecr_candidates_are_the_allowed_tokens(max_nodes):
    x = _x(5, 16)
    delta = grap_affinity(x, 8)
    allowed = node_limited_mask(delta, torch.tensor(BLOCKS_8x4), max_nodes)
    result = _route("locmoe_plus_ecr", max_nodes, BLOCKS_8x4, seed=5)
    assert torch.equal(result.routing_map_TE,
                       drop_over_capacity(allowed, delta, result.capacity, "probs"))
    probs = torch.softmax(delta * 4, dim=-1)  # tau auto = 1 / sqrt(D = 16)
    torch.testing.assert_close(result.gates_TE, probs * result.routing_map_TE)


def test_locmoe_plus_eval_token_choice_respects_the_limit():
    build, D = ROUTER_BUILDERS["locmoe_plus_tcr_ecr"]
    router = build(1)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    router.eval()
    map_TE = router(_x(6, D)).routing_map_TE
    assert (map_TE.sum(-1) == 2).all()
    assert (_nodes_per_token(map_TE, BLOCKS_8x4) == 1).all()


def test_hash_router_ignores_the_limit():
    cfg = MoEConfig(router="hash", num_experts=8, top_k=1, max_nodes_per_token=1)
    router = HashRouter(cfg, 8, RouterSetup(vocab_size=100, seed=0))
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    map_TE = router(torch.zeros(30, 8), torch.arange(30)).routing_map_TE
    assert (map_TE.sum(-1) == 1).all()


# ---- the limit must leave room for top_k experts --------------------------------


@pytest.mark.parametrize("name", ["topk", "aux_free", "locmoe_plus"])
def test_too_few_experts_on_max_nodes_is_a_user_error_when_placed(name):
    kw = dict(num_experts=8, top_k=4, max_nodes_per_token=1)
    if name == "topk":
        router, D = TopKRouter(MoEConfig(**kw), 8), 8
    elif name == "aux_free":
        router, D = AuxFreeRouter(MoEConfig(router="aux_free", **kw), 8), 8
    else:
        router, D = LocMoEPlusRouter(MoEConfig(router="locmoe_plus", **kw), 16,
                                     RouterSetup(seq_len=T)), 16
    router(_x(0, D))  # no placement yet: nothing to check
    with pytest.raises(UserError) as err:  # the layer places experts when it builds the router
        router.expert_node_E = torch.tensor(BLOCKS_8x4)
    message = str(err.value)
    assert "moe.max_nodes_per_token=1" in message and "moe.top_k=4" in message
    assert "moe.max_nodes_per_token >= 2" in message and "moe.top_k <= 2" in message


def test_uneven_placement_checks_the_smallest_nodes():
    router = _topk(1)  # top_k 2
    with pytest.raises(UserError, match="moe.max_nodes_per_token >= 2"):
        router.expert_node_E = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])  # node 1: one expert
    router = _topk(2)  # any two nodes hold >= 2 experts
    router.expert_node_E = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])
    result = router(_x(0, 8))
    assert (result.routing_map_TE.sum(-1) == 2).all()


def test_enough_experts_or_expert_choice_is_fine():
    router = TopKRouter(MoEConfig(num_experts=8, top_k=4, max_nodes_per_token=2), 8)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    assert (router(_x(0, 8)).routing_map_TE.sum(-1) == 4).all()
    # Expert choice has no per-token count: top_k 4 with M=1 is allowed.
    router = ExpertChoiceRouter(MoEConfig(router="expert_choice", num_experts=8, top_k=4,
                                          max_nodes_per_token=1), 8)
    router.expert_node_E = torch.tensor(BLOCKS_8x4)
    assert (_nodes_per_token(router(_x(0, 8)).routing_map_TE, BLOCKS_8x4) <= 1).all()
