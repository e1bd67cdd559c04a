"""RMSNorm usable under tensor + sequence parallelism.

megatron-core's local spec normalises with ``WrappedTorchNorm``, which refuses
``sequence_parallel=True``; MoE with TP > 1 requires sequence parallelism. Under
sequence parallelism each TP rank normalises a different slice of the sequence,
so the weight's gradient is partial per rank: the ``sequence_parallel``
attribute tells the gradient sync (``train_step``) to sum it over the TP group.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32. Signature matches megatron's norm builders."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
