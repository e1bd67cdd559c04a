"""What the capacity loss probe costs against a training step (issue 25).

    python scripts/bench_capacity_probe.py --config configs/ablations/_base.yaml \\
        --moe.router=locmoe_plus --parallel.ep=1 --parallel.ranks_per_node=null \\
        --model.vocab_size=4096 --steps 10 --probes 5 --out probe_overhead.json

Builds the model of ``--config`` on one process (GPU if there is one), with
``moe.capacity.estimator=loss_probe``, runs ``--warmup`` and then ``--steps``
training steps on random tokens (steps that do not probe: the re-estimation
is pushed past them), then times ``--probes`` probes on the last step's last
micro-batch: a probe is ``capacity_probe.run_probe``, one no-grad forward per
candidate capacity and one all-reduce, exactly what a re-estimation step adds.
Reports step and probe seconds (medians), their ratio, and the share of
training time at the config's ``moe.capacity.interval``:
``probe / (interval * step + probe)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe import capacity_probe
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train import resolve_precision
    from locmoe_train.train_step import TrainStep

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--out")
    args, overrides = p.parse_known_args(argv)
    overrides = [o.removeprefix("--") for o in overrides]
    cfg = load_config(args.config, overrides + ["moe.capacity.estimator=loss_probe",
                                                f"moe.capacity.warmup={10 ** 9}"])
    if cfg.model.vocab_size is None:
        raise SystemExit("set --model.vocab_size (the data is not read: the tokens are random)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, device, cfg.train.seed)
    try:
        _, dtype = resolve_precision(cfg, pctx)
        model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
        moe = build_runtime(model, cfg, pctx)
        step_fn = TrainStep(model, build_optimizer(model, cfg.optim), cfg, pctx, dtype, moe=moe)
        ctls = [c for m in moe.modules if (c := getattr(m.router, "controller", None))]
        if not ctls:
            raise SystemExit("the config has no LocMoE+ layer: set moe.router=locmoe_plus")
        t = cfg.train
        n_micro = t.global_batch_size // (t.micro_batch_size * pctx.dp)
        g = torch.Generator().manual_seed(0)
        step_s = []
        for step in range(1, args.warmup + args.steps + 1):
            batch = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size,
                                                             cfg.data.seq_len + 1), generator=g)
                     for _ in range(n_micro)]
            _sync(pctx.device)
            t0 = time.perf_counter()
            step_fn(batch, step)
            _sync(pctx.device)
            if step > args.warmup:
                step_s.append(time.perf_counter() - t0)
        probe = functools.partial(step_fn.forward_loss, batch[-1])
        caps = capacity_probe.candidates(ctls[0].c0, ctls[0].c_floor, cfg.moe.capacity.probe_points,
                                         ctls[0].round_up, [ctls[0].capacity])
        probe_s = []
        for _ in range(args.probes):
            _sync(pctx.device)
            t0 = time.perf_counter()
            capacity_probe.run_probe(ctls, probe)
            _sync(pctx.device)
            probe_s.append(time.perf_counter() - t0)
        step_med, probe_med = statistics.median(step_s), statistics.median(probe_s)
        interval = cfg.moe.capacity.interval
        out = {"config": args.config, "overrides": overrides, "device": str(pctx.device),
               "world": pctx.world_size, "micro_batches_per_step": n_micro,
               "candidates": caps, "step_s": step_med, "probe_s": probe_med,
               "probe_over_step": probe_med / step_med, "interval": interval,
               "share_of_training": probe_med / (interval * step_med + probe_med),
               "torch": torch.__version__}
        if pctx.rank == 0:
            print(json.dumps(out, indent=1))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
        return 0
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
