"""Training-step benchmark: our MoE layer vs megatron-core's, same model, same invocation.

    python scripts/bench_train.py --config configs/bench/h100_small.yaml --out bench_train.json
    python scripts/bench_train.py --config configs/quickstart_topk.yaml --model.vocab_size=4096 \\
        --steps 3 --warmup 1 --variants ours,megatron          # tiny, on CPU

For each variant in ``--variants`` it builds the model from the config on one
process (GPU if available), runs ``--warmup`` then ``--steps`` full training
steps (forward, backward, grad sync, AdamW) on random tokens, timed with CUDA
events on GPU or ``perf_counter`` on CPU, and reports step time, tokens/s,
model TFLOP/s, MFU and peak GPU memory. Ratios are against the first variant.
For our layer it also records what the router did in the timed steps, unforced:
slots kept per expert and step (``tokens_per_expert``, per layer), the
max/mean load per layer and the fraction of slots a capacity dropped. The
JSON holds the environment (GPU, torch, CUDA, megatron-core versions).

It also reports the memory the optimizer holds on each rank between steps
(``optimizer_bytes_per_rank``: Adam's moments and steps, allocated on the first
step, and for the distributed optimizer its fp32 parameter slices and their
gradients; ``optimizer_bytes_held``: measured, the bytes of every tensor the
optimizer object reaches after the timed steps, model parameters left out).
Under ``torchrun --nproc_per_node=N`` the benchmark runs data-parallel (each
rank steps its share of the batch; rank 0 reports), so
``--optim.distributed=true`` shows the sharded optimizer's memory:

    torchrun --nproc_per_node=2 scripts/bench_train.py --config configs/quickstart.yaml \
        --variants ours:optim.distributed=true --steps 2 --warmup 1 --profile-steps 0

FLOPs per token, forward (training = 3x: backward costs twice the forward),
counting only the experts a token activates and including attention:
``L_attn * (2*h*(h + 2*kv) + 2*h*h + 2*2*s*h)`` (projections, then QK^T and
AV over the full s x s score matrix, as in Megatron's formula)
``+ L_dense * 3*2*h*f + L_moe * (k*3*2*h*f_moe + 2*h*E)`` (SwiGLU: gate, up and
down; the router) ``+ 2*h*V`` (output layer). MFU = achieved FLOP/s / peak
(``--peak-tflops``, 989 for H100 bf16 dense).

Variants (``--variants``, comma-separated; the first is the baseline of the
ratios) are names from ``VARIANTS`` below or ``name:key=value;key=value``
config overrides. ``ours`` is our MoE layer with SDPA attention; ``megatron``
is megatron-core's local spec (its MoELayer, SequentialMLP experts, unfused
attention), the reference of issue 7. ``locmoe_plus``, ``top2_dropless`` and
``top1_cf1.1`` compare routing on our layer.

Per-phase breakdown: after the timed steps, ``--profile-steps`` more steps run
under ``torch.profiler`` with named ranges (attention, router, dispatch,
experts, combine per MoE implementation; the train step's forward, backward,
grad sync and optimizer). Phase times are per step: on GPU the kernel time
launched inside each forward range, backward = all kernel time not in a
forward range, grad sync or the optimizer; on CPU the ranges' elapsed time.
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


# name -> config overrides applied on top of --config (and its CLI overrides).
VARIANTS = {
    "ours": ["moe.impl=native", "model.attention=sdpa"],
    "megatron": ["moe.impl=megatron", "model.attention=megatron"],
    "native": ["moe.impl=native"],
    "top2_dropless": ["moe.impl=native", "moe.router=topk", "moe.top_k=2",
                      "moe.capacity_factor=null"],
    # The two capacity-bounded variants use the padded (static-shape, sync-free) layout.
    "top1_cf1.1": ["moe.impl=native", "moe.router=topk", "moe.top_k=1",
                   "moe.capacity_factor=1.1", "moe.pad_to_capacity=true"],
    "locmoe_plus": ["moe.impl=native", "moe.router=locmoe_plus", "moe.top_k=1",
                    "moe.capacity.policy=fixed", "moe.capacity.factor0=0.66",
                    "moe.pad_to_capacity=true"],
}


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    from locmoe_train.errors import UserError

    out = []
    for item in spec.split(","):
        name, _, overrides = item.partition(":")
        if overrides:
            out.append((name, [o for o in overrides.split(";") if o]))
        elif name in VARIANTS:
            out.append((name, VARIANTS[name]))
        else:
            raise UserError(f"--variants: {name!r} is not one of {sorted(VARIANTS)}; or give "
                            f"'name:key=value;key=value'.")
    return out


class _Range:
    """Forward pre/post hooks that open and close a profiler range around a module."""

    def __init__(self, name: str):
        self.name, self.stack = name, []

    def pre(self, module, args):
        rf = torch.profiler.record_function(self.name)
        rf.__enter__()
        self.stack.append(rf)

    def post(self, module, args, output):
        self.stack.pop().__exit__(None, None, None)


def _wrap_method(obj, attr: str, name: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with torch.profiler.record_function(name):
            return fn(*a, **k)
    setattr(obj, attr, wrapped)


def annotate_phases(model) -> None:
    """Name the forward phases of every layer for the profiler (both MoE implementations)."""
    from megatron.core.transformer.attention import SelfAttention

    from locmoe_train.moe.layer import MoELayer

    def hook(module, name):
        r = _Range(name)
        module.register_forward_pre_hook(r.pre)
        module.register_forward_hook(r.post)

    for module in model.modules():
        if isinstance(module, SelfAttention):
            hook(module, "phase/attention")
        elif isinstance(module, MoELayer):  # ours
            hook(module.router, "phase/router")
            hook(module.experts, "phase/experts")
            _wrap_method(module.dispatcher, "dispatch", "phase/dispatch")
            _wrap_method(module.dispatcher, "combine", "phase/combine")
        elif type(module).__name__ == "MoELayer":  # megatron-core's
            _wrap_method(module, "route", "phase/router")
            _wrap_method(module, "preprocess", "phase/dispatch")
            _wrap_method(module, "dispatch", "phase/dispatch")
            hook(module.experts, "phase/experts")
            _wrap_method(module, "combine", "phase/combine")
            _wrap_method(module, "postprocess", "phase/combine")


FORWARD_PHASES = ("attention", "router", "dispatch", "experts", "combine")


def profile_phases(step_fn, batch, first_step: int, steps: int, cuda: bool) -> dict:
    """Milliseconds per step of each phase (see the module docstring for the attribution)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step_fn(batch, first_step + i)
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        key = evt.key
        if key.startswith("phase/") or key.startswith("train_step/"):
            us = evt.device_time_total if cuda else evt.cpu_time_total
            totals[key.split("/", 1)[1]] = us / 1e3 / steps
    out = {p: totals.get(p, 0.0) for p in FORWARD_PHASES}
    out["forward_other"] = max(0.0, totals.get("forward", 0.0) - sum(out.values()))
    out["grad_sync_clip"] = totals.get("grad_sync", 0.0)
    out["optimizer"] = totals.get("optimizer", 0.0)
    if cuda:
        kernels = sum(e.self_device_time_total for e in prof.key_averages()
                      if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / steps
        out["backward"] = max(0.0, kernels - totals.get("forward", 0.0)
                              - out["grad_sync_clip"] - out["optimizer"])
    else:
        out["backward"] = totals.get("backward", 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def routing_summary(per_step_LE: torch.Tensor, cfg) -> dict:
    """What the real router did in the timed steps: slots kept per expert and step (this
    process holds every expert), its max/mean per layer, and the slots a capacity dropped."""
    requested = cfg.train.global_batch_size * cfg.data.seq_len * cfg.moe.top_k
    kept_L = per_step_LE.sum(-1)
    return {"tokens_per_expert": [[round(float(c), 1) for c in row] for row in per_step_LE],
            "max_over_mean": [round(float(row.max() / row.mean().clamp_min(1e-9)), 3)
                              for row in per_step_LE],
            "dropped_fraction": round(float(1.0 - kept_L.mean() / requested), 4)}


def environment() -> dict:
    """The versions a GPU figure depends on."""
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": "cpu"}
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except ImportError:
        env["megatron_core"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["device_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def bench_one(cfg, impl: str, warmup: int, steps: int, profile_steps: int = 0) -> dict:
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer, held_bytes, state_bytes
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train import resolve_precision
    from locmoe_train.train_step import TrainStep

    cfg.validate()
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, cfg.train.device, cfg.train.seed)
    try:
        cuda = pctx.device.type == "cuda"
        _, dtype = resolve_precision(cfg, pctx)
        model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
        optimizer = build_optimizer(model, cfg.optim, pctx)
        step_fn = TrainStep(model, optimizer, cfg, pctx, dtype,
                            moe=build_runtime(model, cfg, pctx))
        n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * pctx.dp)
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
        routed = None  # [layers, E] slots kept per expert, summed on the device (no sync)
        for i in range(steps):
            metrics = step_fn(batch, warmup + i + 1)
            if "moe/tokens_per_expert" in metrics:
                counts = metrics["moe/tokens_per_expert"].detach()
                routed = counts.clone() if routed is None else routed + counts
        if cuda:
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / steps
        else:
            seconds = (time.perf_counter() - t0) / steps
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        result = {"variant": impl, "impl": cfg.moe.impl, "router": cfg.moe.router,
                  "attention": cfg.model.attention, "device": str(pctx.device),
                  "dtype": str(dtype).split(".")[-1],
                  "step_time_s": seconds, "tokens_per_s": tokens / seconds,
                  "loss": float(metrics["loss"]),
                  "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  "dp": pctx.dp, "distributed_optimizer": cfg.optim.distributed,
                  "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "parameter_tensors": sum(1 for p in model.parameters() if p.requires_grad)}
        # Optimizer state per rank: the stated size, and what the state tensors hold now.
        mine = (state_bytes(optimizer), held_bytes(optimizer, model))
        ranks = [mine] * pctx.world_size
        if pctx.world_size > 1:
            torch.distributed.all_gather_object(ranks, mine)
        result["optimizer_bytes_per_rank"] = [r[0] for r in ranks]
        result["optimizer_bytes_held"] = [r[1] for r in ranks]
        if routed is not None:
            result.update(routing_summary(routed.double().cpu() / steps, cfg))
        if profile_steps:
            annotate_phases(model)
            result["phases_ms"] = profile_phases(step_fn, batch, warmup + steps + 1,
                                                 profile_steps, cuda)
        return result
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from locmoe_train.config import load_config, parse_override_args
    from locmoe_train.errors import UserError
    from locmoe_train.parallel.launch import launched_rank, launched_world_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--variants", default="ours,megatron",
                    help=f"comma-separated: {', '.join(VARIANTS)} or name:key=v;key=v")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup")
    ap.add_argument("--profile-steps", type=int, default=2,
                    help="steps profiled for the per-phase breakdown (0: none)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default="bench_train.json")
    args, rest = ap.parse_known_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base_overrides = parse_override_args(rest) + ["parallel.ep=1", "parallel.tp=1"]
    variants = parse_variants(args.variants)
    if launched_world_size() > 1 and len(variants) > 1:
        # Each variant starts and ends its own process group; under torchrun the
        # rendezvous can be made once only.
        raise UserError(f"--variants: under torchrun give one variant per invocation, got "
                        f"{len(variants)} ({args.variants}).")
    results = []
    for name, overrides in variants:
        cfg = load_config(args.config, base_overrides + overrides)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = 32000
        # FLOPs count the experts a token is meant to use (top_k), the same for a
        # variant that drops tokens: its MFU is then what the routing buys.
        flops = flops_per_token(cfg)
        r = bench_one(cfg, name, args.warmup, args.steps, args.profile_steps)
        r["flops_per_token"] = flops
        r["model_tflops"] = flops * r["tokens_per_s"] / 1e12
        r["mfu"] = r["model_tflops"] / args.peak_tflops
        results.append(r)
    if launched_rank() not in (None, 0):
        return 0  # under torchrun rank 0 reports
    base = results[0]
    print(f"{args.config}: {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens/step, "
          f"peak {args.peak_tflops:g} TFLOP/s")
    print("| variant | device | step (ms) | tokens/s | GFLOP/token | TFLOP/s | MFU | peak mem (GB) "
          f"| speed vs {base['variant']} | optimizer state (MiB/rank) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        print(f"| {r['variant']} | {r['device']} {r['dtype']} | {r['step_time_s'] * 1e3:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['flops_per_token'] / 1e9:.3f} | "
              f"{r['model_tflops']:.2f} | {r['mfu']:.4f} | {mem} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{max(r['optimizer_bytes_per_rank']) / 2**20:.3f} (dp {r['dp']}"
              f"{', sharded' if r['distributed_optimizer'] else ''}) |")
    routed = [r for r in results if "tokens_per_expert" in r]
    if routed:
        print("\nrouting in the timed steps (the router as it is, nothing forced)\n"
              "| variant | max/mean load (worst layer) | dropped slots | layer 0 tokens/expert/step |"
              "\n|---|---:|---:|---|")
        for r in routed:
            print(f"| {r['variant']} | {max(r['max_over_mean']):.2f} | "
                  f"{r['dropped_fraction']:.1%} | "
                  f"{' '.join(f'{c:.0f}' for c in r['tokens_per_expert'][0])} |")
    if args.profile_steps:
        phases = list(results[0]["phases_ms"])
        print("\nper-phase ms/step (torch profiler)\n| variant | " + " | ".join(phases)
              + " |\n|---|" + "---:|" * len(phases))
        for r in results:
            print(f"| {r['variant']} | " + " | ".join(f"{r['phases_ms'][p]:.2f}" for p in phases)
                  + " |")
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "peak_tflops": args.peak_tflops,
                   "environment": environment(), "warmup": args.warmup, "steps": args.steps,
                   "command": " ".join(["python", "scripts/bench_train.py", *(argv or sys.argv[1:])]),
                   "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
