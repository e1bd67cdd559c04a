"""Layout-independent parameter initialisation.

Every parameter gets a *canonical name* (its name in a TP=1, EP=1 model, local
expert indices replaced by global ones) and a *full shape*. Its full value is
drawn from a generator seeded by ``(train.seed, canonical name)`` and this
rank keeps its shard. So the same seed gives the same model at any TP / EP /
ETP layout, which makes "TP=2 equals TP=1" and "EP=2 equals EP=1" testable
and makes checkpoints reshardable by name.

Sharding follows megatron-core: a parameter with ``tensor_model_parallel`` set
is split contiguously along ``partition_dim`` over the TP group (the
expert-TP group for experts). SwiGLU ``linear_fc1`` weights are the exception:
each rank holds a slice of the gate half and the same slice of the up half.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch

from locmoe_train.config import TrainConfig
from locmoe_train.parallel.state import ParallelContext

_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


@dataclass
class ShardInfo:
    canonical: str
    full_shape: tuple[int, ...]
    dim: int | None  # partition dim, None if replicated
    rank: int  # this rank's index in the partition group
    size: int  # partition group size
    glu: bool  # SwiGLU fc1: gate and up halves sharded separately
    expert: bool
    # A megatron SequentialMLP expert: this rank sees only its EP share of them.
    local_expert_copy: bool = False


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def tag_tensor_parallel(model: torch.nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel`` / ``partition_dim`` on sharded weights.

    megatron-core sets them only inside its own initialisers, which we skip
    (``perform_initialization=False``); derive them from the module types.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
        set_tensor_model_parallel_attributes)

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def shard_info(name: str, param: torch.Tensor, cfg: TrainConfig, pctx: ParallelContext) -> ShardInfo:
    expert = is_expert_param(name)
    shape = list(param.shape)
    ep_dim = getattr(param, "expert_parallel_dim", None)
    if ep_dim is not None:  # our stacked experts: the expert dim is split over EP ranks
        shape[ep_dim] *= pctx.ep
        return ShardInfo(name, tuple(shape), ep_dim, pctx.ep_rank, pctx.ep, False, True)
    canonical = _LOCAL_EXPERT.sub(
        lambda m: f".experts.{pctx.ep_rank * (cfg.moe.num_experts // pctx.ep) + int(m.group(1))}.",
        name)
    sharded = bool(getattr(param, "tensor_model_parallel", False))
    dim = getattr(param, "partition_dim", 0) if sharded else None
    size = (pctx.etp if expert else pctx.tp) if sharded else 1
    rank = (pctx.etp_rank if expert else pctx.tp_rank) if sharded else 0
    if dim is not None:
        shape[dim] *= size
    glu = sharded and name.endswith("linear_fc1.weight")
    return ShardInfo(canonical, tuple(shape), dim, rank, size, glu, expert,
                     local_expert_copy=canonical != name)


def take_shard(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """This rank's shard of a full (canonical) tensor."""
    if info.dim is None or info.size == 1:
        return full
    if info.glu:
        gate, up = full.chunk(2, dim=info.dim)
        return torch.cat([gate.chunk(info.size, dim=info.dim)[info.rank],
                          up.chunk(info.size, dim=info.dim)[info.rank]], dim=info.dim)
    return full.chunk(info.size, dim=info.dim)[info.rank]


def _std(name: str, cfg: TrainConfig) -> float:
    # Output projections of residual branches are scaled down with depth (GPT-2 / Megatron).
    if name.endswith(("linear_proj.weight", "linear_fc2.weight", ".experts.w2")):
        return cfg.model.init_std / math.sqrt(2.0 * cfg.model.num_layers)
    return cfg.model.init_std


@torch.no_grad()
def init_parameters(model: torch.nn.Module, cfg: TrainConfig, pctx: ParallelContext) -> None:
    tag_tensor_parallel(model)
    for name, param in model.named_parameters():
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
