"""Activation memory under train.recompute none / selective / full, from the torch profiler.

    python scripts/bench_recompute.py --config configs/quickstart.yaml --model.vocab_size=4096 \\
        --train.global_batch_size=4 --out bench_recompute.json          # tiny, on CPU

For each mode it builds the model from the config on one process (EP and TP
forced to 1), runs one warm-up training step (so the optimizer state and any
caches exist), times ``--steps`` more, then profiles one with
``profile_memory=True``. From
the profiler's allocation and free events on the model's device, replayed in
time order, it reports:

* ``peak_bytes``: the highest live memory from the first forward on, above
  the level when it starts (activations, then gradients and the optimizer's
  temporaries);
* ``forward_held_bytes``: what the first micro-batch's forward leaves
  allocated for its backward (the live memory at the end of its
  ``train_step/forward`` range, above the level at its start): the
  activations recompute trades for compute;
* ``step_time_s``: the median wall time of the timed steps, without the
  profiler (the cost of recomputing; noisy on a shared CPU).

The gradients must agree across modes (tests/unit/test_recompute.py checks
that); ``loss`` is printed so a reader sees the same step ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

import torch

MODES = ("none", "selective", "full")


def _replay(events, device_type: str, start_ns: int, end_ns: int) -> tuple[int, int]:
    """From the profiler's allocation and free events in time order: the peak live bytes
    after ``start_ns`` and the live bytes at ``end_ns``, both above the level at
    ``start_ns``. (Blocks allocated before the profiler started have no free event
    or one of unknown size, so only differences within the profile mean anything.)"""
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and e.device_type().name.lower() == device_type)
    live, base, at_end, peak = 0, None, None, 0
    for t, nbytes in mem:
        if base is None and t >= start_ns:
            base = peak = live
        if at_end is None and t >= end_ns:
            at_end = live
        live += nbytes
        if base is not None:
            peak = max(peak, live)
    base = live if base is None else base
    at_end = live if at_end is None else at_end
    return peak - base, at_end - base


def measure(cfg, mode: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train import resolve_precision
    from locmoe_train.train_step import TrainStep

    cfg.train.recompute = mode
    cfg.validate()
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, cfg.train.device, cfg.train.seed)
    try:
        _, dtype = resolve_precision(cfg, pctx)
        model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
        optimizer, moe = build_optimizer(model, cfg.optim), build_runtime(model, cfg, pctx)
        step_fn = TrainStep(model, optimizer, cfg, pctx, dtype, moe=moe)
        # One global batch of random tokens, cut into the step's micro-batches.
        t = cfg.train
        tokens = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, cfg.data.seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        batch = list(tokens.split(t.micro_batch_size))
        step_fn(batch, 1)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step_fn(batch, 2 + i)
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        activities = [ProfilerActivity.CPU]
        if pctx.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities, profile_memory=True) as prof:
            metrics = step_fn(batch, 2 + steps)
        events = prof.profiler.kineto_results.events()
        start_ns, end_ns = min((e.start_ns(), e.end_ns()) for e in events
                               if e.name() == "train_step/forward")
        peak, held = _replay(events, pctx.device.type, start_ns, end_ns)
        return {"recompute": mode, "device": str(pctx.device), "dtype": str(dtype).split(".")[-1],
                "peak_bytes": peak, "forward_held_bytes": held,
                "step_time_s": seconds, "loss": float(metrics["loss"])}
    finally:
        destroy_parallel()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated recompute modes")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    ap.add_argument("--out", default="bench_recompute.json")
    return ap


def main(argv=None) -> int:
    from locmoe_train.config import load_config, parse_override_args

    args, rest = _parser().parse_known_args(argv)
    # One thread unless told otherwise: oversubscribed cores make CPU timings meaningless.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    overrides = parse_override_args(rest) + ["parallel.ep=1", "parallel.tp=1"]
    results = []
    for mode in args.modes.split(","):
        cfg = load_config(args.config, overrides)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = 32000
        results.append(measure(cfg, mode, args.steps))
    base = results[0]
    m = cfg.model
    print(f"{args.config}: {m.num_layers} layers, hidden {m.hidden_size}, attention "
          f"{m.attention}, micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens")
    print(f"| recompute | forward keeps (MiB) | peak in step (MiB) | step (ms) | "
          f"kept vs {base['recompute']} |\n|---|---:|---:|---:|---:|")
    for r in results:
        ratio = r["forward_held_bytes"] / max(1, base["forward_held_bytes"])
        print(f"| {r['recompute']} | {r['forward_held_bytes'] / 2**20:.2f} | "
              f"{r['peak_bytes'] / 2**20:.2f} | {r['step_time_s'] * 1e3:.0f} | {ratio:.2f}x |")
    with open(args.out, "w") as f:
        json.dump({"config": args.config,
                   "command": " ".join(["python", "scripts/bench_recompute.py",
                                        *(argv if argv is not None else sys.argv[1:])]),
                   "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
