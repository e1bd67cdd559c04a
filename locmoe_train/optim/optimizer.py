"""AdamW with decoupled weight decay and the param groups we train with.

No weight decay on 1-D parameters (norm weights; the model has no biases):
decaying a norm's gain towards zero fights the normalisation. Nor on a
parameter tagged ``no_weight_decay`` (the routers' locality node bias). Fused AdamW is
used on CUDA when available (torch >= 2.0), foreach elsewhere.
"""

from __future__ import annotations

import torch

from locmoe_train.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps, fused=True if on_cuda else None)
