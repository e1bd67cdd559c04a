"""Training-step benchmark: our MoE layer vs megatron-core's, same model, same invocation.

    python scripts/bench_train.py --config configs/bench/h100_small.yaml --out bench_train.json
    python scripts/bench_train.py --config configs/quickstart.yaml --model.vocab_size=4096 \\
        --steps 3 --warmup 1 --impls locmoe,megatron            # tiny, on CPU

For each ``moe.impl`` in ``--impls`` it builds the model from the config on one
process (GPU if available), runs ``--warmup`` then ``--steps`` full training
steps (forward, backward, grad sync, AdamW) on random tokens, timed with CUDA
events on GPU or ``perf_counter`` on CPU, and reports step time, tokens/s,
model TFLOP/s, MFU and peak GPU memory. Ratios are against the first impl.

FLOPs per token, forward (training = 3x: backward costs twice the forward),
counting only the experts a token activates and including attention:
``L_attn * (2*h*(h + 2*kv) + 2*h*h + 2*2*s*h)`` (projections, then QK^T and
AV over the full s x s score matrix, as in Megatron's formula)
``+ L_dense * 3*2*h*f + L_moe * (k*3*2*h*f_moe + 2*h*E)`` (SwiGLU: gate, up and
down; the router) ``+ 2*h*V`` (output layer). MFU = achieved FLOP/s / peak
(``--peak-tflops``, 989 for H100 bf16 dense).

Not yet here (issue 7): the per-phase profiler breakdown.
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


def flops_per_token(cfg) -> float:
    m, moe = cfg.model, cfg.moe
    h, s, L = m.hidden_size, cfg.data.seq_len, m.num_layers
    kv = h // m.num_attention_heads * (m.num_query_groups or m.num_attention_heads)
    attn = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 2 * s * h
    n_moe = len(range(0, L, m.moe_every))
    dense = 3 * 2 * h * cfg.dense_ffn_hidden_size
    moe_ffn = moe.top_k * 3 * 2 * h * cfg.moe_ffn_hidden_size + 2 * h * moe.num_experts
    vocab = m.vocab_size or 0
    return 3.0 * (L * attn + (L - n_moe) * dense + n_moe * moe_ffn + 2 * h * vocab)


def bench_one(cfg, impl: str, warmup: int, steps: int) -> dict:
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.stats import build_moe_stats
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train_step import TrainStep

    cfg.moe.impl = impl
    cfg.parallel.etp = None
    cfg.validate()
    pctx = init_parallel(cfg.parallel, cfg.moe.num_experts, cfg.train.device, cfg.train.seed)
    try:
        cuda = pctx.device.type == "cuda"
        prec = cfg.train.precision
        dtype = torch.bfloat16 if prec == "bf16" or (prec == "auto" and cuda) else torch.float32
        model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
        step_fn = TrainStep(model, build_optimizer(model, cfg.optim), cfg, pctx, dtype,
                            moe_stats=build_moe_stats(model, cfg, pctx.device))
        n_micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        batch = [torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size,
                                                         cfg.data.seq_len + 1), generator=gen)
                 for _ in range(n_micro)]
        for i in range(warmup):
            step_fn(batch, i + 1)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for i in range(steps):
            metrics = step_fn(batch, warmup + i + 1)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / steps
        else:
            seconds = (time.perf_counter() - t0) / steps
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        return {"impl": impl, "device": str(pctx.device), "dtype": str(dtype).split(".")[-1],
                "step_time_s": seconds, "tokens_per_s": tokens / seconds,
                "loss": float(metrics["loss"]),
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from locmoe_train.config import load_config, parse_override_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--impls", default="locmoe,megatron")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default="bench_train.json")
    args, rest = ap.parse_known_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_config(args.config, parse_override_args(rest) + ["parallel.ep=1", "parallel.tp=1"])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 32000
    flops = flops_per_token(cfg)
    results = []
    for impl in args.impls.split(","):
        r = bench_one(cfg, impl, args.warmup, args.steps)
        r["model_tflops"] = flops * r["tokens_per_s"] / 1e12
        r["mfu"] = r["model_tflops"] / args.peak_tflops
        results.append(r)
    base = results[0]
    print(f"{args.config}: {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens/step, "
          f"{flops / 1e9:.3f} GFLOP/token (train), peak {args.peak_tflops:g} TFLOP/s")
    print("| impl | device | step (ms) | tokens/s | TFLOP/s | MFU | peak mem (GB) | speed vs "
          f"{base['impl']} |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        print(f"| {r['impl']} | {r['device']} {r['dtype']} | {r['step_time_s'] * 1e3:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.2f} | {r['mfu']:.4f} | {mem} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "flops_per_token": flops,
                   "peak_tflops": args.peak_tflops, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
