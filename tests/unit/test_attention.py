"""SDPA core attention equals megatron-core's DotProductAttention (outputs and grads)."""

import pytest
import torch

from locmoe_train.config import load_config


def _loss_and_grads(attention: str, groups: int | None):
    from locmoe_train.model.gpt import build_model, causal_mask
    from locmoe_train.parallel.state import destroy_parallel, init_parallel

    overrides = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                 "moe.num_experts=4", "data.seq_len=16", f"model.attention={attention}"]
    if groups:
        overrides.append(f"model.num_query_groups={groups}")
    cfg = load_config(None, overrides)
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    try:
        model = build_model(cfg, pctx, 100)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 100, (3, 16), generator=g)
        labels = torch.randint(0, 100, (3, 16), generator=g)
        pos = torch.arange(16)[None].expand(3, 16)
        loss = model(tokens, pos, causal_mask(16, "cpu"), labels=labels).float().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        cls = type(model.decoder.layers[0].self_attention.core_attention).__name__
        return loss.detach(), grads, cls
    finally:
        destroy_parallel()


@pytest.mark.parametrize("groups", [None, 2])
def test_sdpa_matches_megatron_core_attention(groups):
    loss_s, grads_s, cls_s = _loss_and_grads("sdpa", groups)
    loss_m, grads_m, cls_m = _loss_and_grads("megatron", groups)
    assert (cls_s, cls_m) == ("SDPAttention", "DotProductAttention")
    # Same math, different summation order: fp32 rounding only.
    torch.testing.assert_close(loss_s, loss_m, rtol=1e-6, atol=1e-6)
    assert grads_s.keys() == grads_m.keys() and len(grads_s) > 10
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_m[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_attention_key_is_checked():
    from locmoe_train.errors import UserError

    with pytest.raises(UserError, match=r"^model.attention='flash' is not one of 'sdpa', 'megatron'.$"):
        load_config(None, ["model.attention=flash"])
