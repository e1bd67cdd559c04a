"""The capacity controller's rollback guard: tell a harmful cut from loss noise, then back off.

Owns the training losses a cut is judged by, the cuts awaiting their check, and
the back-off after a rollback (docs/locmoe_plus.md, "Rollback guard"). Each cut
at step c is checked once, at step c + W (W = ``moe.capacity.rollback_window``):

* the group-mean loss of each step in (c - W, c + W] is all-reduced once;
* the noise band is measured before the cut: the per-step noise sigma from
  the differences of consecutive pre-cut losses (blind to a smooth trend),
  hence the standard error ``se = sigma sqrt(1/n_pre + 1/n_post)`` of the
  difference of the two window means;
* the cut is harmful when the post-cut mean exceeds the pre-cut mean by more
  than ``rollback_sigma * se`` and by more than ``rollback_tolerance`` of the loss.

The pre-cut level is not extrapolated along the loss's trend: a straight line
over-predicts the decline of a convex loss curve and rolled back good cuts in
every simulated run. A falling loss therefore hides harm smaller than its own
decline over one window (small once training has slowed down).

A harmful cut is undone (with any later cut still awaiting its check), and no
cut is made for ``rollback_holdoff`` re-estimations, doubling with each
consecutive rollback; a cut that passes resets the streak. Cuts do not wait
for each other's checks.

Does not own C, when re-estimations happen, or the statistics (``capacity.py``).
The losses are this rank's; every decision uses all-reduced values at steps
fixed by the (identical) cut history, so all ranks decide alike.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist


def window_excess(pre: list[float], post: list[float]) -> tuple[float, float, float]:
    """``(excess, standard error, level)``: post-window mean minus pre-window mean.

    ``pre`` and ``post`` are consecutive per-step losses. The per-step noise comes
    from the pre-cut differences, ``sigma^2 = mean(diff^2) / 2``; with fewer than
    2 pre points it is unknown and the error is 0.
    """
    level = sum(pre) / len(pre)
    excess = sum(post) / len(post) - level
    diffs = [b - a for a, b in zip(pre, pre[1:])]
    if not diffs:
        return excess, 0.0, level
    sigma = math.sqrt(sum(d * d for d in diffs) / (2 * len(diffs)))
    return excess, sigma * math.sqrt(1 / len(pre) + 1 / len(post)), level


class RollbackGuard:
    """See the module docstring; ``cfg`` is the ``moe.capacity`` section."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.window = cfg.rollback_window
        # This rank's losses (step, float64 device scalar): a check's two windows.
        self.losses: deque = deque(maxlen=2 * self.window)
        # Cuts awaiting their check, oldest first: {"step", "old", "new"}.
        self.pending: list[dict] = []
        self.hold_until = 0  # no cut before this step
        self.streak = 0  # consecutive rollbacks
        self.last_check: Optional[dict] = None  # the latest verdict (not checkpointed)
        # Where the check's all-reduce runs: the losses' device, else the observed
        # affinities' (set by the controller), so that NCCL groups get a CUDA tensor.
        self.device = torch.device("cpu")

    def record(self, step: int, loss) -> None:
        loss = torch.as_tensor(loss).detach().to(torch.float64)
        self.device = loss.device
        self.losses.append((step, loss))

    def holding(self, step: int) -> bool:
        return step < self.hold_until

    def on_cut(self, step: int, old: int, new: int) -> None:
        self.pending.append({"step": step, "old": old, "new": new})

    def due(self, step: int) -> bool:
        """True when ``check(step)`` has a cut to judge (a host-side test, no sync)."""
        return bool(self.pending) and step >= self.pending[0]["step"] + self.window

    def check(self, step: int, interval: int, group=None) -> Optional[int]:
        """The capacity to restore when the oldest pending cut is due and harmful, else None."""
        if not self.due(step):
            return None
        cut = self.pending.pop(0)
        pre, post = self._group_losses(cut["step"], group)
        if not pre or not post:
            return None  # no losses around the cut: nothing to judge by
        excess, se, level = window_excess(pre, post)
        band = max(self.cfg.rollback_sigma * se, self.cfg.rollback_tolerance * abs(level))
        self.last_check = {"step": cut["step"], "excess": excess, "band": band}
        if excess <= band:
            self.streak = 0
            return None
        self.pending.clear()  # later cuts went below this one: undone with it
        self.streak += 1
        # Hold the next holdoff * 2^(streak - 1) re-estimations (multiples of interval).
        held = self.cfg.rollback_holdoff * 2 ** (self.streak - 1)
        self.hold_until = (step // interval + 1 + held) * interval
        return cut["old"]

    def _group_losses(self, cut_step: int, group):
        """The group-mean losses of the steps before and after ``cut_step`` (one all-reduce)."""
        lo, span = cut_step - self.window + 1, 2 * self.window
        dev = self.device
        buf = torch.zeros(2, span, dtype=torch.float64, device=dev)
        inside = [(s - lo, v) for s, v in self.losses if lo <= s < lo + span]
        if inside:
            idx = torch.tensor([i for i, _ in inside], device=dev)
            values = torch.stack([v.to(dev) for _, v in inside])
            # NaN marks a step the non-finite guard skipped: it counts in no window.
            finite = torch.isfinite(values)
            buf[0].index_add_(0, idx, torch.where(finite, values, 0.0))
            buf[1].index_add_(0, idx, finite.double())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(buf, group=group)
        sums, counts = buf.tolist()
        means = [(lo + i, s / c) for i, (s, c) in enumerate(zip(sums, counts)) if c > 0]
        return ([y for x, y in means if x <= cut_step], [y for x, y in means if x > cut_step])

    # ---- checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict:
        """``loss_window`` is this rank's own; the rest is identical on every rank."""
        return {"loss_window": [[s, float(v)] for s, v in self.losses],
                "pending": [dict(p) for p in self.pending],
                "hold_until": self.hold_until, "streak": self.streak}

    def load_state_dict(self, sd: dict, capacity: int) -> None:
        """Also reads an older controller's state: one pending cut or none, no back-off."""
        pending = sd.get("pending")
        if isinstance(pending, dict):  # before the guard: {"step", "old", sums...}
            pending = [{"step": pending["step"], "old": pending["old"], "new": capacity}]
        self.pending = [{k: int(p[k]) for k in ("step", "old", "new")} for p in pending or []]
        self.losses = deque(((int(s), torch.tensor(float(v), dtype=torch.float64))
                             for s, v in sd.get("loss_window", [])), maxlen=self.losses.maxlen)
        self.hold_until = int(sd.get("hold_until", 0))
        self.streak = int(sd.get("streak", 0))
