"""``locmoe-train adak``: the Ada-K post-training stage (METHOD.md section 7).

Builds the stage and runs it under the pre-training ``Trainer``: model and
data from ``train.build_run``, the pre-trained weights through
``Checkpointer.load(path, {"model": model})``, frozen, and an allocator per
MoE layer (``adak/allocator.py``) that ``AdaKStep`` (``adak/step.py``)
trains. Records go to the console (``AdaKConsole``) and
``<adak.out_dir>/metrics.jsonl``, the final evaluation to ``summary.json``.

The trainer saves through ``StageCheckpoint.save``:
``<adak.out_dir>/checkpoints/step_N`` with ``state.pt`` (allocators by layer,
AdamW state, step, data position; rank 0), ``rng_rankR.pt`` (the RNG states
of ``checkpoint_io.rng_state`` and the allocators' sampling generators) and
``meta.json`` (``kind: "adak"``) last. The base model is not copied: a
resumed stage reloads ``--checkpoint``. Both files hold only tensors and
plain values and load weights-only (``checkpoint_io.load_file``); a file that
needs the full unpickler is refused unless ``--allow-pickle``.

Not owned: the loop and signals (``trainer.py``), the model, the
pre-training checkpoint format (``checkpoint.py``), process groups.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib

import torch

from locmoe_train.adak.allocator import install_allocators
from locmoe_train.adak.step import AdaKStep
from locmoe_train.checkpoint import FORMAT, save_synced, validate_checkpoint
from locmoe_train.checkpoint_dirs import StepWrite, resolve, resume_point
from locmoe_train.checkpoint_io import ALLOW_PICKLE_FLAG, load_file, rng_state, set_rng_state
from locmoe_train.errors import UserError
from locmoe_train.sinks.base import strict_json


def check_supported(cfg) -> None:
    """UserError unless the MoE setup can take a per-token expert count."""
    from locmoe_train.moe.impls import impl_class

    moe = cfg.moe
    reason = impl_class(moe.impl).adak_support(moe)
    if reason is not None:
        raise UserError(reason)
    if moe.max_nodes_per_token is not None:
        raise UserError(
            f"moe.max_nodes_per_token={moe.max_nodes_per_token} is not supported by Ada-K (a "
            f"token may choose up to all {moe.num_experts} experts): pass "
            f"--moe.max_nodes_per_token=null.")


def resolve_base_checkpoint(path: str, pctx=None) -> str:
    """A ``step_*`` directory, or a checkpoint directory whose ``latest`` names one.
    Without ``pctx`` (before the process groups exist) the files' checksums are not
    read; with it, the ranks share that reading (every rank calls this)."""
    path = resolve(path)
    problem = validate_checkpoint(path, verify=pctx is not None, pctx=pctx)
    if problem is not None:
        raise UserError(f"--checkpoint {path!r} is not a usable pre-trained checkpoint: {problem}. "
                        f"Pass a step_* directory or a checkpoint.dir of a pre-training run.")
    return path


def validate_stage_checkpoint(path: str) -> str | None:
    """None if ``path`` is a complete Ada-K stage checkpoint, else what is wrong with it."""
    return validate_checkpoint(path, kind="adak")


def build(cfg, pctx, base_path: str):
    """The frozen pre-trained model with an allocator per MoE layer: ``(AdaKStep, loader)``."""
    from locmoe_train.checkpoint import Checkpointer
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.moe.runtime import layer_index
    from locmoe_train.train import build_run

    run = build_run(cfg, pctx)
    resolve_base_checkpoint(base_path, pctx)  # now with the checksums
    Checkpointer(cfg, pctx, pickle_option=ALLOW_PICKLE_FLAG).load(base_path, {"model": run.model})
    for p in run.model.parameters():
        p.requires_grad_(False)
    run.model.eval()  # frozen: no dropout, no MoE training stats
    layers = [layer_index(n) for n, m in run.model.named_modules() if isinstance(m, MoELayer)]
    routers = install_allocators(run.model)
    torch.manual_seed(cfg.train.seed)
    for layer, r in zip(layers, routers):
        r.generator = torch.Generator(device=pctx.device)
        r.generator.manual_seed(zlib.crc32(f"adak/{cfg.train.seed}/{pctx.rank}/{layer}".encode()))
    return AdaKStep(run.model, routers, layers, cfg, pctx, run.dtype, run.eval_batches), run.loader


class StageCheckpoint:
    """Saves and restores what the stage trains: allocators, AdamW, data position, RNG."""

    def __init__(self, cfg, pctx, base_path: str, step_fn: AdaKStep, loader):
        self.cfg, self.pctx, self.base_path = cfg, pctx, base_path
        self.step_fn, self.loader = step_fn, loader
        self.dir = os.path.join(cfg.adak.out_dir, "checkpoints")

    def save(self, step: int) -> str:
        pctx, s = self.pctx, self.step_fn
        write = StepWrite(self.dir, step, pctx, resume_key="adak.resume")
        rng = dict(rng_state(), routers=[r.generator.get_state() for r in s.routers])
        rng_file = f"rng_rank{pctx.rank:05d}.pt"
        sums = {}
        for rank_sums in write.gather({rng_file: write.attempt(
                rng_file, save_synced, rng, os.path.join(write.tmp, rng_file))}):
            sums.update(rank_sums)
        meta = None
        if pctx.is_main:
            # The allocators and their AdamW state are identical on every rank.
            state = {"step": step, "loader": self.loader.state_dict(),
                     "allocators": {l: r.alloc_weight.detach().cpu()
                                    for l, r in zip(s.layers, s.routers)},
                     "optimizer": s.optimizer.state_dict()}
            sums["state.pt"] = write.attempt("state.pt", save_synced, state,
                                             os.path.join(write.tmp, "state.pt"))
            meta = {"format": FORMAT, "kind": "adak", "step": step,
                    "base_checkpoint": os.path.abspath(self.base_path),
                    "world_size": pctx.world_size, "layout": pctx.describe(),
                    "config": self.cfg.to_dict(), "checksums": dict(sorted(sums.items()))}
        return write.publish(meta, self.cfg.adak.keep)

    def load(self, path: str) -> int:
        """Restore ``path``; returns the step to continue from."""
        pctx, s = self.pctx, self.step_fn
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        allow = self.cfg.checkpoint.allow_pickle
        state = load_file(path, "state.pt", allow, ALLOW_PICKLE_FLAG)
        rng_name = f"rng_rank{pctx.rank:05d}.pt"
        rng = None
        if meta["world_size"] == pctx.world_size and os.path.exists(os.path.join(path, rng_name)):
            rng = load_file(path, rng_name, allow, ALLOW_PICKLE_FLAG)
        if not isinstance(state, dict) or not all(k in state for k in
                                                  ("step", "loader", "allocators", "optimizer")) \
                or not all(isinstance(w, torch.Tensor) for w in state["allocators"].values()):
            raise UserError(f"adak checkpoint {path}: state.pt is not an Ada-K stage state "
                            f"(step, loader, allocators, optimizer).")
        saved = {l: tuple(w.shape) for l, w in state["allocators"].items()}
        wanted = {l: tuple(r.alloc_weight.shape) for l, r in zip(s.layers, s.routers)}
        if saved != wanted:
            raise UserError(f"adak checkpoint {path} has allocators {saved} (MoE layer: shape), "
                            f"this model needs {wanted}: it belongs to another model.")
        with torch.no_grad():
            for layer, r in zip(s.layers, s.routers):
                r.alloc_weight.copy_(state["allocators"][layer])
        s.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        if rng is not None:
            where = f"adak checkpoint file {os.path.join(path, rng_name)}"
            set_rng_state(rng, where)
            try:
                for r, g in zip(s.routers, rng["routers"], strict=True):
                    r.generator.set_state(g)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"{where} has no sampling state for each of the "
                                f"{len(s.routers)} allocators ({e})") from None
        elif pctx.is_main:
            print(f"note: world size changed ({meta['world_size']} -> {pctx.world_size}): the "
                  f"allocators, optimizer and data position are restored; k sampling restarts "
                  f"from train.seed.", flush=True)
        if pctx.is_main and meta.get("base_checkpoint") != os.path.abspath(self.base_path):
            print(f"warning: this stage checkpoint was trained on {meta.get('base_checkpoint')}, "
                  f"resuming on {os.path.abspath(self.base_path)}", flush=True)
        return int(state["step"])


class AdaKConsole:
    """The console sink for Ada-K records (training of either phase, evaluation)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def write(self, record: dict) -> None:
        head = f"[{time.strftime('%H:%M:%S')}] adak step {record['step']}/{self.total_steps}"
        if "eval" in record:
            ks = " ".join(f"{v:.2f}" for v in record["val_mean_k"].values())
            line = (f"{head} | eval argmax k | val_loss {record['val_loss']:.4f} (top-K "
                    f"{record['val_loss_topk']:.4f}, change {record['val_loss_change']:+.4f}) | "
                    f"mean k {ks} | expert FLOPs x{record['val_expert_flops_ratio_all']:.3f}")
        elif record["phase"] == "warm_start":
            ks = " ".join(f"{v:.2f}" for v in record["target_mean_k"].values())
            line = f"{head} warm start | loss {record['warm_start_loss']:.4f} | target mean k {ks}"
        else:
            ks = " ".join(f"{v:.2f}" for v in record["mean_k"].values())
            line = (f"{head} ppo | loss {record['ppo_loss']:.4f} | reward {record['reward']:.4f} "
                    f"(top-K {record['reward_topk']:.4f}) | clip {record['clip_fraction']:.3f} | "
                    f"sampled mean k {ks} | expert FLOPs x{record['expert_flops_ratio_all']:.3f}")
        print(line, flush=True)

    def close(self) -> None:
        pass


def run(cfg, pctx, base_path: str) -> dict:
    """Build, resume if asked, train under the ``Trainer``; the summary (rank 0 writes it)."""
    from locmoe_train.config import dump_config
    from locmoe_train.hooks import load_hooks
    from locmoe_train.sinks import JsonlSink, MultiSink, truncate_after
    from locmoe_train.trainer import Cadence, Trainer

    a = cfg.adak
    step_fn, loader = build(cfg, pctx, base_path)
    ckpt = StageCheckpoint(cfg, pctx, base_path, step_fn, loader)
    resume_from = resume_point(a.resume, ckpt.dir, "adak.resume", validate_stage_checkpoint, pctx)
    start_step = ckpt.load(resume_from) if resume_from is not None else 0
    total = a.warm_start_steps + a.steps
    sink = None
    if pctx.is_main:
        os.makedirs(a.out_dir, exist_ok=True)
        dump_config(cfg, os.path.join(a.out_dir, "config.yaml"))
        metrics_path = os.path.join(a.out_dir, "metrics.jsonl")
        if resume_from is not None:
            truncate_after(metrics_path, start_step)
            print(f"resumed Ada-K stage from {resume_from} at step {start_step}", flush=True)
        jsonl = JsonlSink(metrics_path, append=resume_from is not None)
        sink = MultiSink(([AdaKConsole(total)] if cfg.logging.console else []) + [jsonl])
        print(f"Ada-K stage on {base_path}: {len(step_fn.routers)} MoE layers, "
              f"{a.warm_start_steps} warm-start + {a.steps} PPO steps; outputs in "
              f"{a.out_dir}/", flush=True)
    try:
        # A log window ends at the last warm-start step: it never mixes the phases.
        cadence = Cadence(total, a.log_interval, a.eval_interval, a.checkpoint_interval,
                          log_at=(a.warm_start_steps,))
        trainer = Trainer(cadence, pctx, step_fn, loader, sink, start_step, ckpt.save,
                          hooks=load_hooks(pctx), console=cfg.logging.console)
        outcome = trainer.fit()
        last_eval = trainer.last_eval
        if last_eval is None and outcome == "completed":  # resumed at the end: the final state
            last_eval = {"step": trainer.step, **step_fn.eval_record()}
            if sink is not None:
                sink.write(last_eval)
    finally:
        if sink is not None:
            sink.close()
    summary = {"outcome": outcome, "steps": trainer.step, "base_checkpoint": base_path,
               **{k: v for k, v in (last_eval or {}).items() if k not in ("step", "eval")}}
    if pctx.is_main:
        with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
            f.write(strict_json(summary, indent=2))  # a NaN val_loss: null
    return summary


def main(argv: list[str]) -> int:
    from locmoe_train.config import load_config, parse_override_args
    from locmoe_train.moe.impls import check_impl
    from locmoe_train.data.blend import data_meta
    from locmoe_train.parallel.launch import launched_world_size
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
    ap.add_argument("--allow-pickle", action="store_true",
                    help="unpickle a checkpoint file (of the pre-trained checkpoint or of the "
                         "stage) that the safe (weights-only) loader refuses: it can run code "
                         "from the file; only for checkpoints you trust "
                         "(same as --checkpoint.allow_pickle=true)")
    args, rest = ap.parse_known_args(argv)
    cfg = check_impl(load_config(args.config, parse_override_args(rest)))
    if args.allow_pickle:
        cfg.checkpoint.allow_pickle = True
    check_supported(cfg)
    base = resolve_base_checkpoint(args.checkpoint)
    ckpt_dir = os.path.join(cfg.adak.out_dir, "checkpoints")
    if cfg.adak.resume is None and os.path.isdir(ckpt_dir) and any(
            d.startswith("step_") for d in os.listdir(ckpt_dir)):
        raise UserError(f"adak.out_dir={cfg.adak.out_dir!r} already holds Ada-K checkpoints: "
                        f"continue them with --adak.resume=auto, or pick another --adak.out_dir.")
    check(cfg, launched_world_size(), data_meta(cfg.data))
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, cfg.train.device, cfg.train.seed)
    try:
        summary = run(cfg, pctx, base)
        if pctx.is_main and summary["outcome"] != "completed":
            print(f"stopped by {summary['outcome']} after step {summary['steps']} (saved); "
                  f"continue with --adak.resume=auto", flush=True)
        elif pctx.is_main:
            print(f"done: Ada-K after {summary['steps']} steps; val loss {summary['val_loss']:.4f} "
                  f"(top-K {summary['val_loss_topk']:.4f}), expert FLOPs "
                  f"x{summary['val_expert_flops_ratio_all']:.3f} of top-K; outputs in "
                  f"{cfg.adak.out_dir}/", flush=True)
        return EXIT_CODES[summary["outcome"]]
    finally:
        destroy_parallel()
