"""How each parameter is laid out over the parallel groups: its shard of the full tensor.

Every parameter has a *canonical name* (its name in a TP=1, EP=1 model, local
expert indices replaced by global ones) and a *full shape*. ``shard_info``
says which slice of the full tensor this rank holds; ``take_shard`` cuts it.
Initialisation (``model/init.py``) and checkpoints (``checkpoint.py``) both
go through these, which is what makes "TP=2 equals TP=1" testable and
checkpoints reshardable by name.

Sharding follows megatron-core: a parameter with ``tensor_model_parallel`` set
is split contiguously along ``partition_dim`` over the TP group (the
expert-TP group for experts). SwiGLU ``linear_fc1`` weights are the exception:
each rank holds a slice of the gate half and the same slice of the up half.
Our stacked experts carry ``expert_parallel_dim``: that dim is split over EP.
"""

from __future__ import annotations

import re
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
