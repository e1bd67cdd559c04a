"""The training loop: steps, periodic logging and validation, graceful stop.

Owns the order of events around ``TrainStep``: fetch a step's micro-batches,
run the step, every ``logging.log_interval`` steps reduce the accumulated
metrics across ranks (the only host sync in the loop) and write one record,
every ``train.eval_interval`` steps and at the end compute validation loss.

SIGINT/SIGTERM set a flag; ranks agree on it at the end of each step (one
tiny all-reduce), so every rank stops after the same step and nobody is left
waiting in a collective. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist

from locmoe_train.config import TrainConfig
from locmoe_train.parallel.state import ParallelContext


COUNT_KEYS = ("tokens_per_expert", "tokens_seen", "requested_slots", "unrouted", "same_node",
              "bytes_intra_node", "bytes_cross_node", "messages_cross_node")


class StopRequested:
    """Flag set by signal handlers; the loop stops after the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum


def agree_to_stop(stop: StopRequested, pctx: ParallelContext) -> bool:
    """True on every rank if any rank was signalled (then ``stop.signum`` is set everywhere)."""
    if pctx.world_size == 1:  # nobody to agree with: no device tensor, no host sync
        return stop.signum is not None
    flag = torch.tensor([1 if stop.signum is not None else 0], dtype=torch.int32,
                        device=pctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stopping = bool(flag.item())
    if stopping and stop.signum is None:
        stop.signum = signal.SIGTERM  # another rank was signalled
    return stopping


def _crash_for_tests(step: int, rank: int) -> None:
    """``LOCMOE_TEST_CRASH=STEP:RANK:MARKER`` kills that rank after that step, once
    (the marker file records that it happened). Lets tests exercise torchrun restarts."""
    spec = os.environ.get("LOCMOE_TEST_CRASH")
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if step == int(at_step) and rank == int(at_rank) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


class Trainer:
    def __init__(self, cfg: TrainConfig, pctx: ParallelContext, step_fn, loader,
                 eval_batches: list[torch.Tensor], sink=None, start_step: int = 0,
                 save=None):
        self.cfg, self.pctx, self.step_fn, self.loader = cfg, pctx, step_fn, loader
        self.eval_batches = eval_batches
        self.sink = sink
        self.step = start_step
        self.stop = StopRequested()
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.last_val_loss: float | None = None
        # save(step) writes a checkpoint (None: checkpointing off).
        self.save = save
        self.last_saved = start_step

    # ---- loop -------------------------------------------------------------
    def fit(self) -> str:
        """Train to ``train.max_steps``; returns "completed" or the stopping signal's name."""
        cfg = self.cfg
        self.stop.install()
        try:
            acc: dict[str, torch.Tensor] = {}
            steps_in_window, t0 = 0, time.perf_counter()
            while self.step < cfg.train.max_steps:
                micro_batches = self.loader.next_step()
                self.step += 1
                metrics = self.step_fn(micro_batches, self.step)
                _crash_for_tests(self.step, self.pctx.rank)
                for k, v in metrics.items():
                    acc[k] = acc[k] + v if k in acc else v.clone()
                steps_in_window += 1
                last = self.step == cfg.train.max_steps
                stopping = self._agree_to_stop()
                if self.step % cfg.logging.log_interval == 0 or self.step == 1 or last or stopping:
                    if self.pctx.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - t0
                    self._log_train(acc, metrics, steps_in_window, elapsed)
                    acc, steps_in_window, t0 = {}, 0, time.perf_counter()
                if (cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0) or last:
                    self._log_eval()
                    t0 = time.perf_counter()  # validation time is not training throughput
                exiting = self.step == cfg.train.exit_at_step
                interval = cfg.checkpoint.interval
                if (interval and self.step % interval == 0) or stopping or exiting or last:
                    self._checkpoint()
                    t0 = time.perf_counter()
                if stopping:
                    return signal.Signals(self.stop.signum).name
                if exiting:
                    return "exit_at_step"
            self._checkpoint()
            return "completed"
        finally:
            self.stop.uninstall()

    def _checkpoint(self) -> None:
        if self.save is not None and self.last_saved != self.step:
            path = self.save(self.step)
            self.last_saved = self.step
            if self.pctx.is_main and self.cfg.logging.console:
                print(f"saved checkpoint {path}", flush=True)

    def _agree_to_stop(self) -> bool:
        return agree_to_stop(self.stop, self.pctx)

    # ---- reductions and records ---------------------------------------------
    def _log_train(self, acc, metrics, n_steps: int, elapsed: float) -> None:
        pctx = self.pctx
        loss = acc["loss"] / n_steps
        record = {"step": self.step}
        if pctx.dp > 1:
            dist.all_reduce(loss, group=pctx.dp_group)
            loss = loss / pctx.dp
        record["loss"] = loss.item()
        record["lr"] = float(metrics["lr"])
        record["grad_norm"] = metrics["grad_norm"].item()
        record["tokens_per_s"] = self.tokens_per_step * n_steps / max(elapsed, 1e-9)
        record["step_time_s"] = elapsed / n_steps
        if "moe/tokens_per_expert" in acc:
            record.update(self._moe_record(acc, n_steps))
            events = self.step_fn.moe_stats.pop_events()
            if events:
                record["capacity_events"] = events
        if pctx.is_main and self.sink is not None:
            self.sink.write(record)

    def _moe_record(self, acc, n_steps: int) -> dict:
        pctx = self.pctx
        counts = {k: acc[f"moe/{k}"] for k in COUNT_KEYS if f"moe/{k}" in acc}
        aux_names = [k for k in acc if k.startswith("moe/") and k[4:] not in COUNT_KEYS]
        aux = torch.stack([acc[k] / n_steps for k in aux_names]) if aux_names else None
        if pctx.world_size > 1:
            for v in counts.values():
                dist.all_reduce(v)
            if aux is not None:
                # megatron's convention: per-rank values are partial over the TP
                # (sequence-parallel) group; sum them there, average over DP.
                dist.all_reduce(aux)
                aux = aux / pctx.dp
        cfg = self.cfg.moe
        layers = self.step_fn.moe_stats.layers
        gauges = self.step_fn.moe_stats.gauges()
        out: dict = {"moe": {}}
        imbalances = []
        for i, layer in enumerate(layers):
            tpe = counts["tokens_per_expert"][i]
            entry = {"tokens_per_expert": [int(c) for c in tpe.tolist()],
                     "max_over_mean": (tpe.max() / tpe.mean().clamp_min(1e-9)).item(),
                     "dropped_fraction": 1.0 - (tpe.sum() / counts["requested_slots"][i]
                                                .clamp_min(1e-9)).item(),
                     "unrouted_fraction": (counts["unrouted"][i] / counts["tokens_seen"][i]
                                           .clamp_min(1e-9)).item()}
            if "same_node" in counts:
                entry["same_node_share"] = (counts["same_node"][i] / tpe.sum().clamp_min(1e-9)).item()
            for key in ("bytes_intra_node", "bytes_cross_node", "messages_cross_node"):
                if key in counts:  # per step, summed over all ranks
                    entry[key] = counts[key][i].item() / n_steps
            if aux is not None:
                for j, name in enumerate(aux_names):
                    entry[name.removeprefix("moe/")] = aux[j][i].item()
            # NaN (not measured yet) becomes null: metrics.jsonl stays strict JSON.
            entry.update({k: (None if v != v else v) for k, v in gauges.get(layer, {}).items()})
            imbalances.append(entry["max_over_mean"])
            out["moe"][f"layer_{layer}"] = entry
        out["moe_imbalance"] = max(imbalances)
        if "bytes_cross_node" in counts:
            out["bytes_cross_node"] = counts["bytes_cross_node"].sum().item() / n_steps
            out["bytes_intra_node"] = counts["bytes_intra_node"].sum().item() / n_steps
        capacities = [g["capacity"] for g in gauges.values() if "capacity" in g]
        if capacities:
            out["moe_capacity"] = int(min(capacities))
        if aux is not None:
            weights = {"moe/load_balancing_loss": cfg.aux_loss_coeff, "moe/z_loss": cfg.z_loss_coeff,
                       "moe/locality_loss": cfg.locality_loss_coeff}
            out["aux_loss"] = sum(weights[k] * aux[j].sum().item()
                                  for j, k in enumerate(aux_names))
        return out

    def _log_eval(self) -> None:
        pctx = self.pctx
        loss = self.step_fn.evaluate(self.eval_batches)
        if pctx.dp > 1:
            dist.all_reduce(loss, group=pctx.dp_group)
            loss = loss / pctx.dp
        self.last_val_loss = loss.item()
        if pctx.is_main and self.sink is not None:
            self.sink.write({"step": self.step, "val_loss": self.last_val_loss,
                             "val_ppl": math.exp(min(self.last_val_loss, 50.0))})
