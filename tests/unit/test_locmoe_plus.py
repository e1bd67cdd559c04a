"""LocMoE+ affinity router (GrAP gating, TCR/ECR), its losses and its MoE layer.

Legend: T tokens, D hidden size, E experts, K (= l) experts per token,
B = D / E channels per expert block, C capacity per sequence of S tokens.

METHOD.md sections 1, 2 and 4. References are written independently of the
code under test: the affinity from explicit gate vectors ``w_i``, the routing
from plain Python loops, the losses from scalar arithmetic, and the layer
output from a dense per-expert SwiGLU sum.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locmoe_train.config import MoEConfig
from locmoe_train.errors import UserError
from locmoe_train.moe.capacity_stats import estimate_q
from locmoe_train.moe.routers import RouterSetup
from locmoe_train.moe.routers.locmoe_plus import LocMoEPlusRouter, grap_affinity
from locmoe_train.moe.losses import locality_loss
from locmoe_train.moe.routing import RoutingResult


def _router(num_experts=4, top_k=1, hidden=16, seq_len=24, mode="tcr_ecr", tau=1.0,
            learn_tau=False, eval_token_choice=True, factor0=1.1, aux_loss_coeff=0.01,
            max_steps=10):
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, router="locmoe_plus",
                    aux_loss_coeff=aux_loss_coeff)
    cfg.locmoe_plus.mode = mode
    cfg.locmoe_plus.tau = tau
    cfg.locmoe_plus.learn_tau = learn_tau
    cfg.locmoe_plus.eval_token_choice = eval_token_choice
    cfg.capacity.factor0 = factor0
    return LocMoEPlusRouter(cfg, hidden, RouterSetup(seq_len=seq_len, max_steps=max_steps))


def _gate_vectors(D, E):
    """w_i = E/D on block i, 0 elsewhere (METHOD.md section 1)."""
    B = D // E
    W = torch.zeros(E, D, dtype=torch.float64)
    for i in range(E):
        W[i, i * B:(i + 1) * B] = E / D
    return W


def _cosine_reference(x_TD, E):
    x = x_TD.to(torch.float64)
    W = _gate_vectors(x.shape[1], E)
    return (x @ W.t()) / (x.norm(dim=-1, keepdim=True) * W.norm(dim=-1)[None, :])


# ---- 1. grap_affinity -----------------------------------------------------------


@pytest.mark.parametrize("T,D,E", [(7, 16, 4), (5, 12, 3), (9, 8, 8), (3, 6, 1)])
def test_grap_affinity_is_the_cosine_with_block_gate_vectors(T, D, E):
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T * D + E)) * 3 + 0.5
    got = grap_affinity(x, E)
    assert got.shape == (T, E) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _cosine_reference(x, E), rtol=1e-5, atol=1e-6)
    # Block-sum form, scalar by scalar, for one entry: sum(x[B_1]) / (sqrt(B) |x|).
    B = D // E
    t, i = 1, E - 1
    want = sum(float(v) for v in x[t, i * B:(i + 1) * B]) / (math.sqrt(B) * float(x[t].norm()))
    assert float(got[t, i]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_grap_affinity_orthogonal_gate_vectors_hit_their_own_block_only():
    # x = one gate direction (all ones on block 2): cosine 1 there, 0 for the others.
    D, E = 12, 4
    x = torch.zeros(2, D)
    x[0, 6:9] = 2.0
    x[1, 0:3] = -1.0  # anti-aligned with w_0
    got = grap_affinity(x, E)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 1.0, 0.0],
                                                  [-1.0, 0.0, 0.0, 0.0]]))


def test_grap_affinity_fp32_for_bf16_input():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    x_bf = x.to(torch.bfloat16)
    got = grap_affinity(x_bf, 4)
    assert got.dtype == torch.float32
    # Exactly the fp32 computation on the (bf16-rounded) values, not a bf16 result.
    torch.testing.assert_close(got, grap_affinity(x_bf.float(), 4), rtol=0, atol=0)
    torch.testing.assert_close(got.double(), _cosine_reference(x_bf.float(), 4),
                               rtol=1e-5, atol=1e-6)


def test_grap_affinity_sum_of_squares_at_most_one():
    g = torch.Generator().manual_seed(11)
    for D, E in [(16, 4), (32, 8), (12, 3), (8, 1), (8, 8)]:
        x = torch.randn(200, D, generator=g) * torch.rand(200, 1, generator=g) * 10
        x[:5] = x[:5].abs()  # some tokens all-positive (large affinities)
        sq_T = grap_affinity(x, E).pow(2).sum(-1)
        assert (sq_T <= 1 + 1e-6).all(), (D, E, float(sq_T.max()))
    # Equality when x is constant within each block (x in the span of the w_i).
    x = torch.tensor([[1.0, 1.0, -2.0, -2.0, 0.5, 0.5, 3.0, 3.0]])
    assert float(grap_affinity(x, 4).pow(2).sum()) == pytest.approx(1.0, abs=1e-6)


def test_grap_affinity_zero_vector_is_finite():
    x = torch.zeros(3, 8)
    x[1] = torch.arange(8.0)
    got = grap_affinity(x, 4)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], torch.zeros(4))
    torch.testing.assert_close(got[2], torch.zeros(4))
    # Gradient through a zero row is finite too.
    xr = x.clone().requires_grad_(True)
    grap_affinity(xr, 4).sum().backward()
    assert torch.isfinite(xr.grad).all()
    # The router on an all-zero input: finite probabilities (uniform), no NaN.
    out = _router(hidden=8)(torch.zeros(4, 8))
    assert torch.isfinite(out.probs_TE).all() and torch.isfinite(out.gates_TE).all()
    torch.testing.assert_close(out.probs_TE, torch.full((4, 4), 0.25))


# ---- 2. configuration errors ----------------------------------------------------


def test_hidden_size_not_divisible_by_num_experts_is_a_user_error():
    cfg = MoEConfig(num_experts=3, top_k=1, router="locmoe_plus")
    with pytest.raises(UserError) as info:
        LocMoEPlusRouter(cfg, 16, RouterSetup(seq_len=8, max_steps=1))
    msg = str(info.value)
    assert "model.hidden_size" in msg and "moe.num_experts" in msg
    assert "16" in msg and "3" in msg


def test_router_has_no_learned_weights():
    router = _router()
    assert list(router.parameters()) == []
    assert not hasattr(router, "weight")
    router = _router(learn_tau=True, tau=0.5)
    params = dict(router.named_parameters())
    assert list(params) == ["log_tau"]  # learned in log space: tau stays > 0
    assert float(params["log_tau"]) == pytest.approx(math.log(0.5))
    assert float(router.temperature()) == pytest.approx(0.5)


def test_tau_auto_is_one_over_sqrt_hidden_and_gives_unit_variance_logits():
    router = _router(num_experts=8, hidden=256, tau="auto")
    assert float(router.tau) == pytest.approx(1 / 16)
    x = torch.randn(20000, 256, generator=torch.Generator().manual_seed(0))
    logits = router(x).logits_TE
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)
    # tau = 1 leaves the gate within a few percent of 1/E on the same features.
    flat = _router(num_experts=8, hidden=256, tau=1.0)(x).probs_TE
    assert (flat - 1 / 8).abs().max().item() < 0.05
    assert torch.softmax(logits, -1).max(-1).values.mean().item() > 0.3
    with pytest.raises(UserError, match=r"moe.locmoe_plus.tau=-1.0 must be > 0, or auto"):
        cfg = MoEConfig(router="locmoe_plus", num_experts=4, top_k=1)
        cfg.locmoe_plus.tau = -1.0
        LocMoEPlusRouter.validate(cfg)


def test_a_learned_tau_from_an_old_checkpoint_loads_as_its_log():
    old = {"tau": torch.tensor(0.25)}  # the parameter's name before log tau
    router = _router(learn_tau=True, tau=1.0)
    router.load_state_dict(old)
    assert float(router.temperature()) == pytest.approx(0.25)


# ---- 3. TCR / ECR against a brute-force reference -------------------------------


def _brute_force(delta, probs, top_k, capacity, mode):
    """Plain-Python routing: lists of floats in, (map, gates) lists out."""
    T, E = len(delta), len(delta[0])
    # Token choice: each token's top-l experts by affinity (random data: no ties).
    choice = [sorted(range(E), key=lambda i: -delta[t][i])[:top_k] for t in range(T)]
    keep = [[False] * E for _ in range(T)]
    for i in range(E):
        if mode == "tcr":
            cands = [t for t in range(T) if i in choice[t]]
        elif mode == "tcr_ecr":
            cands = [t for t in range(T) if i in choice[t]]
            cands = sorted(cands, key=lambda t: (-delta[t][i], t))[:capacity]
        else:  # ecr: every token is a candidate
            cands = sorted(range(T), key=lambda t: (-delta[t][i], t))[:capacity]
        for t in cands:
            keep[t][i] = True
    gates = [[probs[t][i] if keep[t][i] else 0.0 for i in range(E)] for t in range(T)]
    return keep, gates


def _softmax_rows(delta, tau):
    out = []
    for row in delta:
        ex = [math.exp(v / tau) for v in row]
        out.append([v / sum(ex) for v in ex])
    return out


@pytest.mark.parametrize("mode", ["tcr_ecr", "tcr", "ecr"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_equals_brute_force(mode, top_k):
    T, D, E, S, tau = 24, 16, 4, 48, 0.5
    # C = ceil(factor0 * S * K / E) = 6, C_local = ceil(C * T / S) = 3.
    router = _router(num_experts=E, top_k=top_k, hidden=D, seq_len=S, mode=mode, tau=tau,
                     factor0=0.5 / top_k)
    router.train()
    assert router.controller.capacity == 6
    assert router.controller.local_capacity(T) == 3
    g = torch.Generator().manual_seed(100 + top_k)
    x = torch.randn(T, D, generator=g)
    x[:, :4] += 0.7  # crowd expert 0 so that its capacity binds
    out = router(x)
    assert isinstance(out, RoutingResult)

    delta = _cosine_reference(x, E).tolist()
    probs = _softmax_rows(delta, tau)
    keep, gates = _brute_force(delta, probs, top_k, 3, mode)
    assert torch.equal(out.routing_map_TE, torch.tensor(keep))
    torch.testing.assert_close(out.gates_TE.double(), torch.tensor(gates, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out.scores_TE.double(), torch.tensor(delta, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out.probs_TE.double(), torch.tensor(probs, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert out.gates_TE.dtype == torch.float32 and out.routing_map_TE.dtype == torch.bool
    counts = out.routing_map_TE.sum(0)
    if mode == "tcr":
        assert out.capacity is None
        assert out.requested_slots == T * top_k
        assert torch.equal(out.routing_map_TE.sum(1), torch.full((T,), top_k))
    elif mode == "tcr_ecr":
        assert out.capacity == 3
        assert out.requested_slots == T * top_k
        assert (counts <= 3).all()
        assert out.routing_map_TE.sum() < T * top_k  # the crowding made something drop
    else:
        assert out.capacity == 3
        assert out.requested_slots == 3 * E
        assert torch.equal(counts, torch.full((E,), 3))  # every expert fills up
        assert (~out.routing_map_TE.any(-1)).any()  # some token goes nowhere


def test_expert_choice_ranks_by_affinity_not_by_probability():
    # D = E = 4 (block 1): delta[t] = x[t] / |x[t]|.
    # t0: delta = [1, .98, 0, 0] / 1.4001 -> delta_0 = .714, prob_0 ~ .34 (tau 1)
    # t1: delta = [.5, -.5, -.5, -.5]     -> delta_0 = .5,   prob_0 ~ .48
    # Both choose expert 0; C_local = 1: the higher *affinity* (t0) stays.
    x = torch.tensor([[1.0, 0.98, 0.0, 0.0], [1.0, -1.0, -1.0, -1.0]])
    router = _router(num_experts=4, top_k=1, hidden=4, seq_len=2)  # C = ceil(1.1*2/4) = 1
    assert router.controller.local_capacity(2) == 1
    out = router(x)
    assert out.probs_TE[1, 0] > out.probs_TE[0, 0]  # probability would keep t1
    assert torch.equal(out.routing_map_TE, torch.tensor([[True, False, False, False],
                                                         [False, False, False, False]]))
    torch.testing.assert_close(out.gates_TE[0, 0], out.probs_TE[0, 0])
    assert torch.equal(out.gates_TE[1], torch.zeros(4))


def test_expert_choice_ties_go_to_the_earlier_token():
    # Tokens 1, 2, 3 are equal vectors for expert 2; token 0 prefers expert 0.
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 2.0, 1.0],
                      [0.0, 0.0, 2.0, 1.0],
                      [0.0, 0.0, 2.0, 1.0]])
    router = _router(num_experts=4, top_k=1, hidden=4, seq_len=8)  # C = 3, C_local = 2
    assert router.controller.local_capacity(4) == 2
    out = router(x)
    assert torch.equal(out.routing_map_TE, torch.tensor([[True, False, False, False],
                                                         [False, False, True, False],
                                                         [False, False, True, False],
                                                         [False, False, False, False]]))


def test_local_capacity_scales_with_tokens_on_the_rank():
    router = _router(num_experts=4, top_k=1, hidden=16, seq_len=40)  # C = 11
    c = router.controller
    assert c.capacity == 11
    assert c.local_capacity(40) == 11
    assert c.local_capacity(80) == 22  # two sequences
    assert c.local_capacity(20) == 6  # ceil(5.5)
    assert c.local_capacity(1) == 1
    c.capacity = 3  # a later, smaller C is what the router uses
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    assert router(x).capacity == 3


# ---- 4. evaluation: token choice only -------------------------------------------


@pytest.mark.parametrize("mode", ["tcr_ecr", "ecr"])
def test_eval_runs_token_choice_only_by_default(mode):
    T, D, E = 24, 16, 4
    router = _router(num_experts=E, top_k=1, hidden=D, seq_len=T, mode=mode, factor0=0.5)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    x[:, :4] += 0.7
    router.train()
    train_out = router(x)
    assert train_out.routing_map_TE.sum() < T  # training drops (tcr_ecr) / skips (ecr)
    router.eval()
    out = router(x)
    top1 = _cosine_reference(x, E).argmax(-1)
    assert torch.equal(out.routing_map_TE, F.one_hot(top1, E).bool())
    assert out.capacity is None
    assert out.requested_slots == T
    torch.testing.assert_close(out.gates_TE, out.probs_TE * out.routing_map_TE)


@pytest.mark.parametrize("mode", ["tcr_ecr", "ecr"])
def test_eval_applies_capacity_without_eval_token_choice(mode):
    T, D, E = 24, 16, 4
    router = _router(num_experts=E, top_k=1, hidden=D, seq_len=T, mode=mode, factor0=0.5,
                     eval_token_choice=False)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    x[:, :4] += 0.7
    router.train()
    train_out = router(x)
    router.eval()
    out = router(x)
    assert out.capacity == 3
    assert torch.equal(out.routing_map_TE, train_out.routing_map_TE)
    assert (out.routing_map_TE.sum(0) <= 3).all()
    assert out.routing_map_TE.sum() < T


def test_eval_forward_is_not_observed_by_the_controller():
    router = _router(hidden=16, seq_len=8)
    router.controller.cfg.warmup, router.controller.cfg.interval = 0, 1
    router.eval()
    router(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="observe"):
        router.controller.step_end(1)
    router.train()
    router(torch.randn(8, 16))
    router.controller.step_end(1)  # now there is something to estimate from


# ---- 5. gradients ---------------------------------------------------------------


def _reference_gates(x, keep_TE, E, tau):
    """Differentiable reference: softmax(cos(x, w_i) / tau) at the kept entries."""
    W = _gate_vectors(x.shape[1], E).to(x.dtype)
    delta = (x @ W.t()) / (x.norm(dim=-1, keepdim=True) * W.norm(dim=-1)[None, :])
    return torch.softmax(delta / tau, -1) * keep_TE


def test_gradient_flows_through_the_gate_into_x():
    T, D, E = 24, 16, 4
    router = _router(num_experts=E, top_k=1, hidden=D, seq_len=T, tau=0.5, factor0=0.5)
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(T, D, generator=g) + torch.tensor([0.7] * 4 + [0.0] * 12)).requires_grad_(True)
    w_TE = torch.randn(T, E, generator=g)
    out = router(x)
    assert not out.routing_map_TE.requires_grad  # the decision carries no gradient
    assert out.gates_TE.requires_grad and out.probs_TE.requires_grad
    (out.gates_TE * w_TE).sum().backward()  # no error through the routing decision
    assert torch.isfinite(x.grad).all()

    x_ref = x.detach().double().requires_grad_(True)
    ref = _reference_gates(x_ref, out.routing_map_TE, E, 0.5)
    (ref * w_TE.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-6)
    dropped = ~out.routing_map_TE.any(-1)
    assert dropped.any() and (~dropped).any()
    assert torch.equal(x.grad[dropped], torch.zeros(int(dropped.sum()), D))
    assert (x.grad[~dropped].abs().sum(-1) > 0).all()


def test_learnable_tau_gets_a_gradient():
    T, D, E = 12, 16, 4
    router = _router(num_experts=E, top_k=2, hidden=D, seq_len=T, tau=0.7, learn_tau=True)
    assert isinstance(router.log_tau, torch.nn.Parameter)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = router(x)
    loss = (out.gates_TE * torch.arange(1.0, E + 1)).sum()
    loss.backward()
    assert router.log_tau.grad is not None and torch.isfinite(router.log_tau.grad)
    log_tau_ref = torch.tensor(math.log(0.7), dtype=torch.float64, requires_grad=True)
    ref = _reference_gates(x.detach().double(), out.routing_map_TE, E, log_tau_ref.exp())
    (ref * torch.arange(1.0, E + 1, dtype=torch.float64)).sum().backward()
    assert float(router.log_tau.grad) == pytest.approx(float(log_tau_ref.grad), rel=1e-4,
                                                       abs=1e-7)
    assert abs(float(log_tau_ref.grad)) > 1e-4
    assert x.grad.abs().sum() > 0
    # A fixed tau is a buffer, not a parameter.
    fixed = _router(tau=0.7)
    assert "tau" in dict(fixed.named_buffers()) and not fixed.tau.requires_grad


# ---- 6. load-balancing loss -----------------------------------------------------


def test_load_balancing_loss_hand_computed():
    # D = E = 4: delta[t] = x[t] / |x[t]|; choices by hand:
    #   t0 [3, 0, 0, 4] / 5      -> top-1 e3, top-2 {3, 0}
    #   t1 [0, 2, .5, 0]         -> e1, {1, 2}
    #   t2 [1, .2, 1.5, -1]      -> e2, {2, 0}
    #   t3 [2, 0, 1, 2.5]        -> e3, {3, 0}
    x = torch.tensor([[3.0, 0.0, 0.0, 4.0],
                      [0.0, 2.0, 0.5, 0.0],
                      [1.0, 0.2, 1.5, -1.0],
                      [2.0, 0.0, 1.0, 2.5]])
    norms = [math.sqrt(sum(v * v for v in row)) for row in x.tolist()]
    delta = [[v / n for v in row] for row, n in zip(x.tolist(), norms)]
    tau = 0.5
    probs = _softmax_rows(delta, tau)
    P = [sum(p[i] for p in probs) / 4 for i in range(4)]
    for top_k, f in [(1, [0.0, 1 / 4, 1 / 4, 2 / 4]), (2, [3 / 8, 1 / 8, 2 / 8, 2 / 8])]:
        router = _router(num_experts=4, top_k=top_k, hidden=4, seq_len=4, tau=tau,
                         aux_loss_coeff=0.01, mode="tcr")
        out = router(x)
        assert torch.equal(out.routing_map_TE.sum(0).float() / (4 * top_k), torch.tensor(f))
        expected = 4 * sum(fi * pi for fi, pi in zip(f, P))
        assert set(out.aux) == {"load_balancing_loss"}
        assert float(out.aux["load_balancing_loss"]) == pytest.approx(expected, rel=1e-6)
        # The loss reaches the hidden states through P (the router has no weights).
        xg = x.clone().requires_grad_(True)
        router(xg).aux["load_balancing_loss"].backward()
        assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_load_balancing_loss_counts_choices_before_the_capacity_drop():
    T, D, E = 24, 16, 4
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    x[:, :4] += 0.7
    router = _router(num_experts=E, top_k=1, hidden=D, seq_len=T, factor0=0.5)
    out = router(x)
    assert out.routing_map_TE.sum() < T
    top1 = _cosine_reference(x, E).argmax(-1)
    f = torch.bincount(top1, minlength=E).double() / T
    expected = E * float((f * out.probs_TE.double().mean(0)).sum())
    assert float(out.aux["load_balancing_loss"]) == pytest.approx(expected, rel=1e-6)
    # No coefficient, no term.
    assert _router(aux_loss_coeff=0.0)(x).aux == {}


# ---- 7. locality loss -----------------------------------------------------------


def _kl_by_hand(d_c, d_l):
    return sum(c * math.log(c / l) for c, l in zip(d_c, d_l) if c > 0)


def test_locality_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                          [0.2, 0.4, 0.3, 0.1]])
    local = torch.tensor([True, True, False, False])
    eps = 0.1
    d_c = [0.45, 0.25, 0.2, 0.1]
    d_l = [0.9 / 2 + 0.1 / 4, 0.9 / 2 + 0.1 / 4, 0.1 / 4, 0.1 / 4]  # .475, .475, .025, .025
    assert sum(d_l) == pytest.approx(1.0)
    expected = (0.45 * math.log(0.45 / 0.475) + 0.25 * math.log(0.25 / 0.475)
                + 0.2 * math.log(0.2 / 0.025) + 0.1 * math.log(0.1 / 0.025))
    assert expected == pytest.approx(_kl_by_hand(d_c, d_l))
    got = locality_loss(probs, local, eps)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Local experts need not be the first ones: the same case with a permuted layout.
    perm = [2, 0, 3, 1]
    got_perm = locality_loss(probs[:, perm], local[perm], eps)
    assert float(got_perm) == pytest.approx(expected, rel=1e-6)
    # bf16 probabilities are computed in fp32.
    assert locality_loss(probs.to(torch.bfloat16), local, eps).dtype == torch.float32


def test_locality_loss_is_smallest_with_mass_on_local_experts():
    local = torch.tensor([True, True, False, False])
    eps = 0.1
    candidates = {
        "matches_D_l": [[0.475, 0.475, 0.025, 0.025]] * 2,
        "local_only": [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],
        "local_one_expert": [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
        "uniform": [[0.25] * 4] * 2,
        "remote_only": [[0.0, 0.0, 0.5, 0.5]] * 2,
        "mixed": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
    }
    losses = {k: float(locality_loss(torch.tensor(v), local, eps)) for k, v in candidates.items()}
    for k, v in losses.items():
        assert math.isfinite(v) and v >= -1e-7, (k, v)
    assert losses["matches_D_l"] == pytest.approx(0.0, abs=1e-6)  # KL(D_l || D_l) = 0
    assert min(losses, key=losses.get) == "matches_D_l"
    assert losses["local_only"] < losses["uniform"] < losses["remote_only"]
    assert losses["local_only"] < losses["mixed"] < losses["remote_only"]
    # By hand: all mass on the remote experts: 2 * .5 * log(.5 / .025) = log 20.
    assert losses["remote_only"] == pytest.approx(math.log(20.0), rel=1e-6)
    assert losses["local_only"] == pytest.approx(math.log(0.5 / 0.475), rel=1e-5)


def test_locality_loss_gradient_pushes_mass_to_local_experts():
    local = torch.tensor([True, True, False, False])
    probs = torch.full((2, 4), 0.25, requires_grad=True)
    locality_loss(probs, local, 0.1).backward()
    grad = probs.grad
    # d/dp KL = (log(D_c / D_l) + 1) / T: smaller on the local experts, so descent moves
    # probability there.
    for t in range(2):
        assert grad[t, :2].max() < grad[t, 2:].min()
    want_local = (math.log(0.25 / 0.475) + 1) / 2
    want_remote = (math.log(0.25 / 0.025) + 1) / 2
    torch.testing.assert_close(grad, torch.tensor([[want_local] * 2 + [want_remote] * 2] * 2))
    # Through a softmax: a few gradient steps on the logits raise the local mass.
    logits = torch.zeros(2, 4, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    losses, local_mass = [], []
    for _ in range(5):
        p = torch.softmax(logits, -1)
        loss = locality_loss(p, local, 0.1)
        losses.append(float(loss))
        local_mass.append(float(p[:, :2].sum() / 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert all(b > a for a, b in zip(local_mass, local_mass[1:]))


# ---- 8, 9. the MoE layer with the locmoe_plus router ----------------------------

LD, LF, LE, LS, LB = 32, 8, 4, 8, 2  # hidden, expert FFN, experts, seq, batch
LT = LS * LB


def _layer(extra=(), node_of_rank=None):
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.parallel.state import MoEParallel
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, ["moe.router=locmoe_plus", "moe.top_k=1", f"moe.num_experts={LE}",
                             f"model.hidden_size={LD}", "model.num_attention_heads=4",
                             f"data.seq_len={LS}", "moe.experts=loop", *extra])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    parallel = MoEParallel.single()
    if node_of_rank is not None:
        parallel.node_of_rank = node_of_rank
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe, ffn_hidden_size=LF,
                     parallel=parallel, setup=RouterSetup(seq_len=LS, max_steps=10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return cfg, layer


def _layer_input(seed):
    return torch.randn(LS, LB, LD, generator=torch.Generator().manual_seed(seed))


def _dense_reference(layer, x_TD, map_TE, gates_TE):
    w13, w2 = layer.experts.w13, layer.experts.w2
    out = torch.zeros_like(x_TD)
    for e in range(w13.shape[0]):
        h = x_TD @ w13[e]
        y = (F.silu(h[:, :LF]) * h[:, LF:]) @ w2[e]
        out = out + (gates_TE[:, e] * map_TE[:, e])[:, None] * y
    return out


def _reference_routing(x_TD, capacity):
    """Top-1 by cosine affinity; with a capacity, each expert keeps its best tokens."""
    delta = _cosine_reference(x_TD.detach(), LE)
    top1 = delta.argmax(-1)
    keep = F.one_hot(top1, LE).bool()
    if capacity is not None:
        for e in range(LE):
            members = [t for t in range(LT) if keep[t, e]]
            members.sort(key=lambda t: (-float(delta[t, e]), t))
            for t in members[capacity:]:
                keep[t, e] = False
    return keep


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_layer_matches_dense_reference_train_and_eval(megatron_reset, impl):
    # factor0 0.5: C = ceil(0.5 * 8 / 4) = 1 per sequence, 2 for the rank's 16 tokens.
    cfg, layer = _layer(["moe.capacity.factor0=0.5", "moe.locmoe_plus.tau=0.5",
                         f"moe.experts={impl}"])
    assert layer.experts.impl == impl
    assert layer.router.controller.capacity == 1
    x = _layer_input(1).requires_grad_(True)
    grad_out = torch.randn(LS, LB, LD, generator=torch.Generator().manual_seed(9))

    layer.train()
    out, bias = layer(x)
    assert bias is None and out.shape == (LS, LB, LD)
    x_TD = x.reshape(LT, LD)
    keep = _reference_routing(x_TD, capacity=2)
    assert keep.sum() == 2 * LE  # at most 8 of 16 tokens kept: drops happen
    x_ref = x.detach().clone().double().requires_grad_(True)
    gates = _reference_gates(x_ref.reshape(LT, LD), keep, LE, 0.5)
    with torch.no_grad():
        w13, w2 = layer.experts.w13.double(), layer.experts.w2.double()
    ref = torch.zeros(LT, LD, dtype=torch.float64)
    for e in range(LE):
        h = x_ref.reshape(LT, LD) @ w13[e]
        ref = ref + gates[:, e:e + 1] * ((F.silu(h[:, :LF]) * h[:, LF:]) @ w2[e])
    torch.testing.assert_close(out.reshape(LT, LD).double(), ref.detach(), rtol=1e-5, atol=1e-5)
    dropped = ~keep.any(-1)
    assert int(dropped.sum()) == LT - 2 * LE
    assert torch.equal(out.reshape(LT, LD)[dropped], torch.zeros(int(dropped.sum()), LD))
    assert (out.reshape(LT, LD)[~dropped].abs().sum(-1) > 0).all()
    # Gradient into x through the experts and the gate values.
    gx, = torch.autograd.grad(out, [x], grad_out)
    gx_ref, = torch.autograd.grad(ref, [x_ref], grad_out.reshape(LT, LD).double())
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-5)
    # The same against the router's own routing fed to the float32 dense reference.
    routing = layer.router(x_TD.detach())
    assert torch.equal(routing.routing_map_TE, keep)
    torch.testing.assert_close(out.reshape(LT, LD).detach(),
                               _dense_reference(layer, x_TD.detach(), routing.routing_map_TE,
                                                routing.gates_TE), rtol=1e-5, atol=1e-5)

    layer.eval()
    with torch.no_grad():
        out_eval, _ = layer(x.detach())
        keep_eval = _reference_routing(x_TD, capacity=None)
        ref_eval = _dense_reference(layer, x_TD.detach(), keep_eval,
                                    _reference_gates(x_TD.detach().double(), keep_eval,
                                                     LE, 0.5).float())
    torch.testing.assert_close(out_eval.reshape(LT, LD), ref_eval, rtol=1e-5, atol=1e-5)
    assert (out_eval.reshape(LT, LD).abs().sum(-1) > 0).all()  # no token dropped at eval
    # Eval agrees with training on the tokens training kept.
    kept = ~dropped
    torch.testing.assert_close(out_eval.reshape(LT, LD)[kept], out.reshape(LT, LD)[kept].detach(),
                               rtol=1e-5, atol=1e-5)


def test_layer_controller_observes_the_last_training_micro_batch(megatron_reset):
    # outsider_q: its q gauge is estimate_q's, which this test recomputes.
    cfg, layer = _layer(["moe.capacity.policy=controller", "moe.capacity.warmup=0",
                         "moe.capacity.interval=1", "moe.capacity.statistic=outsider_q"])
    controller = layer.router.controller
    assert (controller.cfg.warmup, controller.cfg.interval) == (0, 1)
    x1, x2, x3 = _layer_input(1), _layer_input(2), _layer_input(3)
    x2[..., 8:16] += 0.6  # expert 1 crowded: a different q from x1's
    layer.train()
    layer(x1)
    layer(x2)
    layer.eval()
    layer(x3)  # evaluation is not observed

    def q_of(x):
        aff = _cosine_reference(x.reshape(LT, LD), LE)
        return float(estimate_q(aff, aff.argmax(-1))[0].max())

    assert q_of(x1) != q_of(x2) and q_of(x3) != q_of(x2)
    event = controller.step_end(1)
    assert event is None or (isinstance(event, dict)
                             and {"step", "old", "new", "reason"} <= set(event))
    gauges = layer.router.gauges()
    assert {"capacity", "capacity_target", "capacity_estimate", "q", "c_min",
            "delta0"} <= set(gauges)
    assert gauges["q"] == pytest.approx(q_of(x2), abs=1e-6)
    assert math.isfinite(gauges["delta0"]) and math.isfinite(gauges["c_min"])
    assert 1 <= gauges["capacity"] <= controller.c0
    # The router's step_end drives the controller at estimation steps and keeps its events.
    layer.train()
    layer(x1)
    events = layer.router.step_end(torch.zeros(LE), step=2, loss=torch.tensor(3.0))
    assert len(events) in (0, 1)
    assert layer.router.gauges()["q"] == pytest.approx(q_of(x1), abs=1e-6)


def test_layer_locality_inactive_on_one_node(megatron_reset):
    cfg, layer = _layer(["moe.locality_loss_coeff=0.01", "moe.aux_loss_coeff=0.03"],
                        node_of_rank=[0])
    assert cfg.moe.locality_loss_coeff == 0.01
    assert "locality_loss" not in layer.stats.aux_names
    assert layer.local_experts.all()  # every expert is on this node
    layer.train()
    x = _layer_input(4).requires_grad_(True)  # the router has no weights: grad via x
    layer(x)
    routing = layer.router(x.reshape(LT, LD))
    assert set(routing.aux) == {"load_balancing_loss"}
    aux = layer.pop_aux_loss()
    torch.testing.assert_close(aux, 0.03 * routing.aux["load_balancing_loss"])
    assert aux.requires_grad
    assert not hasattr(layer.stats, "locality_loss")
    torch.testing.assert_close(layer.stats.load_balancing_loss,
                               routing.aux["load_balancing_loss"].detach())
    # Default (no node map) is the same single node.
    _, layer2 = _layer(["moe.locality_loss_coeff=0.01"])
    assert "locality_loss" not in layer2.stats.aux_names
