"""Layout-independent parameter initialisation.

Each parameter's full value (under its canonical name, see
``parallel/sharding.py``) is drawn from a generator seeded by
``(train.seed, canonical name)`` and this rank keeps its shard. So the same
seed gives the same model at any TP / EP / ETP layout. A parameter tagged
``keep_init`` keeps the value its module gave it (LocMoE+'s learned log tau,
the routers' locality node bias: constants, so layout-independent too).
"""

from __future__ import annotations

import math
import zlib

import torch

from locmoe_train.config import TrainConfig
from locmoe_train.parallel.sharding import shard_info, tag_tensor_parallel, take_shard
from locmoe_train.parallel.state import ParallelContext


def _std(name: str, cfg: TrainConfig) -> float:
    # Output projections of residual branches are scaled down with depth (GPT-2 / Megatron).
    if name.endswith(("linear_proj.weight", "linear_fc2.weight", ".experts.w2")):
        return cfg.model.init_std / math.sqrt(2.0 * cfg.model.num_layers)
    return cfg.model.init_std


@torch.no_grad()
def init_parameters(model: torch.nn.Module, cfg: TrainConfig, pctx: ParallelContext) -> None:
    tag_tensor_parallel(model)
    for name, param in model.named_parameters():
        if getattr(param, "keep_init", False):
            continue
        info = shard_info(name, param, cfg, pctx)
        if param.dim() == 1:  # norm weights (the model has no biases)
            param.fill_(1.0)
            continue
        seed = (cfg.train.seed * 1_000_003 + zlib.crc32(info.canonical.encode())) % (2**63)
        gen = torch.Generator().manual_seed(seed)
        full = torch.empty(info.full_shape).normal_(0.0, _std(name, cfg), generator=gen)
        param.copy_(take_shard(full, info))


def count_parameters(model: torch.nn.Module, cfg: TrainConfig, pctx: ParallelContext) -> dict:
    """Whole-model counts (all shards, all experts): total and active per token."""
    seen: dict[str, int] = {}
    expert = 0
    for name, param in model.named_parameters():
        info = shard_info(name, param, cfg, pctx)
        size = math.prod(info.full_shape)
        if info.local_expert_copy:
            expert += size * pctx.ep  # the other EP ranks hold experts of the same shape
        elif info.expert:
            expert += size
        else:
            seen[info.canonical] = size
    dense = sum(seen.values())
    active = dense + expert * cfg.moe.top_k // cfg.moe.num_experts
    return {"total": dense + expert, "expert": expert, "active": active}
