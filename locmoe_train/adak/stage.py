"""``locmoe-train adak``: the Ada-K post-training stage (METHOD.md section 7).

Owns the stage's loop: load a pre-trained checkpoint into the model, freeze
it, give every MoE layer an allocator (``adak/allocator.py``), then train
only the allocators with AdamW:

1. warm start (``adak.warm_start_steps``): a no-grad top-K forward records
   each layer's router inputs and probabilities; the target count of a token
   is its top-p count ``n(p*)``, with one ``p*`` per layer chosen over the
   whole step's tokens (all ranks) so that the mean count is closest to
   ``adak.warm_start_mean_k`` (default ``moe.top_k``); loss: cross-entropy of
   ``pi(k|s)`` to it;
2. PPO (``adak.steps``): per micro-batch a rollout with sampled k (no grad)
   records states, k and ``log pi_old(k|s)`` and the per-token reward R, a
   second no-grad forward with the base top-K routing gives R*; then
   ``adak.ppo_epochs`` optimizer steps on the whole batch with the clipped
   surrogate and the expected-k penalty (``adak/ppo.py``). The states are the
   rollout's, so a PPO epoch needs no model forward.

Both phases share one step counter, one AdamW (constant lr) and one data
loader. Evaluation runs the model with argmax k against the base top-K model
on the validation split. Metrics go to ``<adak.out_dir>/metrics.jsonl``.

Checkpoints (``<adak.out_dir>/checkpoints/step_N``): ``state.pt`` (allocator
weights by layer, AdamW state, step, data position; rank 0), one
``rng_rankR.pt`` per rank (torch RNG and each allocator's sampling
generator), ``meta.json`` written last; the directory is renamed into place
and ``latest`` updated only when complete. The base model is not copied: a
resumed stage reloads it from ``--checkpoint``.

Not owned: the model, the pre-training checkpoint format (``checkpoint.py``),
process groups (``parallel/state.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
import zlib

import torch
import torch.distributed as dist

from locmoe_train.adak.allocator import install_allocators, set_mode
from locmoe_train.adak.ppo import (advantages, p_grid, pick_p_star, ppo_loss, top_p_count_sums,
                                   top_p_counts, warm_start_loss)
from locmoe_train.checkpoint import (FORMAT, barrier, begin_step_dir, find_resume,
                                     publish_step_dir, save_synced, validate_checkpoint)
from locmoe_train.errors import UserError



def check_supported(cfg) -> None:
    """UserError unless the MoE setup can take a per-token expert count."""
    moe = cfg.moe
    if moe.impl != "locmoe":
        raise UserError(
            f"locmoe-train adak needs moe.impl=locmoe (our MoE layer), got moe.impl={moe.impl!r}: "
            f"megatron-core's MoELayer has no per-token expert count. Pre-train with "
            f"moe.impl=locmoe to use Ada-K.")
    if moe.router != "topk":
        raise UserError(
            f"locmoe-train adak builds on a top-k softmax router, got moe.router={moe.router!r}: "
            f"pre-train with moe.router=topk to use Ada-K.")
    if moe.capacity_factor is not None:
        raise UserError(
            f"moe.capacity_factor={moe.capacity_factor}: a per-token expert count needs dropless "
            f"dispatch; pass --moe.capacity_factor=null (it does not change the model's weights).")
    if moe.max_nodes_per_token is not None:
        raise UserError(
            f"moe.max_nodes_per_token={moe.max_nodes_per_token} is not supported by Ada-K (a "
            f"token may choose up to all {moe.num_experts} experts): pass "
            f"--moe.max_nodes_per_token=null.")


def resolve_base_checkpoint(path: str) -> str:
    """A ``step_*`` directory, or a checkpoint directory whose ``latest`` names one."""
    from locmoe_train.checkpoint import validate_checkpoint

    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    problem = validate_checkpoint(path)
    if problem is not None:
        raise UserError(f"--checkpoint {path!r} is not a usable pre-trained checkpoint: {problem}. "
                        f"Pass a step_* directory or a checkpoint.dir of a pre-training run.")
    return path


class _Discarded:
    """Takes the pre-training optimizer state and data position, which the stage does not use."""

    def __init__(self):
        self.state: dict = {}

    def load_state_dict(self, state) -> None:
        pass


def _layer_index(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def _sum_over_world(t: torch.Tensor, pctx) -> torch.Tensor:
    if pctx.world_size > 1:
        dist.all_reduce(t)
    return t


class AdaKStage:
    def __init__(self, cfg, pctx, base_path: str):
        from locmoe_train.checkpoint import Checkpointer
        from locmoe_train.data.dataset import StepLoader, TokenWindows, eval_micro_batches
        from locmoe_train.model.gpt import build_model, causal_mask
        from locmoe_train.moe.layer import LocMoELayer
        from locmoe_train.parallel.grads import GradSync

        self.cfg, self.pctx, self.base_path = cfg, pctx, base_path
        a = cfg.adak
        prec = cfg.train.precision
        if prec == "auto":
            prec = "bf16" if pctx.device.type == "cuda" else "fp32"
        self.dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        self.model = build_model(cfg, pctx, cfg.model.vocab_size, self.dtype)
        Checkpointer(cfg, pctx).load(base_path, self.model, _Discarded(), _Discarded(), None)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()  # the base model is frozen: no dropout, no MoE training stats
        self.layers = [_layer_index(n) for n, m in self.model.named_modules()
                       if isinstance(m, LocMoELayer)]
        self.routers = install_allocators(self.model)
        torch.manual_seed(cfg.train.seed)
        for layer, r in zip(self.layers, self.routers):
            r.generator = torch.Generator(device=pctx.device)
            r.generator.manual_seed(zlib.crc32(f"adak/{cfg.train.seed}/{pctx.rank}/{layer}".encode()))
        params = [r.alloc_weight for r in self.routers]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay,
                                           betas=(o.beta1, o.beta2), eps=o.eps)
        self.grad_sync = GradSync(self.model, pctx)  # only the allocators require grad now
        train_ds = TokenWindows(os.path.join(cfg.data.path, "train"), cfg.data.seq_len)
        valid_ds = TokenWindows(os.path.join(cfg.data.path, "valid"), cfg.data.seq_len)
        self.loader = StepLoader(train_ds, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                 pctx.dp_rank, pctx.dp, cfg.train.seed, shuffle=cfg.data.shuffle)
        self.eval_batches = eval_micro_batches(valid_ds, cfg.train.micro_batch_size, pctx.dp_rank,
                                               pctx.dp, cfg.train.eval_samples)
        self.mask = causal_mask(cfg.data.seq_len, pctx.device)
        self.position_ids = torch.arange(cfg.data.seq_len, device=pctx.device)[None]
        self.sp = pctx.tp > 1  # MoE with TP runs sequence parallel: routers see a slice
        self.ckpt_dir = os.path.join(a.out_dir, "checkpoints")
        self.total_steps = a.warm_start_steps + a.steps
        self.val_loss_topk: float | None = None
        self.step = 0

    # ---- forward passes ---------------------------------------------------------
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.pctx.device.type, dtype=self.dtype)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        """Run the model with the routers in ``mode``; the reward ``log p(next token)`` of each
        token the routers of this rank saw, in their order ([T]: sequence-major, like
        the router's ``[s*b]`` rows; under sequence parallelism only this rank's slice)."""
        set_mode(self.routers, mode)
        tokens = tokens.to(self.pctx.device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        b, s = inputs.shape
        with self.autocast():
            loss_bs = self.model(inputs, self.position_ids.expand(b, -1), self.mask, labels=labels)
        assert loss_bs.shape == (b, s), loss_bs.shape
        reward_sb = -loss_bs.float().t()
        if self.sp:
            part = s // self.pctx.tp
            reward_sb = reward_sb[self.pctx.tp_rank * part:(self.pctx.tp_rank + 1) * part]
        return reward_sb.reshape(-1)

    def _k_hist(self, k_T: torch.Tensor) -> torch.Tensor:
        E = self.cfg.moe.num_experts
        return torch.bincount(k_T - 1, minlength=E).float()

    def _update(self, loss_fn) -> torch.Tensor:
        """Zero grads, ``loss_fn()`` backwards per micro-batch, sync, clip, step; the grad norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_fn()
        self.grad_sync.reduce()
        norm = self.grad_sync.clip(self.cfg.adak.grad_clip)
        self.optimizer.step()
        return norm

    # ---- one step of each phase ---------------------------------------------------
    def warm_step(self, micro_batches) -> dict[str, torch.Tensor]:
        a, dev = self.cfg.adak, self.pctx.device
        target = a.warm_start_mean_k if a.warm_start_mean_k is not None else self.cfg.moe.top_k
        decisions = []
        for tokens in micro_batches:
            self.forward(tokens, "topk")
            decisions.append([r.last for r in self.routers])
        grid = p_grid(device=dev)
        L = len(self.routers)
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
        a, dev = self.cfg.adak, self.pctx.device
        L = len(self.routers)
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

    # ---- evaluation -----------------------------------------------------------------
    def _eval_pass(self, mode: str):
        dev = self.pctx.device
        loss = torch.zeros((), device=dev, dtype=torch.float64)
        tokens = torch.zeros((), device=dev, dtype=torch.float64)
        hist_LE = torch.zeros(len(self.routers), self.cfg.moe.num_experts, device=dev)
        for batch in self.eval_batches:
            r_T = self.forward(batch, mode)
            loss -= r_T.double().sum()
            tokens += r_T.numel()
            hist_LE += torch.stack([self._k_hist(r.last.k_T) for r in self.routers])
        _sum_over_world(loss, self.pctx)
        _sum_over_world(tokens, self.pctx)
        _sum_over_world(hist_LE, self.pctx)
        return float(loss / tokens), hist_LE

    def evaluate(self) -> dict:
        if self.val_loss_topk is None:  # the base model is frozen: compute once
            self.val_loss_topk, _ = self._eval_pass("topk")
        val_loss, hist_LE = self._eval_pass("argmax")
        record = {"step": self.step, "eval": "argmax", "val_loss": val_loss,
                  "val_loss_topk": self.val_loss_topk,
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

    # ---- logging ----------------------------------------------------------------------
    def _record(self, phase: str, acc: dict, n_steps: int) -> dict:
        """Reduce a window of step metrics over ranks into one JSON record."""
        pctx = self.pctx
        grad_norm = acc.pop("grad_norm") / n_steps  # already global
        for v in acc.values():
            _sum_over_world(v, pctx)
        tokens = float(acc["tokens"])  # summed over the window's steps and all ranks
        record: dict = {"step": self.step, "phase": phase, "lr": self.cfg.adak.lr,
                        "grad_norm": float(grad_norm)}
        if phase == "warm_start":
            # Per-rank losses are per-rank means (over DP): average them.
            record["warm_start_loss"] = float(acc["warm_start_loss"]) / (pctx.dp * n_steps)
            record["p_star"] = {f"layer_{l}": v / (pctx.world_size * n_steps)
                                for l, v in zip(self.layers, acc["p_star"].tolist())}
            record.update({f"target_{k}": v for k, v in self._k_summary(acc["target_k_hist"]).items()})
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

    def _print(self, record: dict) -> None:
        if not (self.pctx.is_main and self.cfg.logging.console):
            return
        head = f"[{time.strftime('%H:%M:%S')}] adak step {record['step']}/{self.total_steps}"
        if "eval" in record:
            ks = " ".join(f"{v:.2f}" for v in record["val_mean_k"].values())
            line = (f"{head} | eval argmax k | val_loss {record['val_loss']:.4f} (top-K "
                    f"{record['val_loss_topk']:.4f}, change {record['val_loss_change']:+.4f}) | "
                    f"mean k {ks} | expert FLOPs x{record['val_expert_flops_ratio_all']:.3f}")
        elif record["phase"] == "warm_start":
            ks = " ".join(f"{v:.2f}" for v in record["target_mean_k"].values())
            line = (f"{head} warm start | loss {record['warm_start_loss']:.4f} | "
                    f"target mean k {ks}")
        else:
            ks = " ".join(f"{v:.2f}" for v in record["mean_k"].values())
            line = (f"{head} ppo | loss {record['ppo_loss']:.4f} | reward {record['reward']:.4f} "
                    f"(top-K {record['reward_topk']:.4f}) | clip {record['clip_fraction']:.3f} | "
                    f"sampled mean k {ks} | expert FLOPs x{record['expert_flops_ratio_all']:.3f}")
        print(line, flush=True)

    # ---- checkpoints --------------------------------------------------------------------
    def save(self) -> str:
        pctx = self.pctx
        tmp, final = begin_step_dir(self.ckpt_dir, self.step, pctx)
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
               "routers": [r.generator.get_state() for r in self.routers]}
        save_synced(rng, os.path.join(tmp, f"rng_rank{pctx.rank:05d}.pt"))
        barrier(pctx)
        if pctx.is_main:
            # The allocators and their AdamW state are identical on every rank.
            state = {"step": self.step, "loader": self.loader.state_dict(),
                     "allocators": {l: r.alloc_weight.detach().cpu()
                                    for l, r in zip(self.layers, self.routers)},
                     "optimizer": self.optimizer.state_dict()}
            save_synced(state, os.path.join(tmp, "state.pt"))
            meta = {"format": FORMAT, "kind": "adak", "step": self.step,
                    "base_checkpoint": os.path.abspath(self.base_path),
                    "world_size": pctx.world_size, "layout": pctx.describe(),
                    "config": self.cfg.to_dict()}
            publish_step_dir(self.ckpt_dir, tmp, final, meta, self.cfg.adak.keep)
        barrier(pctx)
        return final

    def resolve_resume(self) -> str | None:
        return find_resume(self.cfg.adak.resume, self.ckpt_dir, "adak.resume",
                           validate_stage_checkpoint)

    def load(self, path: str) -> None:
        pctx = self.pctx
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        saved_layers = sorted(state["allocators"])
        if saved_layers != sorted(self.layers):
            raise UserError(f"adak checkpoint {path} has allocators for MoE layers {saved_layers}, "
                            f"this model has {self.layers}: it belongs to another model.")
        with torch.no_grad():
            for layer, r in zip(self.layers, self.routers):
                w = state["allocators"][layer]
                if w.shape != r.alloc_weight.shape:
                    raise UserError(f"adak checkpoint {path}: layer {layer}'s allocator has shape "
                                    f"{tuple(w.shape)}, expected {tuple(r.alloc_weight.shape)}.")
                r.alloc_weight.copy_(w)
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        rng_file = os.path.join(path, f"rng_rank{pctx.rank:05d}.pt")
        if meta["world_size"] == pctx.world_size and os.path.exists(rng_file):
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            for r, g in zip(self.routers, rng["routers"]):
                r.generator.set_state(g)
        elif pctx.is_main:
            print(f"note: world size changed ({meta['world_size']} -> {pctx.world_size}): the "
                  f"allocators, optimizer and data position are restored; k sampling restarts "
                  f"from train.seed.", flush=True)
        if pctx.is_main and meta.get("base_checkpoint") != os.path.abspath(self.base_path):
            print(f"warning: this stage checkpoint was trained on {meta.get('base_checkpoint')}, "
                  f"resuming on {os.path.abspath(self.base_path)}", flush=True)

    # ---- the loop -------------------------------------------------------------------
    def run(self) -> dict:
        from locmoe_train.config import dump_config
        from locmoe_train.metrics import JsonlSink, truncate_after

        a, pctx = self.cfg.adak, self.pctx
        resume_from = self.resolve_resume()
        if resume_from is not None:
            self.load(resume_from)
        sink = None
        if pctx.is_main:
            os.makedirs(a.out_dir, exist_ok=True)
            dump_config(self.cfg, os.path.join(a.out_dir, "config.yaml"))
            metrics_path = os.path.join(a.out_dir, "metrics.jsonl")
            if resume_from is not None:
                truncate_after(metrics_path, self.step)
                print(f"resumed Ada-K stage from {resume_from} at step {self.step}", flush=True)
            sink = JsonlSink(metrics_path, append=resume_from is not None)
            print(f"Ada-K stage on {self.base_path}: {len(self.routers)} MoE layers, "
                  f"{a.warm_start_steps} warm-start + {a.steps} PPO steps; outputs in "
                  f"{a.out_dir}/", flush=True)

        def emit(record):
            self._print(record)
            if sink is not None:
                sink.write(record)

        from locmoe_train.trainer import StopRequested, agree_to_stop

        last_eval, outcome = None, "completed"
        stop = StopRequested()  # SIGINT/SIGTERM: every rank stops after the same step, saved
        stop.install()
        try:
            acc, n_acc, phase_of_acc = {}, 0, None
            while self.step < self.total_steps:
                micro_batches = self.loader.next_step()
                self.step += 1
                phase = "warm_start" if self.step <= a.warm_start_steps else "ppo"
                metrics = (self.warm_step if phase == "warm_start" else self.ppo_step)(micro_batches)
                for k, v in metrics.items():
                    acc[k] = acc[k] + v if k in acc else v.clone()
                n_acc, phase_of_acc = n_acc + 1, phase
                last = self.step == self.total_steps
                stopping = agree_to_stop(stop, pctx)
                if (self.step % a.log_interval == 0 or last or stopping
                        or self.step == a.warm_start_steps):
                    emit(self._record(phase_of_acc, acc, n_acc))
                    acc, n_acc = {}, 0
                if (a.eval_interval and self.step % a.eval_interval == 0) or last:
                    last_eval = self.evaluate()
                    emit(last_eval)
                if (a.checkpoint_interval and self.step % a.checkpoint_interval == 0) or last \
                        or stopping:
                    path = self.save()
                    if pctx.is_main and self.cfg.logging.console:
                        print(f"saved Ada-K checkpoint {path}", flush=True)
                if stopping:
                    outcome = signal.Signals(stop.signum).name
                    break
            if last_eval is None and outcome == "completed":
                last_eval = self.evaluate()  # resumed at (or past) the end: the final state
                emit(last_eval)
        finally:
            stop.uninstall()
            if sink is not None:
                sink.close()
        summary = {"outcome": outcome, "steps": self.step, "base_checkpoint": self.base_path,
                   **{k: v for k, v in (last_eval or {}).items() if k not in ("step", "eval")}}
        if pctx.is_main:
            with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def validate_stage_checkpoint(path: str) -> str | None:
    """None if ``path`` is a complete Ada-K stage checkpoint, else what is wrong with it."""
    return validate_checkpoint(path, kind="adak")


def main(argv: list[str]) -> int:
    from locmoe_train.config import load_config, parse_override_args
    from locmoe_train.data.prepare import load_meta
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train import EXIT_CODES, check

    ap = argparse.ArgumentParser(
        prog="locmoe-train adak",
        description="Ada-K post-training: learn a per-token number of experts for a frozen "
                    "pre-trained model (PPO on per-layer allocators). Overrides: "
                    "--section.key=value (e.g. --adak.steps=200).")
    ap.add_argument("--config", required=True, help="the model's YAML config, with an adak: section")
    ap.add_argument("--checkpoint", required=True,
                    help="pre-trained checkpoint: a step_* directory or a checkpoint.dir")
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.config, parse_override_args(rest))
    check_supported(cfg)
    base = resolve_base_checkpoint(args.checkpoint)
    ckpt_dir = os.path.join(cfg.adak.out_dir, "checkpoints")
    if cfg.adak.resume is None and os.path.isdir(ckpt_dir) and any(
            d.startswith("step_") for d in os.listdir(ckpt_dir)):
        raise UserError(f"adak.out_dir={cfg.adak.out_dir!r} already holds Ada-K checkpoints: "
                        f"continue them with --adak.resume=auto, or pick another --adak.out_dir.")
    check(cfg, int(os.environ.get("WORLD_SIZE", "1")), load_meta(cfg.data.path))
    pctx = init_parallel(cfg.parallel, cfg.moe.num_experts, cfg.train.device, cfg.train.seed)
    try:
        summary = AdaKStage(cfg, pctx, base).run()
        if summary["outcome"] != "completed":
            if pctx.is_main:
                print(f"stopped by {summary['outcome']} after step {summary['steps']} (saved); "
                      f"continue with --adak.resume=auto", flush=True)
            return EXIT_CODES[summary["outcome"]]
        if pctx.is_main:
            print(f"done: Ada-K after {summary['steps']} steps; val loss {summary['val_loss']:.4f} "
                  f"(top-K {summary['val_loss_topk']:.4f}), expert FLOPs "
                  f"x{summary['val_expert_flops_ratio_all']:.3f} of top-K; outputs in "
                  f"{cfg.adak.out_dir}/", flush=True)
    finally:
        destroy_parallel()
    return 0
