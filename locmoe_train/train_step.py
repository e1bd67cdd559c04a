"""One optimizer step: micro-batches, backward, gradient sync, clip, update.

``TrainStep.__call__`` takes the step's micro-batches (``[b, s+1]`` token
ids: inputs are ``[:, :-1]``, labels ``[:, 1:]``) and returns its metrics as
device tensors, local to this rank. It does no I/O and no host sync on GPU, so
the trainer decides when to pay for reductions. A step whose loss or gradient
norm is NaN/inf on any rank updates nothing (``nonfinite.py``); its verdict
rides on the gradient norm's all-reduce. ``log_record`` and
``eval_record`` turn a window of those metrics, and a validation pass, into
records (reduced over data-parallel ranks) when the trainer asks.

The MoE runtime (``moe/runtime.py``) adds the layers' aux loss to each
micro-batch's loss, hears about each finished step (adaptive routers) and
contributes the step's MoE counters to the metrics; the step does not look
inside them.

Loss scaling: each micro-batch's loss (mean token loss plus our MoE layers'
weighted auxiliary losses) is divided by the number of micro-batches;
megatron's MoE layer adds its auxiliary losses' gradient itself through
``MoEAuxLossAutoScaler``, scaled the same way. ``GradSync`` then averages
over data-parallel ranks (with ``optim.distributed``, reduce-scatters them
into the optimizer's shards). The reported ``loss`` is the LM loss alone.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist
from torch.profiler import record_function

from locmoe_train.config import TrainConfig
from locmoe_train.model.gpt import causal_mask
from locmoe_train.moe.layer import token_ids_scope
from locmoe_train.optim.optimizer import build_grad_sync
from locmoe_train.nonfinite import NonFiniteGuard, step_code, step_optimizer
from locmoe_train.optim.schedule import lr_at
from locmoe_train.parallel.state import ParallelContext


class TrainStep:
    def __init__(self, model, optimizer, cfg: TrainConfig, pctx: ParallelContext,
                 dtype: torch.dtype, moe=None, eval_batches: list[torch.Tensor] = (),
                 eval_sets: dict | None = None, hooks=()):
        self.model, self.optimizer, self.cfg, self.pctx = model, optimizer, cfg, pctx
        self.dtype = dtype
        self.moe = moe
        # Hooks with train_loss(step, loss) -> loss see each micro-batch's loss (tests
        # poison it); none in a normal run.
        self.loss_hooks = [h for h in hooks if hasattr(h, "train_loss")]
        self.guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_patience,
                                    pctx.device)
        self.eval_batches = list(eval_batches)
        # data.blend: name -> (weight, micro-batches); evaluated part by part.
        self.eval_sets = eval_sets
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.grad_sync = build_grad_sync(optimizer, model, pctx)
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
        with token_ids_scope(inputs), self.autocast():  # ids: for routers that hash them
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
                for hook in self.loss_hooks:
                    loss = hook.train_loss(step, loss)
                aux = self.moe.pop_aux_loss() if self.moe is not None else None
                total = loss if aux is None else loss + aux
            with record_function("train_step/backward"):
                (total / n).backward()
            loss_sum += loss.detach()
        loss_mean = loss_sum / n
        with record_function("train_step/grad_sync"):
            self.grad_sync.reduce()
            grad_norm, loss_flags = self.grad_sync.checked_norm(loss_mean)
            self.grad_sync.clip(self.cfg.optim.grad_clip, grad_norm)
        # A NaN/inf loss or norm on any rank: every rank skips the update (nonfinite.py).
        code = step_code(grad_norm, loss_flags)
        ok = code == 0
        with record_function("train_step/optimizer"):
            step_optimizer(self.optimizer, ok)
        if self.moe is not None:
            # The loss probe (moe/capacity_probe.py) runs the last micro-batch again.
            self.moe.step_end(step, loss_mean, ok,
                              probe=functools.partial(self.forward_loss, micro_batches[-1]))
        self.guard.update(code, step)
        # A skipped step's loss stays out of the logged mean (log_record).
        metrics = {"loss": torch.where(ok, loss_mean, 0.0), "grad_norm": grad_norm,
                   "lr": torch.tensor(lr), "skipped": (~ok).float()}
        if self.moe is not None:
            metrics.update(self.moe.collect(n))
        self._last = metrics
        return metrics

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.pctx.dp > 1:
            dist.all_reduce(value, group=self.pctx.dp_group)
            value = value / self.pctx.dp
        return value.item()

    def log_record(self, acc: dict[str, torch.Tensor], n_steps: int, elapsed: float) -> dict:
        """A window of ``n_steps`` summed step metrics -> the record's training fields."""
        good = n_steps - acc["skipped"]  # identical on every rank
        loss = self._dp_mean(acc["loss"] / good.clamp_min(1))
        return {"loss": loss if float(good) > 0 else float("nan"),
                # The last step's learning rate and gradient norm, not window means.
                "lr": float(self._last["lr"]), "grad_norm": self._last["grad_norm"].item(),
                "tokens_per_s": self.tokens_per_step * n_steps / max(elapsed, 1e-9),
                "step_time_s": elapsed / n_steps}

    def eval_record(self) -> dict:
        if not self.eval_sets:
            loss = self._dp_mean(self.evaluate(self.eval_batches))
            return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        # A blend: each part's loss, and their mean weighted as the blend trains on them.
        losses = torch.stack([self.evaluate(batches) for _, batches in self.eval_sets.values()])
        if self.pctx.dp > 1:
            dist.all_reduce(losses, group=self.pctx.dp_group)
            losses = losses / self.pctx.dp
        by_name = dict(zip(self.eval_sets, losses.tolist()))
        loss = sum(w * by_name[name] for name, (w, _) in self.eval_sets.items())
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_by_dataset": {name: {"loss": v} for name, v in by_name.items()}}

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Mean validation loss over this rank's micro-batches (local; caller reduces)."""
        self.model.eval()
        total = torch.zeros((), device=self.pctx.device)
        for tokens in micro_batches:
            total += self.forward_loss(tokens)
        self.model.train()
        return total / max(1, len(micro_batches))
