"""One optimizer step: micro-batches, backward, gradient sync, clip, update.

``TrainStep.__call__`` takes the step's micro-batches (``[b, s+1]`` token
ids: inputs are ``[:, :-1]``, labels ``[:, 1:]``) and returns its metrics as
device tensors, local to this rank. It does no I/O and no host sync, so the
trainer decides when to pay for reductions.

Loss scaling: each micro-batch's loss (mean token loss plus our MoE layers'
weighted auxiliary losses) is divided by the number of micro-batches;
megatron's MoE layer adds its auxiliary losses' gradient itself through
``MoEAuxLossAutoScaler``, scaled the same way. ``GradSync`` then averages
over data-parallel ranks. The reported ``loss`` is the LM loss alone.
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

from locmoe_train.config import TrainConfig
from locmoe_train.model.gpt import causal_mask
from locmoe_train.moe.layer import set_token_ids
from locmoe_train.optim.schedule import lr_at
from locmoe_train.parallel.grads import GradSync
from locmoe_train.parallel.state import ParallelContext


class TrainStep:
    def __init__(self, model, optimizer, cfg: TrainConfig, pctx: ParallelContext,
                 dtype: torch.dtype, moe_stats=None):
        self.model, self.optimizer, self.cfg, self.pctx = model, optimizer, cfg, pctx
        self.dtype = dtype
        self.moe_stats = moe_stats
        self.grad_sync = GradSync(model, pctx)
        seq = cfg.data.seq_len
        self.mask = causal_mask(seq, pctx.device)
        self.position_ids = torch.arange(seq, device=pctx.device)[None]

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.pctx.device.type, dtype=self.dtype)

    def forward_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one micro-batch."""
        tokens = tokens.to(self.pctx.device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        set_token_ids(inputs)  # for routers that hash token ids
        with self.autocast():
            per_token = self.model(inputs, self.position_ids.expand(inputs.shape[0], -1),
                                   self.mask, labels=labels)
        return per_token.float().mean()

    def __call__(self, micro_batches: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / n, device=self.pctx.device))
        loss_sum = torch.zeros((), device=self.pctx.device)
        # The record_function ranges name the step's phases for the torch profiler
        # (scripts/bench_train.py); they cost nothing measurable when it is off.
        for tokens in micro_batches:
            with record_function("train_step/forward"):
                loss = self.forward_loss(tokens)
                aux = self.moe_stats.pop_aux_loss() if self.moe_stats is not None else None
                total = loss if aux is None else loss + aux
            with record_function("train_step/backward"):
                (total / n).backward()
            loss_sum += loss.detach()
        with record_function("train_step/grad_sync"):
            self.grad_sync.reduce()
            grad_norm = self.grad_sync.clip(self.cfg.optim.grad_clip)
        with record_function("train_step/optimizer"):
            self.optimizer.step()
        if self.moe_stats is not None:
            self.moe_stats.step_end(step, loss_sum / n)
        metrics = {"loss": loss_sum / n, "grad_norm": grad_norm,
                   "lr": torch.tensor(lr)}
        if self.moe_stats is not None:
            metrics.update({f"moe/{k}": v for k, v in self.moe_stats.collect(n).items()})
        return metrics

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Mean validation loss over this rank's micro-batches (local; caller reduces)."""
        self.model.eval()
        total = torch.zeros((), device=self.pctx.device)
        for tokens in micro_batches:
            total += self.forward_loss(tokens)
        self.model.train()
        return total / max(1, len(micro_batches))
