"""Gradient reduction across data / sequence parallel ranks, and the global norm.

Owns what happens to ``.grad`` between backward and the optimizer:

* sequence-parallel parameters (norm gains, router weights: tagged
  ``sequence_parallel``) saw only this TP rank's slice of the sequence, so
  their gradients are summed over the TP group first;
* every gradient is then summed over the ranks that hold a replica of the
  same shard (the DP group for dense parameters, the expert-DP group for
  experts) and scaled by ``1/dp``. Each rank's loss is the mean over its own
  micro-batches, so ``1/dp`` turns the sum into the gradient of the global
  mean. Expert gradients already include every DP rank's tokens (they came
  through the all-to-all), which is why they too take ``1/dp`` rather than
  ``1/edp``;
* the global gradient norm counts each unique shard once (the replica with
  DP rank 0, and for replicated-over-TP tensors only TP rank 0) in one
  all-reduce over the world (``checked_norm`` adds the loss's NaN/inf flags
  to that same all-reduce, for the non-finite guard).

Gradients are flattened per group into one buffer per dtype before each
all-reduce (few, large messages), then copied back. The distributed
optimizer (``optim/distributed.py``) replaces the data-parallel all-reduce,
the norm's local sum and the clipping scale with their sharded versions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from locmoe_train.parallel.sharding import is_expert_param
from locmoe_train.parallel.state import ParallelContext


def _all_reduce_coalesced(grads: list[torch.Tensor], group, scale: float | None = None) -> None:
    if not grads:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        if scale is not None:
            flat.mul_(scale)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


class GradSync:
    """Reduces gradients of one model; built once, called after every backward."""

    def __init__(self, model: torch.nn.Module, pctx: ParallelContext):
        self.pctx = pctx
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.seq_parallel = [p for _, p in self.params if getattr(p, "sequence_parallel", False)]
        self.dense = [p for n, p in self.params if not is_expert_param(n)]
        self.expert = [p for n, p in self.params if is_expert_param(n)]
        # Which local parameters count towards the global norm on this rank.
        self.norm_owned = []
        for name, p in self.params:
            tp_sharded = bool(getattr(p, "tensor_model_parallel", False))
            if is_expert_param(name):
                owner = pctx.edp_rank == 0 and (tp_sharded or pctx.etp_rank == 0)
            else:
                owner = pctx.dp_rank == 0 and (tp_sharded or pctx.tp_rank == 0)
            if owner:
                self.norm_owned.append(p)

    @torch.no_grad()
    def reduce(self) -> None:
        for _, p in self.params:
            if p.grad is None:  # e.g. an expert that got no token in this step
                p.grad = torch.zeros_like(p)
        pctx = self.pctx
        if pctx.tp > 1:
            _all_reduce_coalesced([p.grad for p in self.seq_parallel], pctx.tp_group)
        self.reduce_data_parallel()

    def reduce_data_parallel(self) -> None:
        """Average gradients over their replicas (the distributed optimizer overrides it)."""
        pctx = self.pctx
        if pctx.dp > 1:
            _all_reduce_coalesced([p.grad for p in self.dense], pctx.dp_group, 1.0 / pctx.dp)
        if pctx.edp > 1:
            _all_reduce_coalesced([p.grad for p in self.expert], pctx.edp_group, 1.0 / pctx.dp)
        elif pctx.dp > 1:
            for p in self.expert:
                p.grad.mul_(1.0 / pctx.dp)

    def local_sq_norm(self) -> torch.Tensor:
        """This rank's share of the squared global norm."""
        if not self.norm_owned:
            return torch.zeros((), dtype=torch.float32, device=self.pctx.device)
        return torch.stack([p.grad.float().pow(2).sum() for p in self.norm_owned]).sum()

    def scale_grads(self, coeff: torch.Tensor) -> None:
        for _, p in self.params:
            p.grad.mul_(coeff)

    @torch.no_grad()
    def global_norm(self) -> torch.Tensor:
        sq = self.local_sq_norm()
        if self.pctx.world_size > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    @torch.no_grad()
    def checked_norm(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global norm, and [ranks whose ``loss`` is NaN, ranks whose it is inf]: the
        flags ride on the norm's all-reduce (``nonfinite.py``), no extra message."""
        loss = loss.detach().float()
        buf = torch.stack([self.local_sq_norm(), loss.isnan().float(), loss.isinf().float()])
        if self.pctx.world_size > 1:
            dist.all_reduce(buf)
        return buf[0].sqrt(), buf[1:]

    @torch.no_grad()
    def clip(self, max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
        """Scale gradients so the global norm is at most ``max_norm``; return the norm before
        (``norm``: already computed, e.g. by ``checked_norm``)."""
        norm = self.global_norm() if norm is None else norm
        if max_norm > 0:
            coeff = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            self.scale_grads(coeff)
        return norm
