"""LocMoE+ expert capacity C and the controller that shrinks it (docs/locmoe_plus.md).

Legend: T tokens on this rank, E experts, K experts per token, s = seq_len.

Owns the value of C (tokens per expert per sequence of ``s`` tokens) for one
MoE layer under ``moe.capacity.policy``: ``controller`` re-estimates it every
``interval`` optimizer steps (after ``warmup``) from the latest training
micro-batch's affinities with the statistic ``moe.capacity.statistic``
(``capacity_stats.py``), smooths it with an EMA, rounds it up to ``multiple``,
keeps it between the floor and C0 and never raises it except through the
rollback guard (``capacity_guard.py``); ``fixed`` keeps C0; ``linear_decay``
follows a schedule. With ``moe.capacity.estimator: loss_probe`` the
re-estimation takes instead the C that the loss probe chose for all layers
(``capacity_probe.py``, run by the MoE runtime just before ``step_end``):
no EMA, and C goes up as well as down. Also the controller's checkpoint state.

Does not own routing (the router asks ``local_capacity`` for its rank's share),
when ``observe``/``record_loss``/``step_end`` are called (the trainer), how
gauges are logged, or which process group the statistics are reduced over
(passed in: every rank whose tokens share this C, usually the whole world).

Every rank must call ``step_end`` after every optimizer step: collectives
happen only at steps fixed by the config and the (identical) cut history, and
decisions use only all-reduced values, so all ranks hold the same C. A
re-estimation costs three or four all-reduces of at most 4E numbers and a
few host syncs, a cut's check one all-reduce of 4 W numbers; other
steps cost nothing (losses stay on device).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from locmoe_train.moe.config import CapacityConfig
from locmoe_train.errors import UserError
from locmoe_train.moe.capacity_guard import RollbackGuard
from locmoe_train.moe.capacity_stats import c_min_lower_bound, measure


def _ceil(x: float) -> int:
    # Round to 9 decimals first so float noise does not add a slot (as routing.expert_capacity).
    return math.ceil(round(x, 9))


def _round_up(x: float, multiple: int) -> int:
    return multiple * _ceil(x / multiple)


class CapacityController:
    """C for one MoE layer; see the module docstring and ``CapacityConfig``."""

    def __init__(self, cfg: CapacityConfig, seq_len: int, top_k: int, num_experts: int,
                 hidden_size: int, max_steps: int):
        assert cfg.interval >= 1 and cfg.rollback_window >= 1, cfg
        self.cfg = cfg
        self.seq_len, self.top_k, self.num_experts = seq_len, top_k, num_experts
        self.hidden_size, self.max_steps = hidden_size, max_steps
        self.c0 = max(1, _ceil(cfg.factor0 * seq_len * top_k / num_experts))
        self.c_floor = max(1, _ceil(cfg.min_fraction * self.c0))
        self.multiple = cfg.resolved_multiple(self.c0)
        self.capacity = self.c0
        self.c_ema = float(self.c0)
        self.target = self.c0
        nan = float("nan")  # not measured yet
        self.q, self.c_min, self.delta0, self.estimate = nan, nan, nan, nan
        self.probe_rise = nan  # loss_probe: the loss rise at the C it chose, against C0
        self._probed: Optional[int] = None  # the probe's choice for this step's step_end
        # Cuts made so far (step, old, new); rollbacks are events, not entries here.
        self.cuts: list[dict] = []
        self.guard = RollbackGuard(cfg)
        self._observed: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ---- what the router and trainer call --------------------------------------
    def local_capacity(self, num_local_tokens: int) -> int:
        """This rank's share of C for ``num_local_tokens`` tokens: ``ceil(C * T / s)``, >= 1."""
        return max(1, -(-self.capacity * num_local_tokens // self.seq_len))

    def observe(self, affinity_TE: torch.Tensor, choice: torch.Tensor) -> None:
        """Keep the latest *training* micro-batch's affinities and token choices (no copy):
        top-1 ids [T] or top-K ids [T, K], best first."""
        self._observed = (affinity_TE.detach(), choice.detach())
        if not self.guard.losses:
            self.guard.device = affinity_TE.device

    def probe_due(self, step: int) -> bool:
        """Whether ``step`` re-estimates C with the loss probe (a host-side test)."""
        cfg = self.cfg
        return (cfg.policy == "controller" and cfg.estimator == "loss_probe"
                and step >= cfg.warmup and step % cfg.interval == 0)

    def round_up(self, c: float) -> int:
        """``c`` rounded up to ``moe.capacity.multiple``, as every C is."""
        return _round_up(c, self.multiple)

    def probed(self, chosen: int, rises: dict[int, float]) -> None:
        """The loss probe's choice for this step (identical on every rank) and each
        candidate's relative loss rise; applied by the next ``step_end``."""
        self._probed = chosen
        self.probe_rise = rises[chosen]

    def record_loss(self, step: int, loss) -> None:
        """This rank's training loss of optimizer step ``step`` (a device scalar; no sync)."""
        if self.cfg.policy == "controller":
            self.guard.record(step, loss)

    def step_end(self, step: int, group=None, ok: Optional[torch.Tensor] = None
                 ) -> Optional[dict]:
        """Update C after optimizer step ``step``; returns an event dict when C changed.

        ``ok`` false (a device bool, the same on every rank): the non-finite guard
        skipped the step, and C stays. It is read only on steps that would change
        C or measure (they reach the host anyway), so other steps stay sync-free."""
        if self.cfg.policy == "fixed":
            return None
        if self.cfg.policy == "linear_decay":
            new = self._scheduled(step)
            if new == self.capacity or (ok is not None and not bool(ok)):
                return None
            self.target = new
            return self._set(step, new, "schedule")
        due = (self.guard.due(step) or
               (step >= self.cfg.warmup and step % self.cfg.interval == 0))
        if not due or (ok is not None and not bool(ok)):
            return None
        restore = self.guard.check(step, self.cfg.interval, group)
        if restore is not None:
            # The EMA restarts from the restored C and stays there while the guard holds.
            self.c_ema = float(restore)
            return self._set(step, restore, "rollback")
        if step < self.cfg.warmup or step % self.cfg.interval:
            return None
        if self.cfg.estimator == "loss_probe":
            return self._apply_probe(step)
        return self._reestimate(step, group)

    def gauges(self) -> dict[str, float]:
        """Latest values, identical on every rank (NaN: not measured yet or not applicable)."""
        gauges = {"capacity": float(self.capacity), "capacity_target": float(self.target),
                  "capacity_estimate": self.estimate, "q": self.q, "c_min": self.c_min,
                  "delta0": self.delta0}
        if self.cfg.estimator == "loss_probe":
            gauges["probe_rise"] = self.probe_rise
        return gauges

    # ---- policies ---------------------------------------------------------------
    def _scheduled(self, step: int) -> int:
        cfg = self.cfg
        span = cfg.decay_fraction * self.max_steps
        frac = 1.0 if span <= 0 else min(1.0, max(0.0, step / span))
        factor = cfg.factor0 + (cfg.decay_to - cfg.factor0) * frac
        return max(1, _ceil(factor * self.seq_len * self.top_k / self.num_experts))

    def _set(self, step: int, new: int, reason: str) -> Optional[dict]:
        old, self.capacity = self.capacity, new
        if new == old:
            return None
        return {"step": step, "old": old, "new": new, "reason": reason}

    def _reestimate(self, step: int, group) -> Optional[dict]:
        if self._observed is None:
            # Another rank may be inside the all-reduce already: fail loudly, not hang quietly.
            raise RuntimeError(f"capacity controller: step {step} re-estimates C but observe() "
                               f"was never called on a training micro-batch")
        affinity_TE, choice = self._observed
        cfg = self.cfg
        m = measure(cfg.statistic, affinity_TE, choice, seq_len=self.seq_len, rho=cfg.rho,
                    local_capacity=self.local_capacity(affinity_TE.shape[0]), group=group)
        # As a gauge, "no cut" (inf) reads as the most an expert could take: s * K per sequence.
        self.estimate = min(m.estimate, float(self.seq_len * self.top_k))
        self.q, self.delta0 = m.q, m.delta0
        self.c_min = c_min_lower_bound(self.delta0, self.hidden_size, self.num_experts)
        estimate = self.c0 if math.isinf(m.estimate) else _ceil(m.estimate)
        self.target = min(self.c0, max(self.c_floor, estimate))
        if self.guard.holding(step):
            return None  # backing off after a rollback: measure, but neither smooth nor cut
        self.c_ema = cfg.ema * self.c_ema + (1 - cfg.ema) * self.target
        new = max(self.c_floor, min(self.capacity, _round_up(self.c_ema, self.multiple)))
        if new >= self.capacity:
            return None
        self.guard.on_cut(step, self.capacity, new)
        self.cuts.append({"step": step, "old": self.capacity, "new": new})
        return self._set(step, new, "reestimate")

    def _apply_probe(self, step: int) -> Optional[dict]:
        """C becomes the probe's choice: up at once when a cut costs, down unless the
        rollback guard is backing off. A raise supersedes the cuts awaiting their check."""
        if self._probed is None:
            raise RuntimeError(f"capacity controller: step {step} re-estimates C with "
                               f"moe.capacity.estimator=loss_probe but no probe ran: the MoE "
                               f"runtime's step_end needs the train step's probe closure")
        chosen, self._probed = self._probed, None
        self.target, self.estimate = chosen, float(chosen)
        if chosen > self.capacity:
            self.guard.pending.clear()
            self.c_ema = float(chosen)
            return self._set(step, chosen, "probe_raise")
        if chosen == self.capacity or self.guard.holding(step):
            return None
        self.c_ema = float(chosen)
        self.guard.on_cut(step, self.capacity, chosen)
        self.cuts.append({"step": step, "old": self.capacity, "new": chosen})
        return self._set(step, chosen, "reestimate")

    # ---- checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints/floats (one host sync). ``loss_window`` is this rank's own; all
        other entries are identical on every rank."""
        return {
            "policy": self.cfg.policy, "statistic": self.cfg.statistic,
            "estimator": self.cfg.estimator, "probe_rise": self.probe_rise, "c0": self.c0,
            "capacity": self.capacity, "c_floor": self.c_floor, "c_ema": self.c_ema,
            "target": self.target, "estimate": self.estimate, "q": self.q,
            "c_min": self.c_min, "delta0": self.delta0, "cuts": [dict(c) for c in self.cuts],
            **self.guard.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Also loads an older controller's state: missing keys keep their defaults, and
        its raised floor (rollbacks used to raise it for good) is not kept."""
        if sd["policy"] != self.cfg.policy or sd["c0"] != self.c0:
            raise UserError(
                f"the checkpoint's capacity state was made with moe.capacity.policy="
                f"{sd['policy']!r} and C0={sd['c0']}, but this run has policy="
                f"{self.cfg.policy!r} and C0={self.c0}: resume with the same policy, "
                f"capacity factor0, seq_len, top_k and num_experts, or start a fresh run.")
        self.capacity, self.target = int(sd["capacity"]), int(sd["target"])
        self.c_ema = float(sd["c_ema"])
        self.q, self.c_min, self.delta0 = float(sd["q"]), float(sd["c_min"]), float(sd["delta0"])
        self.estimate = float(sd.get("estimate", float("nan")))
        self.probe_rise = float(sd.get("probe_rise", float("nan")))
        self.cuts = [dict(c) for c in sd["cuts"]]
        self.guard.load_state_dict(sd, self.capacity)
