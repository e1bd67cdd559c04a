"""``train.recompute`` at world 1: gradients, metrics and router state equal no recompute.

Each case trains 3 steps of 2 micro-batches with dropout on, once without
recompute and once with it (``recompute_runs.train_steps``), and requires the
same gradients, losses and parameters (to fp32 rounding) and exactly the same
MoE counters, aux terms, capacity controller state and events, aux-free bias
and step-end counts: the router runs twice per layer under ``full``, and what
it counts must be counted once.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from recompute_runs import BASE, assert_same_run, train_steps

ROUTERS = {
    # Capacity drops (factor 1.0 of top-2 over 4 experts) and a z-loss.
    "topk": ["moe.router=topk", "moe.capacity_factor=1.0"],
    # Token then expert choice with a binding capacity the controller re-estimates
    # after every step.
    "locmoe_plus": ["moe.router=locmoe_plus", "moe.capacity.factor0=0.6",
                    "moe.capacity.warmup=1", "moe.capacity.interval=1"],
    # The bias update sees each step's tokens per expert.
    "aux_free": ["moe.router=aux_free", "moe.bias_update_rate=0.01"],
    "expert_choice": ["moe.router=expert_choice"],
    # Reads the token ids, which are out of scope by the time backward recomputes.
    "hash": ["moe.router=hash", "moe.top_k=1"],
}

_baselines: dict[str, dict] = {}


def _baseline(router: str) -> dict:
    if router not in _baselines:
        _baselines[router] = train_steps(ROUTERS[router], "none")
    return _baselines[router]


@pytest.mark.parametrize("router, mode", [
    ("topk", "selective"), ("topk", "full"), ("locmoe_plus", "selective"),
    ("locmoe_plus", "full"), ("aux_free", "full"), ("expert_choice", "full"),
    ("hash", "full")])
def test_recompute_matches_no_recompute(megatron_reset, router, mode):
    ref = _baseline(router)
    out = train_steps(ROUTERS[router], mode)
    assert_same_run(ref, out)
    # Each token was counted once: 3 steps x 4 sequences x 16 tokens per layer.
    tokens_seen = sum(m["moe/tokens_seen"] for m in out["metrics"])
    assert torch.equal(tokens_seen, torch.full_like(tokens_seen, 3 * 4 * 16))
    if router == "locmoe_plus":  # one observation per micro-batch and MoE layer
        assert out["observe_calls"] == 3 * 2 * 2
    if router == "aux_free":  # dropless top-2: the bias update saw 4 x 16 x 2 slots a step
        assert [int(c.sum()) for c in out["step_end_counts"]] == [128] * 6


def test_attention_dropout_needs_the_tracker_replay(megatron_reset, monkeypatch):
    """Attention dropout draws from megatron's RNG tracker, which the first forward moved on:
    if the recompute did not put its states back, the dropout mask and the gradients would
    differ. (So the comparison above does test the replay.)"""
    from locmoe_train.model import recompute

    monkeypatch.setattr(recompute._Region, "recompute",
                        contextlib.contextmanager(lambda self: (yield)))
    ref = _baseline("topk")
    out = train_steps(ROUTERS["topk"], "selective", steps=1)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.allclose(out["grads"][name], ref["grads"][name], rtol=1e-3, atol=1e-5)


def test_modes_pick_their_modules(megatron_reset):
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import build_model
    from locmoe_train.parallel.state import init_parallel

    kinds = {}
    for mode in ("none", "selective", "full"):
        cfg = load_config(None, BASE + [f"train.recompute={mode}", "model.moe_every=2"])
        pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
        model = build_model(cfg, pctx, 128)
        kinds[mode] = sorted(type(m).__name__ for m in model.modules()
                             if type(m).__name__.startswith("Recomputed"))
        from locmoe_train.parallel.state import destroy_parallel

        destroy_parallel()
    assert kinds["none"] == []
    # Core attention in both layers, the experts of the one MoE layer (layer 1 is dense).
    assert kinds["selective"] == ["RecomputedSDPAttention", "RecomputedSDPAttention",
                                  "RecomputedSwiGLUExperts"]
    assert kinds["full"] == ["RecomputedTransformerLayer"] * 2


def test_recompute_needs_native_moe():
    from locmoe_train.config import load_config
    from locmoe_train.errors import UserError

    with pytest.raises(UserError, match=r"train.recompute=full needs moe.impl=native"):
        load_config(None, ["train.recompute=full", "moe.impl=megatron"])
    with pytest.raises(UserError, match="train.recompute"):
        load_config(None, ["train.recompute=partial"])
