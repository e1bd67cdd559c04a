"""MoELayer (router -> dispatcher -> experts -> combine) against a dense reference.

Legend: s sequence, b batch, T = s*b tokens, D hidden, F expert FFN width,
E experts.

The dense reference runs every expert on every token with plain matmuls and
sums ``gate[t, e] * y_e(t)`` over the (token, expert) pairs of the routing
map, so it shares nothing with the dispatcher's permutation, padding or the
grouped GEMM. Its routing comes from calling ``layer.router`` on the same
flattened input, so gradients through the gates are compared too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from locmoe_train.moe.experts import SwiGLUExperts

D, FFN, E = 8, 4, 4  # multiples of 4 keep grouped_mm's 16-byte strides in fp32
S, B = 4, 3
T = S * B


def _build(overrides, vocab_size=1, weight_seed=0):
    """One process, TP=EP=1: a MoELayer with larger-than-init random weights."""
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.moe.routers import RouterSetup
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, [f"moe.num_experts={E}", f"model.hidden_size={D}",
                             "model.num_attention_heads=2", f"moe.ffn_hidden_size={FFN}",
                             "moe.experts=loop", *overrides])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    config = transformer_config(cfg, pctx, torch.float32)

    def make(moe_cfg):
        layer = MoELayer(config, moe_cfg, ffn_hidden_size=FFN,
                         setup=RouterSetup(vocab_size=vocab_size))
        g = torch.Generator().manual_seed(weight_seed)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return layer

    return cfg, make


def _layer(overrides, **kw):
    cfg, make = _build(overrides, **kw)
    return cfg, make(cfg.moe)


def _input(seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, D, generator=g).requires_grad_(requires_grad)


def _token_ids_T(ids_bs):
    """Token t of the flattened [s*b] input is (s_idx, b_idx) = divmod(t, b)."""
    b = ids_bs.shape[0]
    return torch.tensor([int(ids_bs[t % b, t // b]) for t in range(ids_bs.numel())])


def dense_reference(layer, x_TD, routing):
    w13, w2 = layer.experts.w13, layer.experts.w2
    ffn = w2.shape[1]
    gates_TE = routing.gates_TE * routing.routing_map_TE
    out = torch.zeros_like(x_TD)
    for e in range(w13.shape[0]):
        h = x_TD @ w13[e]
        act = F.silu(h[:, :ffn]) * h[:, ffn:]
        y = act @ w2[e]
        out = out + gates_TE[:, e:e + 1] * y
    return out


def _routing(layer, x_sbD, token_ids_T=None):
    return layer.router(x_sbD.reshape(-1, x_sbD.shape[-1]), token_ids_T)


TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "topk_dropless": ["moe.top_k=2"],
    "topk_renormalize": ["moe.top_k=2", "moe.renormalize=true"],
    "topk_capacity_probs": ["moe.top_k=2", "moe.capacity_factor=0.5"],
    "topk_capacity_position": ["moe.top_k=2", "moe.capacity_factor=0.5",
                               "moe.drop_policy=position"],
    "topk_pad_to_capacity": ["moe.top_k=2", "moe.capacity_factor=0.75",
                             "moe.pad_to_capacity=true"],
    "topk_pad_capacity_above_tokens": ["moe.top_k=2", "moe.capacity_factor=3.0",
                                       "moe.pad_to_capacity=true"],
    "expert_choice": ["moe.router=expert_choice", "moe.top_k=1"],
    "aux_free": ["moe.router=aux_free", "moe.top_k=2"],
}


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_dense_reference(megatron_reset, case, impl):
    cfg, layer = _layer([*CASES[case], f"moe.experts={impl}"])
    assert layer.experts.impl == impl
    if case == "aux_free":  # a non-zero bias must change the routing, not break it
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.1]))
    x = _input()
    out, bias = layer(x)
    assert bias is None
    assert out.shape == (S, B, D) and out.dtype == torch.float32
    routing = _routing(layer, x)
    map_TE = routing.routing_map_TE
    if "capacity" in case and "above" not in case:
        assert map_TE.sum() < T * cfg.moe.top_k  # something was dropped
        assert (map_TE.sum(0) <= routing.capacity).all()
    if case == "expert_choice":
        assert torch.equal(map_TE.sum(0), torch.full((E,), 3))  # C = ceil(12 / 4)
    ref = dense_reference(layer, x.reshape(T, D), routing)
    torch.testing.assert_close(out.reshape(T, D), ref, **TOL)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_layer_hash_router_uses_token_ids_in_b_s_layout(megatron_reset, impl):
    from locmoe_train.moe.layer import token_ids_scope

    vocab = 11
    cfg, layer = _layer(["moe.router=hash", "moe.top_k=1", f"moe.experts={impl}"],
                        vocab_size=vocab)
    g = torch.Generator().manual_seed(5)
    ids_bs = torch.randint(0, vocab, (B, S), generator=g)
    ids_bs[0, 0] = ids_bs[2, 3] = 7  # one id at two (b, s) places
    x = _input()
    with token_ids_scope(ids_bs):
        out, _ = layer(x)
    token_ids_T = _token_ids_T(ids_bs)
    routing = _routing(layer, x, token_ids_T)
    expert_T = routing.routing_map_TE.float().argmax(-1)
    assert torch.equal(expert_T, layer.router.table[token_ids_T])
    # (s=0, b=0) is token 0 and (s=3, b=2) is token 3*B + 2; both carry id 7.
    assert expert_T[0] == expert_T[3 * B + 2] == layer.router.table[7]
    ref = dense_reference(layer, x.reshape(T, D), routing)
    torch.testing.assert_close(out.reshape(T, D), ref, **TOL)
    # Without token ids the hash router refuses to guess.
    with pytest.raises(RuntimeError, match="token ids"):
        layer(x)


# Both expert implementations, with and without padding to capacity.
EXPERT_PATHS = [["moe.experts=loop"], ["moe.experts=grouped"],
                ["moe.experts=loop", "moe.pad_to_capacity=true"],
                ["moe.experts=grouped", "moe.pad_to_capacity=true"]]
EXPERT_PATH_IDS = ["loop", "grouped", "loop_pad", "grouped_pad"]


@pytest.mark.parametrize("overrides", EXPERT_PATHS, ids=EXPERT_PATH_IDS)
def test_layer_gradients_match_dense_reference_with_drops(megatron_reset, overrides):
    cfg, layer = _layer(["moe.top_k=2", "moe.capacity_factor=0.5", *overrides])
    x = _input(requires_grad=True)
    params = [layer.router.weight, layer.experts.w13, layer.experts.w2]
    grad_out = torch.randn(S, B, D, generator=torch.Generator().manual_seed(9))

    out, _ = layer(x)
    grads = torch.autograd.grad(out, [x, *params], grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    routing = _routing(layer, x_ref)
    assert routing.routing_map_TE.sum() < T * 2  # some dropped slots
    ref = dense_reference(layer, x_ref.reshape(T, D), routing)
    ref_grads = torch.autograd.grad(ref, [x_ref, *params], grad_out.reshape(T, D))

    torch.testing.assert_close(out.reshape(T, D), ref.detach(), **TOL)
    for name, got, want in zip(["input", "router.weight", "w13", "w2"], grads, ref_grads):
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("overrides", [
    ["moe.capacity_factor=0.5"],
    ["moe.capacity_factor=0.5", "moe.pad_to_capacity=true"],
    ["moe.capacity_factor=0.5", "moe.experts=grouped"],
], ids=["loop", "pad", "grouped"])
def test_dropped_tokens_give_exact_zero_rows(megatron_reset, overrides):
    # K=1: a dropped token has no expert left.
    cfg, layer = _layer(["moe.top_k=1", *overrides])
    x = _input()
    out, _ = layer(x)
    routing = _routing(layer, x)
    dropped_T = ~routing.routing_map_TE.any(-1)
    assert 0 < int(dropped_T.sum()) < T
    out_TD = out.reshape(T, D)
    assert torch.equal(out_TD[dropped_T], torch.zeros(int(dropped_T.sum()), D))
    assert (out_TD[~dropped_T].abs().sum(-1) > 0).all()


def _constant_feature_input(value=3.0):
    """Random input whose feature 0 is a constant, so router column 0 steers every token."""
    x = _input()
    x[..., 0] = value
    return x


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_expert_without_tokens_gets_zero_gradient(megatron_reset, impl):
    cfg, layer = _layer(["moe.top_k=2", f"moe.experts={impl}"])
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[3, 0] = -10.0  # expert 3's logit is about -30 for every token
    x = _constant_feature_input().requires_grad_(True)
    out, _ = layer(x)
    routing = _routing(layer, x)
    assert routing.routing_map_TE[:, 3].sum() == 0
    assert routing.routing_map_TE[:, :3].sum() == T * 2
    torch.testing.assert_close(out.reshape(T, D), dense_reference(layer, x.reshape(T, D), routing),
                               **TOL)
    grad_out = torch.randn(S, B, D, generator=torch.Generator().manual_seed(2))
    out.backward(grad_out)
    w13_grad, w2_grad = layer.experts.w13.grad, layer.experts.w2.grad
    assert torch.equal(w13_grad[3], torch.zeros(D, 2 * FFN))
    assert torch.equal(w2_grad[3], torch.zeros(FFN, D))
    for e in range(3):
        assert w13_grad[e].abs().sum() > 0 and w2_grad[e].abs().sum() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides", EXPERT_PATHS, ids=EXPERT_PATH_IDS)
def test_all_tokens_dropped_but_one(megatron_reset, overrides):
    # K=1, factor 0.25 -> C = ceil(0.25 * 12 / 4) = 1, and every token wants expert 0.
    cfg, layer = _layer(["moe.top_k=1", "moe.capacity_factor=0.25", *overrides])
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 10.0
    x = _constant_feature_input().requires_grad_(True)
    out, _ = layer(x)
    routing = _routing(layer, x)
    assert routing.capacity == 1
    assert int(routing.routing_map_TE.sum()) == 1 and int(routing.routing_map_TE[:, 0].sum()) == 1
    kept_t = int(routing.routing_map_TE[:, 0].float().argmax())
    # policy probs: the kept token is the one with the highest expert-0 probability.
    probs = torch.softmax(routing.scores_TE, -1)[:, 0]
    assert kept_t == int(probs.argmax())
    out_TD = out.reshape(T, D)
    others = torch.arange(T) != kept_t
    assert torch.equal(out_TD[others], torch.zeros(T - 1, D))
    ref = dense_reference(layer, x.reshape(T, D), routing)
    torch.testing.assert_close(out_TD, ref, **TOL)
    grad_out = torch.randn(S, B, D, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, [x, layer.experts.w13, layer.experts.w2], grad_out)
    want = torch.autograd.grad(ref, [x, layer.experts.w13, layer.experts.w2],
                               grad_out.reshape(T, D))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.equal(got[1][1:], torch.zeros(E - 1, D, 2 * FFN))  # experts 1..3 idle


def test_grouped_experts_equal_loop_experts_with_empty_expert():
    torch.manual_seed(0)
    loop = SwiGLUExperts(E, D, FFN, impl="loop")
    grouped = SwiGLUExperts(E, D, FFN, impl="grouped")
    assert grouped.impl == "grouped"
    grouped.load_state_dict(loop.state_dict())
    counts = torch.tensor([3, 0, 5, 2])  # expert 1 gets no rows
    x = torch.randn(10, D)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_loop, y_grouped = loop(x1, counts), grouped(x2, counts)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-6, atol=1e-6)
    # The loop is the plain per-expert SwiGLU.
    rows = x[5:8] @ loop.w13[2]
    torch.testing.assert_close(y_loop[3:8][2:5],
                               (F.silu(rows[:, :FFN]) * rows[:, FFN:]) @ loop.w2[2])
    g = torch.randn(10, D)
    y_loop.backward(g)
    y_grouped.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped.w13.grad, loop.w13.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped.w2.grad, loop.w2.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(grouped.w13.grad[1], torch.zeros(D, 2 * FFN))
    assert torch.equal(loop.w2.grad[1], torch.zeros(FFN, D))


@pytest.mark.parametrize("overrides", [
    ["moe.top_k=2"],
    ["moe.top_k=2", "moe.capacity_factor=0.5"],
    ["moe.top_k=2", "moe.capacity_factor=0.75", "moe.pad_to_capacity=true"],
    ["moe.router=expert_choice", "moe.top_k=1"],
], ids=["dropless", "capacity", "pad", "expert_choice"])
def test_layer_grouped_equals_loop(megatron_reset, overrides):
    cfg, make = _build(overrides)
    loop = make(dataclasses.replace(cfg.moe, experts="loop"))
    grouped = make(dataclasses.replace(cfg.moe, experts="grouped"))
    assert (loop.experts.impl, grouped.experts.impl) == ("loop", "grouped")
    with torch.no_grad():  # expert 3 gets no token in the top-k cases
        for layer in (loop, grouped):
            layer.router.weight[:, 0] = 0.0
            layer.router.weight[3, 0] = -10.0
    x = _constant_feature_input()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_loop, _ = loop(x1)
    out_grouped, _ = grouped(x2)
    if cfg.moe.router == "topk":
        assert _routing(loop, x).routing_map_TE[:, 3].sum() == 0
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-6, atol=1e-6)
    g = torch.randn(S, B, D, generator=torch.Generator().manual_seed(3))
    out_loop.backward(g)
    out_grouped.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    for (name, p_loop), p_grouped in zip(loop.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(p_grouped.grad, p_loop.grad, rtol=1e-6, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_layer_stats_and_aux_loss(megatron_reset):
    cfg, layer = _layer(["moe.top_k=1", "moe.capacity_factor=0.5", "moe.aux_loss_coeff=0.01",
                         "moe.z_loss_coeff=0.001"])
    layer.train()
    x = _input()
    out, _ = layer(x)
    routing = _routing(layer, x)
    map_TE = routing.routing_map_TE
    unrouted = int((~map_TE.any(-1)).sum())
    assert unrouted > 0
    torch.testing.assert_close(layer.stats.tokens_per_expert, map_TE.sum(0).float(), rtol=0, atol=0)
    torch.testing.assert_close(layer.stats.step_tokens_per_expert, map_TE.sum(0).float(),
                               rtol=0, atol=0)
    assert layer.stats.tokens_seen.item() == T
    assert layer.stats.requested_slots.item() == T * 1
    assert layer.stats.unrouted.item() == unrouted
    lb = routing.aux["load_balancing_loss"]
    z = routing.aux["z_loss"]
    torch.testing.assert_close(z, torch.logsumexp(routing.scores_TE, -1).pow(2).mean())
    torch.testing.assert_close(layer.stats.load_balancing_loss, lb.detach())
    torch.testing.assert_close(layer.stats.z_loss, z.detach())

    aux = layer.pop_aux_loss()
    torch.testing.assert_close(aux, 0.01 * lb + 0.001 * z)
    assert aux.requires_grad
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.pop_aux_loss() is None

    # A second training forward accumulates.
    layer(x)
    torch.testing.assert_close(layer.stats.tokens_per_expert, 2 * map_TE.sum(0).float())
    assert layer.stats.tokens_seen.item() == 2 * T
    assert layer.stats.unrouted.item() == 2 * unrouted
    assert layer.pop_aux_loss() is not None

    # Eval: nothing recorded, no aux loss.
    before = {n: b.clone() for n, b in layer.named_buffers()}
    layer.eval()
    out_eval, _ = layer(x)
    torch.testing.assert_close(out_eval, out.detach())
    assert layer.pop_aux_loss() is None
    for n, b in layer.named_buffers():
        assert torch.equal(b, before[n]), n


def test_layer_aux_loss_load_balancing_only(megatron_reset):
    cfg, layer = _layer(["moe.top_k=2", "moe.aux_loss_coeff=0.1"])
    x = _input()
    layer(x)
    routing = _routing(layer, x)
    assert set(routing.aux) == {"load_balancing_loss"}
    torch.testing.assert_close(layer.pop_aux_loss(), 0.1 * routing.aux["load_balancing_loss"])
    assert "z_loss" not in layer.stats.aux_names  # weight 0: never computed
    assert layer.stats.requested_slots.item() == T * 2


def test_layer_without_aux_terms_has_no_aux_loss(megatron_reset):
    cfg, layer = _layer(["moe.router=expert_choice", "moe.top_k=1", "moe.aux_loss_coeff=0.0"])
    x = _input()
    layer(x)
    assert layer.pop_aux_loss() is None
    routing = _routing(layer, x)
    assert layer.stats.unrouted.item() == int((~routing.routing_map_TE.any(-1)).sum())
    assert layer.stats.requested_slots.item() == routing.requested_slots == 3 * E


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("mode", ["tcr_ecr", "ecr"])
def test_locmoe_plus_padded_equals_dropless_layout(megatron_reset, mode, impl):
    """LocMoE+ with pad_to_capacity: every expert gets exactly C rows (static
    shapes); outputs and all gradients equal the variable layout and the dense
    reference, in training (capacity binds) and at evaluation (token choice,
    no capacity: the padded dispatcher falls back to the variable layout)."""
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.moe.routers import RouterSetup
    from locmoe_train.parallel.state import init_parallel

    base = [f"moe.num_experts={E}", f"model.hidden_size={D}", "model.num_attention_heads=2",
            f"moe.ffn_hidden_size={FFN}", f"moe.experts={impl}", "moe.router=locmoe_plus",
            "moe.top_k=1", f"moe.locmoe_plus.mode={mode}", "moe.capacity.factor0=0.5"]
    cfgs = [load_config(None, base + [f"moe.pad_to_capacity={p}"]) for p in ("false", "true")]
    pctx = init_parallel(cfgs[0].parallel, cfgs[0].expert_tp, "cpu", 0)
    config = transformer_config(cfgs[0], pctx, torch.float32)
    layers = []
    for cfg in cfgs:
        # seq_len S: C0 = ceil(0.5 * 4 * 1 / 4) = 1 per sequence, 3 per expert for 3 sequences.
        layer = MoELayer(config, cfg.moe, ffn_hidden_size=FFN, setup=RouterSetup(seq_len=S))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        layers.append(layer)
    dropless, padded = layers
    for training in (True, False):
        outs, grads = [], []
        for layer in layers:
            layer.train(training)
            x = _input(requires_grad=True)
            out, _ = layer(x)
            out.pow(2).sum().backward()
            outs.append(out)
            grads.append([x.grad] + [p.grad.clone() for p in layer.parameters()])
            layer.zero_grad()
        routing = _routing(padded, x)
        if training:
            assert routing.capacity == 3
            counts = routing.routing_map_TE.sum(0)
            if mode == "tcr_ecr":  # some experts over C (drops), some under (padding rows)
                assert (counts <= 3).all() and counts.sum() < 3 * E
            else:  # expert choice over all tokens fills every expert's C slots
                assert torch.equal(counts, torch.full((E,), 3))
        else:
            assert routing.capacity is None and routing.routing_map_TE.sum() == T
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, **TOL)
        ref = dense_reference(padded, x.detach().reshape(T, D), routing)
        torch.testing.assert_close(outs[1].detach().reshape(T, D), ref, **TOL)
