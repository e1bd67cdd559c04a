"""LocMoE+ expert capacity C and the controller that shrinks it (METHOD.md section 3).

Legend: T tokens on this rank, E experts, s = seq_len.

Owns the value of C (tokens per expert per sequence of ``s`` tokens) for one
MoE layer under ``moe.capacity.policy``: ``controller`` re-estimates it every
``interval`` optimizer steps from the latest training micro-batch's affinities
and rolls a cut back when the training loss worsens; ``fixed`` keeps C0;
``linear_decay`` follows a schedule. Also the statistics behind it (q, the
median affinities, delta_0 and LocMoE's C_min diagnostic) and the controller's
checkpoint state.

Does not own routing (the router asks ``local_capacity`` for its rank's share),
when ``observe``/``record_loss``/``step_end`` are called (the trainer), how
gauges are logged, or which process group the statistics are reduced over
(passed in: every rank whose tokens share this C, usually the whole world).

Every rank must call ``step_end`` after every optimizer step: collectives
happen only at steps fixed by the config and the (identical) cut history, and
decisions use only all-reduced values, so all ranks hold the same C. A
re-estimation step costs two or three all-reduces of 2E+2 numbers or fewer and
a few host syncs; other steps cost nothing (losses stay on device).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from locmoe_train.config import CapacityConfig
from locmoe_train.errors import UserError

# c_min_lower_bound's ceiling: past delta_0 ~ 0.1 at d = 4096 the bound is astronomically
# large (and 1/(n p) overflows once erfc underflows); a finite cap keeps the gauge loggable.
C_MIN_CAP = 1e12

# Fraction of the top-1 affinities below delta_0 (METHOD: the 5th percentile).
DELTA0_QUANTILE = 0.05


def _ceil(x: float) -> int:
    # Round to 9 decimals first so float noise does not add a slot (as routing.expert_capacity).
    return math.ceil(round(x, 9))


def _round_up(x: float, multiple: int) -> int:
    return multiple * _ceil(x / multiple)


def c_min_lower_bound(delta0: float, hidden_size: int, num_experts: int) -> float:
    """LocMoE's capacity bound ``C_min >= 1 / (n p)``, a diagnostic, never used as C.

    ``p`` is the fraction of the unit sphere in ``d`` dimensions with
    ``|cos| >= delta0`` to a fixed direction, approximated by
    ``erfc(sqrt(delta0^2 d / (2 - delta0^2)))``. ``delta0 <= 0`` gives ``p = 1``
    (``1/n``); the result is capped at ``C_MIN_CAP`` (1e12), which it reaches
    around ``delta0 = 0.11`` at d = 4096, n = 8.
    """
    if delta0 <= 0:
        p = 1.0
    else:
        d2 = min(delta0, 1.0) ** 2  # a cosine; the clamp keeps 2 - d2 >= 1
        p = math.erfc(math.sqrt(d2 * hidden_size / (2.0 - d2)))
    if p <= 1.0 / (num_experts * C_MIN_CAP):
        return C_MIN_CAP
    return 1.0 / (num_experts * p)


def _group_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _sorted_quantile(sorted_x: torch.Tensor, n: torch.Tensor, frac: float) -> torch.Tensor:
    """Quantile ``frac`` of each column's first ``n`` sorted entries (linear interpolation).

    ``sorted_x`` is [T, E] sorted along dim 0 with the wanted values first; columns
    with ``n = 0`` give 0. ``frac = 0.5`` is the usual median (mean of the two middles).
    """
    pos = (n.clamp(min=1) - 1).to(torch.float64) * frac
    lo = pos.floor().long()
    hi = pos.ceil().long()
    w = pos - lo
    x_lo = sorted_x.gather(0, lo[None]).squeeze(0)
    x_hi = sorted_x.gather(0, hi[None]).squeeze(0)
    out = x_lo + (x_hi - x_lo) * w
    return torch.where(n > 0, out, torch.zeros_like(out))


@torch.no_grad()
def _reduced_statistics(affinity_TE: torch.Tensor, top1_T: torch.Tensor, group=None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_E, m_E, delta0)`` in float64, identical on every rank of ``group``.

    Two all-reduces: the count-weighted per-rank medians and delta_0 percentiles,
    then the outsider counts against the agreed medians.
    """
    aff_TE = affinity_TE.detach().to(torch.float64)
    T, E = aff_TE.shape
    dev = aff_TE.device
    ins_TE = top1_T.detach().to(dev)[:, None] == torch.arange(E, device=dev)[None, :]
    n_ins_E = ins_TE.sum(0)
    if T > 0:
        # Non-members sort to the end, so each column's first n_ins entries are its ins values.
        sorted_TE = aff_TE.masked_fill(~ins_TE, math.inf).sort(dim=0).values
        m_E = _sorted_quantile(sorted_TE, n_ins_E, 0.5)
        top1_aff_T1 = aff_TE.gather(1, top1_T.detach().to(dev).long()[:, None]).sort(dim=0).values
        delta0 = _sorted_quantile(top1_aff_T1, torch.tensor([T], device=dev), DELTA0_QUANTILE)[0]
    else:
        m_E = torch.zeros(E, dtype=torch.float64, device=dev)
        delta0 = torch.zeros((), dtype=torch.float64, device=dev)
    n_ins_E = n_ins_E.to(torch.float64)
    out_E = T - n_ins_E
    distributed = _group_size(group) > 1
    if distributed:
        # A median does not all-reduce; the count-weighted mean of the per-rank medians
        # (and likewise of the per-rank percentiles) is our agreed stand-in.
        buf = torch.cat([n_ins_E * m_E, n_ins_E, torch.stack([T * delta0]),
                         torch.tensor([float(T)], dtype=torch.float64, device=dev)])
        dist.all_reduce(buf, group=group)
        n_ins_E = buf[E:2 * E]
        m_E = torch.where(n_ins_E > 0, buf[:E] / n_ins_E.clamp(min=1), torch.zeros_like(n_ins_E))
        delta0 = buf[2 * E] / buf[2 * E + 1].clamp(min=1)
    ge_E = ((aff_TE >= m_E[None, :]) & ~ins_TE).sum(0).to(torch.float64)
    if distributed:
        buf = torch.cat([ge_E, out_E])
        dist.all_reduce(buf, group=group)
        ge_E, out_E = buf[:E], buf[E:]
    # An expert nobody chose (or that everybody chose) says nothing about capacity.
    q_E = torch.where((n_ins_E > 0) & (out_E > 0), ge_E / out_E.clamp(min=1),
                      torch.zeros_like(ge_E))
    return q_E, m_E, delta0


def estimate_q(affinity_TE: torch.Tensor, top1_T: torch.Tensor, group=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """LocMoE+'s out-ranking rate per expert, ``(q_E, m_E)`` in float64.

    ``ins_i`` = tokens whose top-1 expert is i, ``m_i`` = median of
    ``affinity[t, i]`` over ``ins_i``, ``q_i`` = fraction of the tokens outside
    ``ins_i`` with ``affinity[t, i] >= m_i``. Over several ranks (``group``, or the
    default group when it is None and torch.distributed is initialised), ``m_i`` is
    the mean of the per-rank medians weighted by their ins counts (exact on one
    process, or when the per-rank medians agree), and ``q_i`` is then exact for that
    ``m_i``. Experts with no ins token anywhere get ``q_i = m_i = 0``.
    """
    q_E, m_E, _ = _reduced_statistics(affinity_TE, top1_T, group)
    return q_E, m_E


class CapacityController:
    """C for one MoE layer; see the module docstring and ``CapacityConfig``."""

    def __init__(self, cfg: CapacityConfig, seq_len: int, top_k: int, num_experts: int,
                 hidden_size: int, max_steps: int):
        assert cfg.interval >= 1 and cfg.multiple >= 1 and cfg.rollback_window >= 1, cfg
        self.cfg = cfg
        self.seq_len, self.top_k, self.num_experts = seq_len, top_k, num_experts
        self.hidden_size, self.max_steps = hidden_size, max_steps
        self.c0 = max(1, _ceil(cfg.factor0 * seq_len * top_k / num_experts))
        self.c_floor = max(1, _ceil(cfg.min_fraction * self.c0))
        self.capacity = self.c0
        self.c_ema = float(self.c0)
        self.target = self.c0
        nan = float("nan")  # not measured yet
        self.q, self.c_min, self.delta0 = nan, nan, nan
        # Cuts made so far (step, old, new): each cut lowers C, so at most c0 entries.
        self.cuts: list[dict] = []
        # The latest cut while its rollback check is due: before-window sums frozen at
        # the cut, after-window sums growing. Rank-local values (this rank's losses).
        self.pending: Optional[dict] = None
        # This rank's last `rollback_window` losses (step, float64 device scalar).
        self.loss_window: deque = deque(maxlen=cfg.rollback_window)
        self._observed: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._device = torch.device("cpu")

    # ---- what the router and trainer call --------------------------------------
    def local_capacity(self, num_local_tokens: int) -> int:
        """This rank's share of C for ``num_local_tokens`` tokens: ``ceil(C * T / s)``, >= 1."""
        return max(1, -(-self.capacity * num_local_tokens // self.seq_len))

    def observe(self, affinity_TE: torch.Tensor, top1_T: torch.Tensor) -> None:
        """Keep the latest *training* micro-batch's affinities and top-1 choices (no copy)."""
        self._observed = (affinity_TE.detach(), top1_T.detach())
        self._device = affinity_TE.device

    def record_loss(self, step: int, loss) -> None:
        """This rank's training loss of optimizer step ``step`` (a device scalar; no sync)."""
        if self.cfg.policy != "controller":
            return
        loss = torch.as_tensor(loss).detach().to(torch.float64)
        self._device = loss.device
        self.loss_window.append((step, loss))
        p = self.pending
        if p is not None and p["step"] < step <= p["step"] + self.cfg.rollback_window:
            p["after_sum"] = p["after_sum"] + loss.to(self._device)
            p["after_count"] += 1

    def step_end(self, step: int, group=None) -> Optional[dict]:
        """Update C after optimizer step ``step``; returns an event dict when C changed."""
        if self.cfg.policy == "fixed":
            return None
        if self.cfg.policy == "linear_decay":
            new = self._scheduled(step)
            self.target = new
            return self._set(step, new, "schedule")
        if step < self.cfg.warmup or step % self.cfg.interval:
            return None
        event = self._check_rollback(step, group)
        if event is not None:
            return event
        return self._reestimate(step, group)

    def gauges(self) -> dict[str, float]:
        """Latest values, identical on every rank (NaN: not measured yet)."""
        return {"capacity": float(self.capacity), "capacity_target": float(self.target),
                "q": self.q, "c_min": self.c_min, "delta0": self.delta0}

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
        q_E, _, delta0 = _reduced_statistics(*self._observed, group)
        cfg = self.cfg
        self.q = float(q_E.max()) if q_E.numel() else 0.0
        self.delta0 = float(delta0)
        self.c_min = c_min_lower_bound(self.delta0, self.hidden_size, self.num_experts)
        self.target = min(self.c0, max(self.c_floor, _ceil(2 * self.seq_len * self.q)))
        self.c_ema = cfg.ema * self.c_ema + (1 - cfg.ema) * self.target
        new = max(self.c_floor, min(self.capacity, _round_up(self.c_ema, cfg.multiple)))
        if new >= self.capacity or self.pending is not None:
            # No second cut while the previous one still awaits its rollback check
            # (only possible when rollback_window > interval): the check would mix them.
            return None
        before = [loss.to(self._device) for s, loss in self.loss_window
                  if s > step - cfg.rollback_window]
        self.pending = {
            "step": step, "old": self.capacity,
            "before_sum": (torch.stack(before).sum() if before
                           else torch.zeros((), dtype=torch.float64, device=self._device)),
            "before_count": len(before),
            "after_sum": torch.zeros((), dtype=torch.float64, device=self._device),
            "after_count": 0,
        }
        self.cuts.append({"step": step, "old": self.capacity, "new": new})
        return self._set(step, new, "reestimate")

    def _check_rollback(self, step: int, group) -> Optional[dict]:
        p = self.pending
        if p is None or step - p["step"] < self.cfg.rollback_window:
            return None
        self.pending = None  # each cut is checked once
        dev = self._device
        buf = torch.stack([p["before_sum"].to(dev), p["after_sum"].to(dev)]
                          + [torch.tensor(float(p[k]), dtype=torch.float64, device=dev)
                             for k in ("before_count", "after_count")])
        if _group_size(group) > 1:
            dist.all_reduce(buf, group=group)
        before_sum, after_sum, before_n, after_n = buf.tolist()
        if before_n == 0 or after_n == 0:
            return None  # no losses were recorded around the cut: nothing to judge by
        before, after = before_sum / before_n, after_sum / after_n
        if after <= before * (1 + self.cfg.rollback_tolerance):
            return None
        # The cut hurt: undo it and never cut below the restored value again. The EMA
        # restarts from the restored C; C_tgt is clipped to the raised floor from now on.
        self.c_floor = max(self.c_floor, p["old"])
        self.c_ema = float(p["old"])
        return self._set(step, p["old"], "rollback")

    # ---- checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints/floats (one host sync). ``loss_window`` and the sums in
        ``pending`` are this rank's own; all other entries are identical on every rank."""
        pending = None
        if self.pending is not None:
            p = self.pending
            pending = {"step": p["step"], "old": p["old"],
                       "before_sum": float(p["before_sum"]), "before_count": p["before_count"],
                       "after_sum": float(p["after_sum"]), "after_count": p["after_count"]}
        return {
            "policy": self.cfg.policy, "c0": self.c0, "capacity": self.capacity,
            "c_floor": self.c_floor, "c_ema": self.c_ema, "target": self.target,
            "q": self.q, "c_min": self.c_min, "delta0": self.delta0,
            "cuts": [dict(c) for c in self.cuts], "pending": pending,
            "loss_window": [[s, float(loss)] for s, loss in self.loss_window],
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["policy"] != self.cfg.policy or sd["c0"] != self.c0:
            raise UserError(
                f"the checkpoint's capacity state was made with moe.capacity.policy="
                f"{sd['policy']!r} and C0={sd['c0']}, but this run has policy="
                f"{self.cfg.policy!r} and C0={self.c0}: resume with the same policy, "
                f"capacity factor0, seq_len, top_k and num_experts, or start a fresh run.")
        self.capacity, self.c_floor = int(sd["capacity"]), int(sd["c_floor"])
        self.target = int(sd["target"])
        self.c_ema = float(sd["c_ema"])
        self.q, self.c_min, self.delta0 = float(sd["q"]), float(sd["c_min"]), float(sd["delta0"])
        self.cuts = [dict(c) for c in sd["cuts"]]
        f64 = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
        p = sd["pending"]
        self.pending = None if p is None else {
            "step": int(p["step"]), "old": int(p["old"]),
            "before_sum": f64(p["before_sum"]), "before_count": int(p["before_count"]),
            "after_sum": f64(p["after_sum"]), "after_count": int(p["after_count"])}
        self.loss_window = deque(((int(s), f64(v)) for s, v in sd["loss_window"]),
                                 maxlen=self.cfg.rollback_window)
