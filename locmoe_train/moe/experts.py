"""SwiGLU experts: a grouped-GEMM path and a per-expert reference.

Legend: N rows (tokens) grouped by local expert, D hidden, F expert FFN
width, L local experts.

Weights are stacked per layer in ``x @ W`` orientation: ``w13_LDF2``
(gate and up projections side by side, ``[L, D, 2F]``) and ``w2_LFD``
(``[L, F, D]``). Dim 0 is the expert dim, sharded over expert-parallel
ranks (``expert_parallel_dim`` attribute), so a checkpoint can split it into
one tensor per global expert.

Implementations (``moe.experts``):
* ``grouped``: two ``torch.nn.functional.grouped_mm`` calls over all local
  experts at once (bf16 on GPU; also runs in fp32 on CPU when the sizes
  keep 16-byte strides);
* ``loop``: one matmul pair per expert, the reference and the CPU default;
* ``auto``: grouped on CUDA when available, else loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(h_NF2: torch.Tensor) -> torch.Tensor:
    gate, up = h_NF2.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLUExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 impl: str = "auto"):
        super().__init__()
        L, D, Fw = num_local_experts, hidden_size, ffn_hidden_size
        self.w13 = nn.Parameter(torch.empty(L, D, 2 * Fw))
        self.w2 = nn.Parameter(torch.empty(L, Fw, D))
        for p in (self.w13, self.w2):
            nn.init.normal_(p, std=0.02)  # replaced by model/init.py
            setattr(p, "expert_parallel_dim", 0)
        if impl == "auto":
            impl = "grouped" if torch.cuda.is_available() and hasattr(F, "grouped_mm") else "loop"
        if impl == "grouped" and not hasattr(F, "grouped_mm"):
            raise RuntimeError("moe.experts=grouped needs torch.nn.functional.grouped_mm "
                               "(torch >= 2.10); use moe.experts=loop")
        self.impl = impl

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        if self.impl == "grouped":
            return self._grouped(x_ND, tokens_per_expert_L)
        return self._loop(x_ND, tokens_per_expert_L)

    def _weights(self, x: torch.Tensor):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(
            x.device.type) else x.dtype
        return x.to(dtype), self.w13.to(dtype), self.w2.to(dtype)

    def _loop(self, x_ND, tokens_per_expert_L):
        x_ND, w13, w2 = self._weights(x_ND)
        outs = []
        for e, x_e in enumerate(torch.split(x_ND, tokens_per_expert_L.tolist())):
            outs.append(swiglu(x_e @ w13[e]) @ w2[e])
        return torch.cat(outs) if outs else x_ND.new_zeros(0, w2.shape[-1])

    def _grouped(self, x_ND, tokens_per_expert_L):
        x_ND, w13, w2 = self._weights(x_ND)
        offs = torch.cumsum(tokens_per_expert_L, 0).to(torch.int32)
        h = F.grouped_mm(x_ND, w13, offs=offs)
        return F.grouped_mm(swiglu(h), w2, offs=offs)
