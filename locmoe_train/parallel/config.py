"""The ``parallel`` section: sizes of the parallel groups and the process backend.

The checks that need the world size live in ``parallel/state.py`` (``check_layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ParallelConfig:
    # Tensor-parallel size (with MoE, also sequence parallel); must divide the world size.
    tp: int = 1
    # Expert-parallel size: experts are sharded over this many ranks.
    ep: int = 1
    # Expert tensor parallel size; null resolves to 1 for moe.impl=native (whole
    # experts per rank, replicated over TP) and to tp for moe.impl=megatron.
    etp: Optional[int] = None
    # Simulate nodes of this many ranks on one machine (locality tests and
    # benchmarks); null = real nodes from torchrun's LOCAL_WORLD_SIZE.
    ranks_per_node: Optional[int] = None
    # auto = nccl with CUDA, gloo without.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Timeout of the process groups' collectives, in minutes.
    timeout_minutes: int = 10
