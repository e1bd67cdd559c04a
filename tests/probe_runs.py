"""A tiny LocMoE+ model trained with real train steps, for the loss probe's tests
(importable as ``probe_runs``; used by tests/unit and tests/distributed).

``build`` makes the model, MoE runtime and ``TrainStep`` as the trainer does
(2 layers, hidden 64, E = 4, top-1, s = 32, b = 8, the loss probe on);
``train`` runs steps on ``successor_batch`` data, where each token fixes the
next, so the experts learn something in a few steps and dropping tokens costs.
"""

from __future__ import annotations

import torch

from locmoe_train.config import load_config

S, B, V = 32, 8, 64
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        f"model.vocab_size={V}", "moe.num_experts=4", "moe.top_k=1", f"data.seq_len={S}",
        f"train.global_batch_size={B}", f"train.micro_batch_size={B}", "optim.warmup_steps=1",
        "optim.lr=5e-3", "moe.router=locmoe_plus", "moe.capacity.estimator=loss_probe"]


def successor_batch(g: torch.Generator) -> torch.Tensor:
    """[b, s+1] sequences where each token fixes the next: learnable in a few steps."""
    start = torch.randint(0, V, (B, 1), generator=g)
    return (start * 5 + torch.arange(S + 1) * 7) % V


def build(overrides: list[str]):
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import init_parallel
    from locmoe_train.train import resolve_precision
    from locmoe_train.train_step import TrainStep

    cfg = load_config(None, BASE + overrides)
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    _, dtype = resolve_precision(cfg, pctx)
    model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
    moe = build_runtime(model, cfg, pctx)
    step_fn = TrainStep(model, build_optimizer(model, cfg.optim), cfg, pctx, dtype, moe=moe)
    return model, moe, step_fn


def train(step_fn, steps, g, first=1, before_step=None):
    metrics = []
    for step in range(first, first + steps):
        if before_step is not None:
            before_step(step)
        metrics.append(step_fn([successor_batch(g)], step))
    return metrics


def named_tensors(model):
    return [(k, v.clone()) for k, v in model.state_dict().items() if torch.is_tensor(v)]


def controllers(moe):
    return [m.router.controller for m in moe.modules]
