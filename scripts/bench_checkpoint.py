"""Checkpoint benchmark: what a save and a load cost each rank, old format against new.

    python scripts/bench_checkpoint.py --out docs/bench_checkpoint.json

Runs at world 4 on CPU (gloo), two layouts: DP=2 x EP=2 with the non-sharded
optimizer, and DP=4 with ZeRO-1 (``optim.distributed``). For each layout it
starts ``torchrun --nproc_per_node=4`` once with the code before per-rank
writing (``--old-ref``, default 15ada76, format 2: one writer per data-parallel
group, ZeRO-1 state gathered onto it; extracted with ``git archive``) and once
with this checkout (format 3), on the same model, seed and step. Each rank
builds the model, takes one training step (so that Adam's state exists), then:

* saves a checkpoint: wall time from a barrier to the return of the save (the
  slowest rank's is the save time), and the peak *extra* anonymous memory
  during it (``locmoe_train.memwatch.PeakMemory``: tensor storage, not page
  cache); afterwards the bytes of the files each rank wrote;
* with the new code, saves six more times with ``checkpoint.async``: the time the
  training loop is blocked (the ``save`` call, then the publish at the first
  step after which no rank is still writing; the ranks agree on that in the
  stop all-reduce every training step makes, as in ``trainer.py``). The first
  background save allocates its host buffers (``async_first_*``); the later
  ones reuse them, as every later save of a run does (``async_*``: the median
  of 5, per rank, the slowest rank's held against the target);
* loads the checkpoint into a fresh model and optimizer (that have taken a step,
  so their state exists before the measurement), with the same memory measure.

The old tree is given today's ``memwatch.py`` (the sampler; it did not exist
then). Targets (issue 24): the busiest rank writes at most 1.5 x total/world;
extra memory at save and at load at most the largest tensor a rank holds; the
async blocking time at most 25% of the synchronous save. ``--quick`` shrinks the
model for a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
         "model.ffn_hidden_size=1024", "moe.num_experts=8", "moe.top_k=2",
         "moe.ffn_hidden_size=512", "model.vocab_size=4096", "data.seq_len=64",
         "train.global_batch_size=8", "train.micro_batch_size=1", "optim.warmup_steps=1"]
QUICK = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "moe.ffn_hidden_size=64", "model.vocab_size=512"]
LAYOUTS = {"dp2_ep2": ["parallel.ep=2"], "dp4_zero1": ["parallel.ep=1", "optim.distributed=true"]}
# At most this many training steps run while a background save writes; then the loop
# waits for it (a save that needs longer counts its wait as blocked time).
ASYNC_STEPS = 30
ASYNC_REPEATS = 5


def _worker(args) -> None:
    """One rank (under torchrun): save, async save (new code), load; a JSON line per rank."""
    import torch
    import torch.distributed as dist

    from locmoe_train.checkpoint import Checkpointer
    from locmoe_train.config import load_config
    from locmoe_train.memwatch import PeakMemory
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train_step import TrainStep

    cfg = load_config(os.path.join(REPO, "configs", "quickstart_topk.yaml"), args.set)
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * pctx.dp)
    gen = torch.Generator().manual_seed(pctx.dp_rank)
    batch = [torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size,
                                                     cfg.data.seq_len + 1), generator=gen)
             for _ in range(n_micro)]

    def built():
        model = build_model(cfg, pctx, cfg.model.vocab_size, torch.float32)
        optimizer = build_optimizer(model, cfg.optim, pctx)
        step = TrainStep(model, optimizer, cfg, pctx, torch.float32,
                         moe=build_runtime(model, cfg, pctx))
        step(batch, 1)  # Adam's state exists from here on
        return model, optimizer, step

    model, optimizer, step_fn = built()
    parts = {"model": model, "optimizer": optimizer}
    out = {"rank": pctx.rank, "largest_tensor": max(p.numel() * p.element_size()
                                                    for p in model.parameters())}
    ckpt = Checkpointer(cfg, pctx)
    if hasattr(ckpt, "started"):  # the new code: as the trainer, clear unfinished saves first
        ckpt.resolve_resume()
    gc.collect()
    dist.barrier()
    t0 = time.perf_counter()
    with PeakMemory() as saving:
        path = ckpt.save(1, parts)
    out["save_s"] = time.perf_counter() - t0
    out["save_extra"] = saving.peak_extra
    saved = [p.detach().clone() for p in model.parameters()]  # training goes on below
    dist.barrier()
    mine = f"_rank{pctx.rank:05d}."  # shards_rankN.*, rng_rankN.pt; rank 0 also the rest
    out["written"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                         if mine in f or (pctx.rank == 0 and f in ("trainer.pt", "meta.json")))
    if hasattr(ckpt, "writing"):  # the new code: background saves while training goes on
        cfg.checkpoint.async_ = True
        first = _background_save(ckpt, parts, step_fn, batch, 2)
        # The later saves reuse the host buffers; 4 ranks time-sliced on 2 cores make one
        # save's figure noisy, so the median of ASYNC_REPEATS is kept.
        later = [_background_save(ckpt, parts, step_fn, batch, 3 + i)
                 for i in range(ASYNC_REPEATS)]
        steady = {k: sorted(r[k] for r in later)[len(later) // 2] for k in later[0]}
        out.update({f"async_first_{k}": v for k, v in first.items()})
        out.update({f"async_{k}": v for k, v in steady.items()})
        cfg.checkpoint.async_ = False
    fresh, fresh_opt, _ = built()
    gc.collect()
    dist.barrier()
    with PeakMemory() as loading:
        ckpt.load(path, {"model": fresh, "optimizer": fresh_opt})
    out["load_extra"] = loading.peak_extra
    out["same_weights"] = all(torch.equal(a, b) for a, b in zip(saved, fresh.parameters()))
    print("RESULT " + json.dumps(out), flush=True)
    destroy_parallel()


def _background_save(ckpt, parts, step_fn, batch, step: int) -> dict:
    """One ``checkpoint.async`` save of ``step`` while training steps run until it is
    published, polled as the trainer polls it: the ranks agree on whether any write is
    still going in the stop all-reduce that ends every step of the trainer (saving or
    not), and publish at the first step where none is. Blocked time: the ``save`` call
    plus the publish; the all-reduce is counted with the step, where the trainer has it."""
    import torch.distributed as dist

    from locmoe_train.trainer import StopRequested, agree_to_stop

    stop = StopRequested()
    dist.barrier()
    t0 = time.perf_counter()
    ckpt.save(step, parts)
    call = time.perf_counter() - t0
    published, steps, publish, stepping = None, 0, 0.0, 0.0
    while published is None:
        steps += 1
        t0 = time.perf_counter()
        step_fn(batch, 100 * step + steps)
        agree_to_stop(stop, ckpt.pctx, writing=ckpt.writing() and steps < ASYNC_STEPS)
        t1 = time.perf_counter()
        if not stop.writing:
            published = ckpt.wait()
        publish += time.perf_counter() - t1
        stepping += t1 - t0
    return {"blocked_s": call + publish, "save_call_s": call, "publish_s": publish,
            "steps": steps, "step_s": stepping / steps}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _old_tree(ref: str, where: str) -> str:
    """The package as of ``ref`` (and today's sampler) under ``where``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "locmoe_train"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    shutil.copy(os.path.join(REPO, "locmoe_train", "memwatch.py"),
                os.path.join(where, "locmoe_train", "memwatch.py"))
    return where


def _run(code_dir: str, settings: list[str], world: int, timeout: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=code_dir, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           os.path.abspath(__file__), "--worker", *[f"--set={s}" for s in settings]]
    # Run from the code's own directory so that it, not this checkout, is imported.
    r = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"benchmark ranks failed ({code_dir}):\n{r.stderr[-4000:]}")
    rows = [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines()
            if line.startswith("RESULT ")]
    return sorted(rows, key=lambda row: row["rank"])


def summarize(rows: list[dict]) -> dict:
    world = len(rows)
    total = sum(r["written"] for r in rows)
    out = {"world": world, "bytes_total": total,
           "bytes_per_rank": [r["written"] for r in rows],
           "busiest_over_even_share": max(r["written"] for r in rows) / (total / world),
           "save_s": max(r["save_s"] for r in rows),
           "save_extra_mib_per_rank": [round(r["save_extra"] / 2**20, 2) for r in rows],
           "load_extra_mib_per_rank": [round(r["load_extra"] / 2**20, 2) for r in rows],
           "largest_tensor_mib": round(max(r["largest_tensor"] for r in rows) / 2**20, 2),
           "loaded_exactly": all(r["same_weights"] for r in rows)}
    if "async_blocked_s" in rows[0]:
        for first in ("", "first_"):
            for key in ("blocked_s", "save_call_s", "publish_s", "step_s"):
                out[f"async_{first}{key}"] = max(r[f"async_{first}{key}"] for r in rows)
            out[f"async_{first}steps"] = rows[0][f"async_{first}steps"]
        out["async_blocked_over_sync_save"] = out["async_blocked_s"] / out["save_s"]
    return out


def targets(new: dict) -> dict:
    largest = new["largest_tensor_mib"]
    return {"busiest_at_most_1.5x_share": new["busiest_over_even_share"] <= 1.5,
            "save_extra_at_most_largest_tensor":
                max(new["save_extra_mib_per_rank"]) <= largest,
            "load_extra_at_most_largest_tensor":
                max(new["load_extra_mib_per_rank"]) <= largest,
            "async_blocked_at_most_25pct": new.get("async_blocked_over_sync_save", 1) <= 0.25}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench_checkpoint.json")
    ap.add_argument("--old-ref", default="15ada76",
                    help="the commit whose checkpoint code is the baseline (format 2); "
                         "none: measure this checkout only")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    ap.add_argument("--timeout", type=int, default=1200)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    report = {"command": "python scripts/bench_checkpoint.py " + " ".join(argv or sys.argv[1:]),
              "old_ref": args.old_ref, "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        codes = [("new", REPO)]
        if args.old_ref != "none":
            os.makedirs(os.path.join(tmp, "old"))
            codes.insert(0, ("old", _old_tree(args.old_ref, os.path.join(tmp, "old"))))
        for name in args.layouts.split(","):
            row = {}
            for which, code in codes:
                ckdir = os.path.join(tmp, f"{name}-{which}")
                settings = MODEL + (QUICK if args.quick else []) + LAYOUTS[name] + [
                    f"checkpoint.dir={ckdir}", "checkpoint.keep=20"]
                print(f"{name}: {which} code ...", flush=True)
                row[which] = summarize(_run(code, settings, args.world, args.timeout))
            row["targets_met"] = targets(row["new"])
            report["layouts"][name] = row
            print(json.dumps(row, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
