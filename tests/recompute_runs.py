"""A few real training steps under one ``train.recompute`` mode, for comparing the modes
(importable as ``recompute_runs``; used by tests/unit and tests/distributed).

``train_steps`` builds the model, optimizer and MoE runtime as the trainer does
and runs ``TrainStep`` on random tokens (the same on every call for a rank),
with dropout on, so the recompute must replay the RNG. It records what a run
could get wrong under recompute: every step's metrics, the first step's
gradients, the final parameters and buffers, the MoE runtime's checkpoint
state, gauges and events, how often each capacity controller observed a
micro-batch, and the per-expert counts each adaptive router got at step end.
``assert_same_run`` compares two such records.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.vocab_size=128", "moe.num_experts=4", "moe.top_k=2", "data.seq_len=16",
        "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
        "train.global_batch_size=4", "train.micro_batch_size=2", "optim.grad_clip=0",
        "optim.warmup_steps=1", "moe.z_loss_coeff=0.001"]

# Metric keys that are counts: they must be equal, not close.
COUNT_KEYS = ("moe/tokens_per_expert", "moe/tokens_seen", "moe/requested_slots",
              "moe/unrouted", "moe/same_node", "moe/bytes_intra_node", "moe/bytes_cross_node",
              "moe/messages_cross_node")


def _spy(obj, name: str, log: list, arg=None):
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        log.append(arg(*args) if arg else 1)
        return original(*args, **kwargs)
    setattr(obj, name, wrapped)


def train_steps(overrides: list[str], mode: str, steps: int = 3) -> dict:
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train import resolve_precision
    from locmoe_train.train_step import TrainStep

    cfg = load_config(None, BASE + overrides + [f"train.recompute={mode}"])
    # Under run_ranks the process group outlives the call: a second one on the same
    # store would not connect.
    owns_group = not dist.is_initialized()
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    try:
        _, dtype = resolve_precision(cfg, pctx)
        model = build_model(cfg, pctx, cfg.model.vocab_size, dtype)
        moe = build_runtime(model, cfg, pctx)
        step_fn = TrainStep(model, build_optimizer(model, cfg.optim), cfg, pctx, dtype, moe=moe)
        observed, step_counts = [], []
        for m in model.modules():
            if isinstance(m, MoELayer):
                if hasattr(m.router, "controller"):
                    _spy(m.router.controller, "observe", observed)
                if m.router.adapts_to_load:
                    _spy(m.router, "step_end", step_counts, lambda c, *a: c.clone())
        t = cfg.train
        n_micro = t.global_batch_size // (t.micro_batch_size * pctx.dp)
        gen = torch.Generator().manual_seed(100 + pctx.rank)
        torch.manual_seed(5)  # the dropout stream: the same in every mode
        out: dict = {"metrics": [], "n_micro": n_micro}
        for step in range(1, steps + 1):
            batch = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size,
                                                             cfg.data.seq_len + 1), generator=gen)
                     for _ in range(n_micro)]
            out["metrics"].append({k: v.detach().clone() for k, v in step_fn(batch, step).items()})
            if step == 1:
                out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                                if p.grad is not None}
        out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
        out.update(moe_state=moe.state_dict(), gauges=moe.gauges(), events=moe.pop_events(),
                   observe_calls=len(observed), step_end_counts=step_counts)
        return out
    finally:
        if owns_group:
            destroy_parallel()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()


def _same(a, b) -> bool:
    """Equality for plain state (dicts, lists, numbers), NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same_run(ref: dict, out: dict) -> None:
    """``out`` (with recompute) trained, counted and adapted exactly as ``ref`` (without)."""
    close = dict(rtol=1e-5, atol=1e-7)
    assert ref["grads"].keys() == out["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(out["grads"][name], g, **close, msg=lambda m: f"{name}: {m}")
    for step, (a, b) in enumerate(zip(ref["metrics"], out["metrics"]), 1):
        assert a.keys() == b.keys()
        for key in a:
            if key in COUNT_KEYS:
                assert torch.equal(a[key], b[key]), (step, key, a[key], b[key])
            else:
                torch.testing.assert_close(b[key], a[key], **close,
                                           msg=lambda m: f"step {step} {key}: {m}")
    for name, p in ref["params"].items():
        torch.testing.assert_close(out["params"][name], p, **close, msg=lambda m: f"{name}: {m}")
    for name, b in ref["buffers"].items():  # e.g. the aux-free expert bias
        torch.testing.assert_close(out["buffers"][name], b, rtol=0, atol=0,
                                   msg=lambda m: f"{name}: {m}")
    for key in ("moe_state", "gauges", "events", "observe_calls", "step_end_counts"):
        assert _same(ref[key], out[key]), (key, ref[key], out[key])
