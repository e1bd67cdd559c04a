"""Ada-K's step for the ``Trainer``: the allocators of a frozen model (METHOD.md section 7).

Legend: T tokens on this rank, E experts (= the choices k), L MoE layers.

``AdaKStep(micro_batches, step)`` is the stage's ``TrainStep``. Up to step
``adak.warm_start_steps`` it runs a warm start (cross-entropy of ``pi(k|s)``
to each token's top-p count, ``p*`` chosen per layer over all ranks' tokens
to hit ``adak.warm_start_mean_k``), after it PPO (per micro-batch a sampled-k
rollout and a top-K forward, no grad, then ``adak.ppo_epochs`` AdamW steps on
the rollouts' states: no model forward). It returns metric tensors on device.
``log_record`` reduces a window of one phase over ranks (the stage ends a
window at the last warm-start step), ``eval_record`` compares argmax k with
top-K on the validation batches. Details: docs/adak.md.

Not owned: the losses (``adak/ppo.py``), the allocator (``adak/allocator.py``),
the loop, checkpoint and sinks (``trainer.py``, ``adak/stage.py``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from locmoe_train.adak.allocator import set_mode
from locmoe_train.adak.ppo import (advantages, p_grid, pick_p_star, ppo_loss, top_p_count_sums,
                                   top_p_counts, warm_start_loss)


def _sum_over_world(t: torch.Tensor, pctx) -> torch.Tensor:
    if pctx.world_size > 1:
        dist.all_reduce(t)
    return t


class AdaKStep:
    def __init__(self, model, routers, layers: list[int], cfg, pctx, dtype, eval_batches):
        from locmoe_train.model.gpt import causal_mask
        from locmoe_train.parallel.grads import GradSync

        self.model, self.routers, self.layers = model, routers, layers
        self.cfg, self.pctx, self.dtype, self.eval_batches = cfg, pctx, dtype, eval_batches
        a, o = cfg.adak, cfg.optim
        self.optimizer = torch.optim.AdamW([r.alloc_weight for r in routers], lr=a.lr,
                                           weight_decay=a.weight_decay,
                                           betas=(o.beta1, o.beta2), eps=o.eps)
        self.grad_sync = GradSync(model, pctx)  # only the allocators require grad
        if o.distributed and pctx.is_main:
            print("warning: optim.distributed is ignored by the Ada-K stage: its allocators "
                  "are small and replicated, they train with plain AdamW.", flush=True)
        self.mask = causal_mask(cfg.data.seq_len, pctx.device)
        self.position_ids = torch.arange(cfg.data.seq_len, device=pctx.device)[None]
        self.sp = pctx.tp > 1  # MoE with TP runs sequence parallel: routers see a slice
        self.val_loss_topk: float | None = None  # the base model is frozen: computed once

    def __call__(self, micro_batches, step: int) -> dict[str, torch.Tensor]:
        phase = self.warm_step if step <= self.cfg.adak.warm_start_steps else self.ppo_step
        return phase(micro_batches)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        """Run the model with the routers in ``mode``; the reward ``log p(next token)`` of each
        token the routers of this rank saw, in their order ([T]: sequence-major, like
        the router's ``[s*b]`` rows; under sequence parallelism only this rank's slice)."""
        set_mode(self.routers, mode)
        tokens = tokens.to(self.pctx.device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        b, s = inputs.shape
        autocast = (contextlib.nullcontext() if self.dtype == torch.float32
                    else torch.autocast(self.pctx.device.type, dtype=self.dtype))
        with autocast:
            loss_bs = self.model(inputs, self.position_ids.expand(b, -1), self.mask, labels=labels)
        assert loss_bs.shape == (b, s), loss_bs.shape
        reward_sb = -loss_bs.float().t()
        if self.sp:
            part = s // self.pctx.tp
            reward_sb = reward_sb[self.pctx.tp_rank * part:(self.pctx.tp_rank + 1) * part]
        return reward_sb.reshape(-1)

    def _k_hist(self, k_T: torch.Tensor) -> torch.Tensor:
        return torch.bincount(k_T - 1, minlength=self.cfg.moe.num_experts).float()

    def _update(self, loss_fn) -> torch.Tensor:
        """Zero grads, ``loss_fn()`` backwards per micro-batch, sync, clip, step; the grad norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_fn()
        self.grad_sync.reduce()
        norm = self.grad_sync.clip(self.cfg.adak.grad_clip)
        self.optimizer.step()
        return norm

    # ---- the two phases ---------------------------------------------------------
    def warm_step(self, micro_batches) -> dict[str, torch.Tensor]:
        a, dev, L = self.cfg.adak, self.pctx.device, len(self.routers)
        target = a.warm_start_mean_k if a.warm_start_mean_k is not None else self.cfg.moe.top_k
        decisions = []
        for tokens in micro_batches:
            self.forward(tokens, "topk")
            decisions.append([r.last for r in self.routers])
        grid = p_grid(device=dev)
        sums_LG = torch.stack([sum(top_p_count_sums(mb[l].probs_TE, grid).double()
                                   for mb in decisions) for l in range(L)])
        n_tok = torch.tensor([float(sum(mb[0].k_T.numel() for mb in decisions))],
                             dtype=torch.float64, device=dev)
        local_tokens = float(n_tok)
        _sum_over_world(sums_LG, self.pctx)
        _sum_over_world(n_tok, self.pctx)
        p_star = [pick_p_star(sums_LG[l], float(n_tok), grid, target) for l in range(L)]
        norm = local_tokens * (self.pctx.tp if self.sp else 1)
        targets = [[top_p_counts(d.probs_TE, p_star[l]) for l, d in enumerate(mb)]
                   for mb in decisions]
        losses = []

        def loss_fn():
            for mb, tg in zip(decisions, targets):
                total = sum(warm_start_loss(r.log_policy(d.x_TD), k_T, norm)
                            for r, d, k_T in zip(self.routers, mb, tg))
                total.backward()
                losses.append(total.detach())

        grad_norm = self._update(loss_fn)
        hist_LE = torch.stack([sum(self._k_hist(tg[l]) for tg in targets) for l in range(L)])
        return {"warm_start_loss": torch.stack(losses).sum(), "grad_norm": grad_norm,
                "p_star": torch.tensor(p_star, device=dev), "target_k_hist": hist_LE,
                "tokens": torch.tensor(local_tokens, device=dev)}

    def ppo_step(self, micro_batches) -> dict[str, torch.Tensor]:
        a, dev, L = self.cfg.adak, self.pctx.device, len(self.routers)
        rollouts = []
        reward = torch.zeros((), device=dev)
        reward_topk = torch.zeros((), device=dev)
        hist_LE = torch.zeros(L, self.cfg.moe.num_experts, device=dev)
        for tokens in micro_batches:
            r_T = self.forward(tokens, "sample")
            decisions = [r.last for r in self.routers]
            r_star_T = self.forward(tokens, "topk")
            rollouts.append((decisions, advantages(r_T, r_star_T, L, a.gamma)))
            reward += r_T.sum()
            reward_topk += r_star_T.sum()
            hist_LE += torch.stack([self._k_hist(d.k_T) for d in decisions])
        local_tokens = float(sum(d[0].k_T.numel() for d, _ in rollouts))
        norm = local_tokens * (self.pctx.tp if self.sp else 1)
        stats: dict[str, torch.Tensor] = {}

        def loss_fn():
            stats.clear()
            for decisions, adv_LT in rollouts:
                total = 0.0
                for r, d, adv_T in zip(self.routers, decisions, adv_LT):
                    loss, st = ppo_loss(r.log_policy(d.x_TD), d.k_T, d.logp_T, adv_T,
                                        a.clip, a.k_penalty, norm)
                    total = total + loss
                    for k, v in st.items():
                        stats[k] = stats.get(k, 0.0) + v
                total.backward()
                stats["ppo_loss"] = stats.get("ppo_loss", 0.0) + total.detach()

        for _ in range(a.ppo_epochs):
            grad_norm = self._update(loss_fn)
        # Loss and clipping of the last epoch (the first one has ratio 1 everywhere).
        return {"ppo_loss": stats["ppo_loss"], "surrogate": stats["surrogate"],
                "expected_k": stats["expected_k"], "clipped": stats["clipped"],
                "grad_norm": grad_norm, "reward": reward, "reward_topk": reward_topk,
                "k_hist": hist_LE, "tokens": torch.tensor(local_tokens, device=dev)}

    # ---- records -------------------------------------------------------------------
    def log_record(self, acc: dict, n_steps: int, elapsed: float) -> dict:
        """Reduce a window of one phase's step metrics over ranks into one record."""
        pctx = self.pctx
        grad_norm = acc["grad_norm"] / n_steps  # already global
        for k, v in acc.items():
            if k != "grad_norm":
                _sum_over_world(v, pctx)
        tokens = float(acc["tokens"])  # summed over the window's steps and all ranks
        phase = "warm_start" if "warm_start_loss" in acc else "ppo"
        record: dict = {"phase": phase, "lr": self.cfg.adak.lr, "grad_norm": float(grad_norm)}
        if phase == "warm_start":
            # Per-rank losses are per-rank means (over DP): average them.
            record["warm_start_loss"] = float(acc["warm_start_loss"]) / (pctx.dp * n_steps)
            record["p_star"] = {f"layer_{l}": v / (pctx.world_size * n_steps)
                                for l, v in zip(self.layers, acc["p_star"].tolist())}
            target = self._k_summary(acc["target_k_hist"])
            record.update({f"target_{k}": v for k, v in target.items()})
            return record
        L = len(self.routers)
        record["ppo_loss"] = float(acc["ppo_loss"]) / (pctx.dp * n_steps)
        record["surrogate"] = float(acc["surrogate"]) / (tokens * L)
        record["policy_expected_k"] = float(acc["expected_k"]) / (tokens * L)
        record["clip_fraction"] = float(acc["clipped"]) / (tokens * L)
        record["reward"] = float(acc["reward"]) / tokens
        record["reward_topk"] = float(acc["reward_topk"]) / tokens
        record["advantage"] = record["reward"] - record["reward_topk"]
        record.update(self._k_summary(acc["k_hist"]))
        return record

    def eval_pass(self, mode: str) -> tuple[float, torch.Tensor]:
        """Validation loss per token with the routers in ``mode``, and the k histogram."""
        dev = self.pctx.device
        loss = torch.zeros((), device=dev, dtype=torch.float64)
        tokens = torch.zeros((), device=dev, dtype=torch.float64)
        hist_LE = torch.zeros(len(self.routers), self.cfg.moe.num_experts, device=dev)
        for batch in self.eval_batches:
            r_T = self.forward(batch, mode)
            loss -= r_T.double().sum()
            tokens += r_T.numel()
            hist_LE += torch.stack([self._k_hist(r.last.k_T) for r in self.routers])
        for t in (loss, tokens, hist_LE):
            _sum_over_world(t, self.pctx)
        return float(loss / tokens), hist_LE

    def eval_record(self) -> dict:
        if self.val_loss_topk is None:
            self.val_loss_topk, _ = self.eval_pass("topk")
        val_loss, hist_LE = self.eval_pass("argmax")
        record = {"eval": "argmax", "val_loss": val_loss, "val_loss_topk": self.val_loss_topk,
                  "val_loss_change": val_loss - self.val_loss_topk}
        record.update({f"val_{k}": v for k, v in self._k_summary(hist_LE).items()})
        return record

    def _k_summary(self, hist_LE: torch.Tensor) -> dict:
        """Mean k, histogram and expert FLOPs relative to top-K, per layer and overall."""
        K = self.cfg.moe.top_k
        n_E = torch.arange(1, hist_LE.shape[1] + 1, dtype=hist_LE.dtype, device=hist_LE.device)
        chosen_L = (hist_LE * n_E).sum(1)
        tokens_L = hist_LE.sum(1).clamp_min(1)
        mean_k = (chosen_L / tokens_L).tolist()
        return {"mean_k": {f"layer_{l}": v for l, v in zip(self.layers, mean_k)},
                "k_hist": {f"layer_{l}": [int(c) for c in h]
                           for l, h in zip(self.layers, hist_LE.tolist())},
                "expert_flops_ratio": {f"layer_{l}": v / K for l, v in zip(self.layers, mean_k)},
                "expert_flops_ratio_all": float(chosen_L.sum() / (K * tokens_L.sum()))}
