"""Entry point: ``locmoe-train`` and ``torchrun -m locmoe_train.train``.

Parses the config, starts the process groups, builds the parts, runs
``Trainer.fit`` and tears down in ``finally``. Exit status: 0 when training
completed, 2 for bad user input (nothing written), 3 when the non-finite
guard stopped the run (``train.nonfinite``; no checkpoint of that state),
4 when a checkpoint could not be written (a full volume: one ``error:`` line,
``latest`` keeps the last good one), 130/143 when stopped by SIGINT/SIGTERM
after a clean stop, 1 on a crash.

Subcommands (table SUBCOMMANDS below): ``prepare-data``, ``inspect-checkpoint``,
``sweep``, ``report``, ``export-hf``, ``adak``; e.g.
``locmoe-train inspect-checkpoint PATH``. ``--help-config`` lists every
config key (``config_help.py``); ``--print-config`` prints the resolved
config of ``--config`` plus overrides. With ``--check``
it validates the config, the parallel layout for ``--world-size`` and the
data directory and that a fresh start does not land among another run's
checkpoints, then exits (launch scripts run it before torchrun so that a
bad config fails with status 2 and one message instead of one per rank).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

from locmoe_train.errors import UserError

# "nonfinite": the non-finite guard stopped the run (nonfinite.py); "save_failed": a
# checkpoint write failed (checkpoint_dirs.SaveFailed).
EXIT_CODES = {"completed": 0, "exit_at_step": 0, "nonfinite": 3, "save_failed": 4,
              "SIGINT": 130, "SIGTERM": 143}

# ``locmoe-train NAME ...`` -> "module:function" called with the remaining argv;
# imported only when used, so one subcommand's optional dependencies never
# slow down or break another.
SUBCOMMANDS = {
    "prepare-data": "locmoe_train.data.prepare:main",
    "inspect-checkpoint": "locmoe_train.checkpoint_inspect:main",
    "sweep": "locmoe_train.sweep:main",
    "report": "locmoe_train.report:main",
    "export-hf": "locmoe_train.hf.export:main",
    "adak": "locmoe_train.adak.stage:main",
}


def _quiet_megatron() -> None:
    # megatron-core warns about every optional extension it cannot find
    # (TE, apex, flash-attn...) on import; they are optional here by design.
    if os.environ.get("LOCMOE_VERBOSE"):
        return
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="locmoe-train",
        description="Pre-train a GPT-MoE. Overrides: --section.key=value (e.g. --train.max_steps=50).",
        epilog="Subcommands: " + ", ".join(SUBCOMMANDS) + " (each with --help).")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--check", action="store_true",
                        help="validate config, layout and data, then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of processes to validate for")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (--config plus overrides) as YAML, "
                             "then exit without training")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and description, "
                             "then exit")
    args, rest = parser.parse_known_args(argv)
    from locmoe_train.config import parse_override_args

    return args, parse_override_args(rest)


def resolve(cfg, meta: dict):
    """Fill values taken from the data (vocab size) into the config."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = int(meta["vocab_size"])
    elif cfg.model.vocab_size < int(meta["vocab_size"]):
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({meta['vocab_size']}) in {cfg.data.path}: remove model.vocab_size (it defaults to "
            f"the tokenizer's) or raise it.")
    return cfg


def check(cfg, world_size: int, meta: dict) -> None:
    """Checks that need the world size and the data; UserError if the run cannot work."""
    from locmoe_train.data.layout import check_batch_layout
    from locmoe_train.parallel.state import check_layout

    resolve(cfg, meta)
    _, dp, _ = check_layout(cfg.parallel, world_size, cfg.expert_tp)
    check_batch_layout(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp)


def checkpointing(cfg) -> bool:
    """Whether this run saves or loads checkpoints at all."""
    c = cfg.checkpoint
    return bool(c.interval or c.dir or c.resume)


def check_checkpoints(cfg) -> None:
    """UserError when this run would start a new history among another run's checkpoints
    (``checkpoint_dirs.check_fresh_start``). Read-only: every rank, and ``--check``."""
    from locmoe_train.checkpoint_dirs import check_fresh_start, checkpoint_dir

    if checkpointing(cfg):
        check_fresh_start(checkpoint_dir(cfg), cfg.checkpoint.resume, cfg.checkpoint.existing)


@dataclass
class Run:
    """The parts every command that runs the model builds the same way."""
    precision: str  # "fp32" or "bf16"
    dtype: object  # torch.float32 or torch.bfloat16
    model: object
    loader: object  # StepLoader over the train split (BlendLoader for data.blend)
    eval_batches: list
    n_train: int  # training windows
    # data.blend: name -> (weight, that part's validation micro-batches); else None.
    eval_sets: dict | None = None
    blend: list | None = None  # data.blend's parts (BlendPart)


def resolve_precision(cfg, pctx):
    """``train.precision`` on this device: ("fp32" | "bf16", the torch dtype)."""
    import torch

    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if pctx.device.type == "cuda" else "fp32"
    return prec, torch.bfloat16 if prec == "bf16" else torch.float32


def build_run(cfg, pctx) -> Run:
    """Precision, data loaders, validation batches and the model: shared by pre-training,
    the Ada-K stage and the benchmark."""
    import torch

    from locmoe_train.data.dataset import StepLoader, TokenWindows, eval_micro_batches
    from locmoe_train.model.gpt import build_model

    prec, dtype = resolve_precision(cfg, pctx)
    torch.manual_seed(cfg.train.seed)
    t = cfg.train

    def evaluation(valid_ds):
        return eval_micro_batches(valid_ds, t.micro_batch_size, pctx.dp_rank, pctx.dp,
                                  t.eval_samples)

    if cfg.data.blend:
        from locmoe_train.data.blend import BlendLoader, open_blend

        parts = open_blend(cfg.data)
        loader = BlendLoader(parts, t.global_batch_size, t.micro_batch_size, pctx.dp_rank,
                             pctx.dp, t.seed, shuffle=cfg.data.shuffle)
        eval_sets = {p.name: (p.weight, evaluation(p.valid)) for p in parts}
        eval_batches = [b for _, batches in eval_sets.values() for b in batches]
        model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
        return Run(prec, dtype, model, loader, eval_batches, sum(len(p.train) for p in parts),
                   eval_sets, parts)
    train_ds = TokenWindows(os.path.join(cfg.data.path, "train"), cfg.data.seq_len)
    valid_ds = TokenWindows(os.path.join(cfg.data.path, "valid"), cfg.data.seq_len)
    loader = StepLoader(train_ds, t.global_batch_size, t.micro_batch_size,
                        pctx.dp_rank, pctx.dp, t.seed, shuffle=cfg.data.shuffle)
    model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
    return Run(prec, dtype, model, loader, evaluation(valid_ds), len(train_ds))


def _sinks(cfg, resumed: bool, start_step: int):
    from locmoe_train.sinks import ConsoleSink, JsonlSink, MultiSink, truncate_after
    from locmoe_train.sinks.trackers import build_tracker_sinks

    sinks = []
    if cfg.logging.console:
        sinks.append(ConsoleSink(cfg.train.max_steps))
    if cfg.logging.jsonl:
        metrics_path = os.path.join(cfg.logging.run_dir, "metrics.jsonl")
        if resumed:
            truncate_after(metrics_path, start_step)
        sinks.append(JsonlSink(metrics_path, append=resumed))
    return MultiSink(sinks + build_tracker_sinks(cfg, resumed, start_step))


def run(cfg) -> str:
    from locmoe_train.checkpoint import Checkpointer
    from locmoe_train.checkpoint_dirs import checkpoint_dir, move_aside_all
    from locmoe_train.config import dump_config
    from locmoe_train.data.blend import data_meta
    from locmoe_train.hooks import load_hooks
    from locmoe_train.model.init import count_parameters
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer, state_parts
    from locmoe_train.parallel.launch import launched_rank, launched_world_size
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.runlock import acquire
    from locmoe_train.train_step import TrainStep
    from locmoe_train.trainer import Cadence, Trainer

    meta = data_meta(cfg.data)
    check(cfg, launched_world_size(), meta)
    check_checkpoints(cfg)  # on every rank: all exit 2 together
    # One live run per run directory (rank 0 holds the lock for its world).
    lock = (acquire(cfg.logging.run_dir, cfg.logging.take_over_lock)
            if launched_rank() in (None, 0) else None)
    t_start = time.time()
    sink = None
    try:
        if lock is not None and checkpointing(cfg) and cfg.checkpoint.existing == "move_aside":
            move_aside_all(checkpoint_dir(cfg), cfg.checkpoint.resume)  # under the lock
        pctx = init_parallel(cfg.parallel, cfg.expert_tp, cfg.train.device, cfg.train.seed)
        r = build_run(cfg, pctx)
        optimizer = build_optimizer(r.model, cfg.optim, pctx)
        moe = build_runtime(r.model, cfg, pctx)
        hooks = load_hooks(pctx)
        step_fn = TrainStep(r.model, optimizer, cfg, pctx, r.dtype, moe=moe,
                            eval_batches=r.eval_batches, eval_sets=r.eval_sets, hooks=hooks)
        counts = count_parameters(r.model, cfg, pctx)
        parts = {"model": r.model, "optimizer": optimizer, "loader": r.loader, "moe": moe,
                 "guard": step_fn.guard}  # the guard's streak survives a resume
        ckpt = Checkpointer(cfg, pctx, hooks) if checkpointing(cfg) else None
        start_step, resume_from = 0, ckpt.resolve_resume() if ckpt else None
        if resume_from is not None:
            start_step = ckpt.load(resume_from, parts)
            if pctx.is_main:
                print(f"resumed from {resume_from} at step {start_step}", flush=True)
        if pctx.is_main:
            os.makedirs(cfg.logging.run_dir, exist_ok=True)
            dump_config(cfg, os.path.join(cfg.logging.run_dir, "config.yaml"))
            sink = _sinks(cfg, resume_from is not None, start_step)
            print(startup_summary(cfg, pctx, counts, meta, r.precision, r.n_train,
                                  blend=r.blend, optim_bytes=state_parts(optimizer)), flush=True)

        save = (lambda step: ckpt.save(step, parts)) if ckpt else None
        trainer = Trainer(Cadence.from_config(cfg), pctx, step_fn, r.loader, sink, start_step,
                          save, parts=[moe, step_fn.guard] + ([r.loader] if r.blend else []),
                          hooks=hooks, console=cfg.logging.console, guard=step_fn.guard,
                          saver=ckpt)
        outcome = trainer.fit()
        if pctx.is_main:
            write_summary(cfg, pctx, trainer, outcome, counts, time.time() - t_start,
                          kept=trainer.last_checkpoint or resume_from)
        if outcome == "nonfinite" and pctx.world_size > 1:
            # Every rank exits 3; torchrun ends the others when the first one does, so
            # they wait here until rank 0 has written its summary and error line.
            import torch.distributed as dist

            dist.barrier()
        return outcome
    finally:
        if sink is not None:
            sink.close()
        destroy_parallel()
        if lock is not None:
            lock.release()


def write_summary(cfg, pctx, trainer, outcome: str, counts, wall_s: float, kept) -> None:
    """Rank 0 at the end: ``summary.json`` and the last console line (``kept``: the
    checkpoint a non-finite stop leaves to resume from)."""
    from locmoe_train.sinks.base import strict_json

    summary = {"outcome": outcome, "steps": trainer.step,
               "val_loss": (trainer.last_eval or {}).get("val_loss"),
               "wall_time_s": round(wall_s, 2), "params": counts, "layout": pctx.describe()}
    with open(os.path.join(cfg.logging.run_dir, "summary.json"), "w") as f:
        f.write(strict_json(summary, indent=2))  # a NaN val_loss: null
    if outcome == "nonfinite":
        print(f"error: {trainer.guard.message(kept)}", file=sys.stderr, flush=True)
    else:
        print(f"done: {outcome} after {trainer.step} steps in {summary['wall_time_s']:.1f}s; "
              f"outputs in {cfg.logging.run_dir}", flush=True)


def startup_summary(cfg, pctx, counts, meta, precision, n_train, blend=None,
                    optim_bytes=None) -> str:
    from locmoe_train.moe.routers import router_class

    m, moe = cfg.model, cfg.moe
    moe_layers = len(range(0, m.num_layers, m.moe_every))
    sharding = (f"distributed (state sharded over dp {pctx.dp}, experts over edp {pctx.edp})"
                if cfg.optim.distributed else "not sharded")
    lines = [
        "locmoe-train",
        f"  model    : {m.num_layers} layers (MoE in {moe_layers}), hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads, vocab {m.vocab_size}",
        f"  moe      : impl={moe.impl} router={moe.router} experts={moe.num_experts} top_k={moe.top_k} "
        f"capacity: {router_class(moe.router).describe_capacity(moe)}",
        f"  params   : {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active "
        f"per token ({counts['expert'] / 1e6:.2f}M in experts)",
        f"  layout   : {pctx.describe()}, precision {precision}, "
        f"recompute {cfg.train.recompute}",
        f"  data     : {'a blend of ' + str(len(blend)) if blend else cfg.data.path} "
        f"({n_train} train windows of {cfg.data.seq_len} tokens), "
        f"global batch {cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size} x "
        f"dp {pctx.dp} x accum {cfg.train.global_batch_size // (cfg.train.micro_batch_size * pctx.dp)}",
        f"  schedule : {cfg.train.max_steps} steps, lr {cfg.optim.lr} ({cfg.optim.schedule}, "
        f"warmup {cfg.optim.warmup_steps})",
        f"  optim    : AdamW, {sharding}"
        + _optim_memory(optim_bytes),
        f"  guard    : train.nonfinite={cfg.train.nonfinite} "
        + ("(stop at the first NaN/inf loss or grad norm)" if cfg.train.nonfinite == "stop" else
           f"(skip NaN/inf steps, stop after {cfg.train.nonfinite_patience} in a row)"),
        f"  outputs  : {cfg.logging.run_dir}/ (config.yaml, metrics.jsonl, summary.json)",
    ]
    for i, p in enumerate(blend or []):  # under the data line
        lines.insert(6 + i, f"             {p.weight:6.1%} {p.name}: {p.path} ({len(p.train)} train "
                        f"windows, {p.train.num_tokens} tokens)")
    from locmoe_train.sinks.trackers import tracker_outputs

    lines += [f"             {cfg.logging.run_dir}/{out}" for out in tracker_outputs(cfg.logging)]
    return "\n".join(lines)


def _optim_memory(parts: dict | None) -> str:
    """The startup line's memory: what the optimizer holds per rank (``state_parts``)."""
    if parts is None:
        return ""
    line = f", state {sum(parts.values()) / 2**20:.2f} MiB per rank"
    if "slices" in parts:
        line += (f" (Adam moments {parts['adam'] / 2**20:.2f} + fp32 parameter slice and its "
                 f"gradient {parts['slices'] / 2**20:.2f})")
    return line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from locmoe_train.parallel.launch import launched_rank, launched_world_size, several_nodes
    from locmoe_train.parallel.orphan import die_with_launcher

    rank = launched_rank()
    prefix = f"[rank {rank}] " if rank not in (None, 0) else ""
    die_with_launcher(prefix)  # first: a launcher killed during start-up takes us along
    _quiet_megatron()
    try:
        if argv and argv[0] in SUBCOMMANDS:
            import importlib

            module, func = SUBCOMMANDS[argv[0]].split(":")
            return getattr(importlib.import_module(module), func)(argv[1:])
        from locmoe_train.config import load_config

        args, overrides = parse_args(argv)
        if args.help_config:
            from locmoe_train.config_help import help_text

            print(help_text(), end="")
            return 0
        if args.config is None and not overrides:
            raise UserError("no config given: pass --config FILE (e.g. configs/quickstart.yaml) "
                            "and optional --section.key=value overrides.")
        cfg = load_config(args.config, overrides)
        from locmoe_train.moe.impls import check_impl  # after --help-config: it imports torch

        check_impl(cfg)
        if args.print_config:
            from locmoe_train.config import config_yaml

            print(config_yaml(cfg), end="")
            return 0
        if args.check:
            from locmoe_train.data.blend import data_meta
            from locmoe_train.runlock import check_free

            world = args.world_size or launched_world_size()
            check(cfg, world, data_meta(cfg.data))
            check_checkpoints(cfg)
            if not several_nodes():
                # launch/local.sh: refused before torchrun starts. Not per node: a node
                # joining a live elastic job would find its own job's lock.
                check_free(cfg.logging.run_dir, cfg.logging.take_over_lock)
            print(f"config OK for world size {world}")
            return 0
        return EXIT_CODES.get(run(cfg), 1)
    except UserError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        from locmoe_train.checkpoint_dirs import SaveFailed

        if isinstance(e, SaveFailed):  # every rank; rank 0 alone says why, in one line
            if e.message:
                print(f"error: {e.message}", file=sys.stderr, flush=True)
            return EXIT_CODES["save_failed"]
        traceback.print_exc()
        return 1


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
