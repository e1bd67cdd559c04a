"""Model pieces: layout-independent init, sharding helpers, RMSNorm, LR schedule, compat."""

import math

import numpy as np
import pytest
import torch

from locmoe_train.config import load_config
from locmoe_train.model.init import count_parameters
from locmoe_train.parallel.sharding import ShardInfo, take_shard
from locmoe_train.optim.schedule import lr_at


def test_take_shard_contiguous_and_glu():
    full = torch.arange(8 * 3).view(8, 3)
    info = ShardInfo("w", (8, 3), 0, 1, 2, glu=False, expert=False)
    assert torch.equal(take_shard(full, info), full[4:])
    # SwiGLU fc1: rows 0-3 are the gate, 4-7 the up projection; rank 1 of 2
    # holds gate rows 2-3 followed by up rows 6-7 (megatron's local chunk order).
    glu = ShardInfo("w", (8, 3), 0, 1, 2, glu=True, expert=False)
    assert torch.equal(take_shard(full, glu), full[[2, 3, 6, 7]])
    row = ShardInfo("w", (8, 3), None, 0, 1, glu=False, expert=False)
    assert take_shard(full, row) is full


def test_lr_schedule():
    cfg = load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10",
                             "train.max_steps=110"])
    o = cfg.optim
    assert lr_at(1, o, 110) == pytest.approx(0.1)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos = 0
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    o.schedule = "linear"
    assert lr_at(35, o, 110) == pytest.approx(0.1 + 0.9 * 0.75)
    o.schedule = "constant"
    assert lr_at(100, o, 110) == 1.0


def _build(megatron_reset, overrides):
    from locmoe_train.model.gpt import build_model
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "moe.num_experts=4",
                             "data.seq_len=16", *overrides])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    return cfg, pctx, build_model(cfg, pctx, 100)


@pytest.mark.parametrize("impl", ["locmoe", "megatron"])
def test_model_forward_init_and_counts(megatron_reset, impl):
    from locmoe_train.model.gpt import causal_mask

    cfg, pctx, model = _build(megatron_reset, ["model.moe_every=2", f"moe.impl={impl}"])
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    # Layer 0 is MoE, layer 1 dense (megatron's moe_layer_freq convention).
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names
    if impl == "megatron":
        assert any(n.startswith("decoder.layers.0.mlp.experts.local_experts.3.") for n in names)
        e0 = params["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
        e1 = params["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
    else:
        w13 = params["decoder.layers.0.mlp.experts.w13"]
        assert w13.shape == (4, 64, 2 * cfg.moe_ffn_hidden_size)
        assert params["decoder.layers.0.mlp.experts.w2"].std().item() == pytest.approx(
            0.02 / math.sqrt(4), rel=0.1)
        e0, e1 = w13[0], w13[1]
    assert torch.all(params["decoder.layers.0.input_layernorm.weight"] == 1)
    qkv = params["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.std().item() == pytest.approx(0.02, rel=0.1)
    proj = params["decoder.layers.0.self_attention.linear_proj.weight"]
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert not torch.equal(e0, e1)  # experts are initialised independently
    counts = count_parameters(model, cfg, pctx)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active"] == counts["total"] - counts["expert"] // 2  # top-2 of 4 experts
    tokens = torch.randint(0, 100, (2, 17))
    loss = model(tokens[:, :-1], torch.arange(16)[None].expand(2, -1), causal_mask(16, "cpu"),
                 labels=tokens[:, 1:])
    assert loss.shape == (2, 16)
    # Near-uniform predictions at init over the padded vocabulary (128 rows).
    assert loss.mean().item() == pytest.approx(math.log(128), abs=0.3)


def test_rmsnorm_reference():
    from types import SimpleNamespace

    from locmoe_train.model.norm import RMSNorm

    norm = RMSNorm(SimpleNamespace(sequence_parallel=True), 8, eps=1e-6)
    assert norm.weight.sequence_parallel is True
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def test_compat_patches():
    from megatron.core.transformer.moe import moe_utils

    from locmoe_train.parallel import compat

    compat.apply()
    assert hasattr(moe_utils, "te_general_gemm")
    assert compat._as_split_list(np.array([3, 0, 2])) == [3, 0, 2]
    assert compat._as_split_list(torch.tensor([1, 4])) == [1, 4]
    assert compat._as_split_list(None) is None
    if not torch.cuda.is_available():
        assert torch.cuda.current_device() == torch.device("cpu")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())


def test_single_process_init_leaves_no_launcher_variables(megatron_reset, monkeypatch):
    """In-process use (tests, notebooks) must not leave MASTER_ADDR/PORT behind: a
    process started later would inherit a port that is still bound."""
    import os

    import torch.distributed as dist

    from locmoe_train.parallel.state import init_parallel

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(None, [])
    init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    t = torch.ones(3)
    dist.all_reduce(t)
    assert torch.equal(t, torch.ones(3))
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ
