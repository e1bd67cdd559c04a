"""The loss probe (``moe.capacity.estimator: loss_probe``): measure what a capacity cut costs.

At a re-estimation step the probe runs the step's last training micro-batch
forward again, without gradient, once per candidate capacity: C0, the
current C and ``probe_points`` capacities spread from the floor to C0. Every
LocMoE+ layer gets the same candidate at once (a joint decision). The
per-candidate losses, one vector per rank, are all-reduced in one call, so
every rank holds the same numbers and picks the same C (``choose``), against
the loss at the current C: up to the smallest larger candidate whose loss is
lower by more than ``probe_tolerance`` (the current cut costs), else down to
the smallest candidate such that it and every one above it cost at most
``probe_tolerance``. So C rises again as soon as a cut costs, and falls
while cuts are free.

Why joint, not per layer: one forward per candidate instead of one per
candidate and layer, and one tolerance for the whole model rather than one
per layer (per-layer tolerances add up). Layers that could go lower than the
others are held at the common C; see docs/locmoe_plus.md.

The extra forwards must leave no trace: they run in the same
``no_side_effects`` scope as an activation recompute (MoE layers count and
keep nothing, LocMoE+ observes nothing, dispatchers count no traffic), and
each starts from the same RNG state, which is put back afterwards, so
dropout masks are paired across candidates and the training RNG stream is
the one a run without the probe would have.

Does not own C or its history (``capacity.py``), when a probe is due (the
controllers say), or the micro-batch (the train step passes a closure).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from locmoe_train.model.recompute import no_side_effects, rng_states, set_rng_states


def candidates(c0: int, c_floor: int, points: int, round_up: Callable[[float], int],
               current: Sequence[int] = ()) -> list[int]:
    """The capacities to try, largest first: ``points`` spread evenly from the floor to
    C0 (both included), rounded up as C is, and the layers' current values."""
    span = c0 - c_floor
    grid = {min(c0, max(c_floor, round_up(c_floor + span * i / (points - 1))))
            for i in range(points)}
    return sorted(grid | {c0} | set(current), reverse=True)


def choose(capacities: Sequence[int], losses: Sequence[float], current: int,
           tolerance: float) -> tuple[int, dict[int, float]]:
    """The chosen C and every candidate's relative loss change against the current C's.

    Up first: the smallest larger candidate whose loss is lower by more than
    ``tolerance`` (the current C costs). Else down: walking from the current C,
    the smallest candidate such that it and every one between cost at most
    ``tolerance`` (a cheap candidate below a costly one is noise, not a free cut).
    NaN counts as harm. The reference is the current C, not C0: the model is
    trained at its current C, so any other C is one it has not adapted to, and
    against C0 a model trained at a lower C would look harmed by C0."""
    by_c = dict(zip(capacities, losses))
    ref = by_c[current]
    rises = {c: (by_c[c] - ref) / max(abs(ref), 1e-12) for c in sorted(by_c, reverse=True)}
    for c in sorted(c for c in rises if c > current):
        if rises[c] < -tolerance:
            return c, rises
    chosen = current
    for c in sorted((c for c in rises if c < current), reverse=True):
        if not rises[c] <= tolerance:
            break
        chosen = c
    return chosen, rises


@torch.no_grad()
def probe_losses(controllers, capacities: Sequence[int], forward_loss: Callable[[], torch.Tensor],
                 group=None) -> list[float]:
    """The group-mean loss of ``forward_loss()`` with every controller at each capacity."""
    saved = [c.capacity for c in controllers]
    rng = rng_states()
    losses = []
    try:
        with no_side_effects():
            for cap in capacities:
                for c in controllers:
                    c.capacity = cap
                set_rng_states(rng)
                losses.append(forward_loss().detach().to(torch.float64))
    finally:
        for c, cap in zip(controllers, saved):
            c.capacity = cap
        set_rng_states(rng)
    buf = torch.stack(losses)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(buf, group=group)
        buf = buf / dist.get_world_size(group)
    return buf.tolist()


def run_probe(controllers, forward_loss: Callable[[], torch.Tensor], group=None) -> None:
    """Probe once for all ``controllers`` (same C0, floor and config) and hand each the
    chosen C; their ``step_end`` then applies it."""
    first = controllers[0]
    assert all((c.c0, c.c_floor) == (first.c0, first.c_floor) for c in controllers)
    cfg = first.cfg
    # The layers share one C unless a checkpoint of the statistic estimator cut them
    # apart; then the largest is the reference (the smallest cut from there).
    current = max(c.capacity for c in controllers)
    caps = candidates(first.c0, first.c_floor, cfg.probe_points, first.round_up, [current])
    losses = probe_losses(controllers, caps, forward_loss, group)
    chosen, rises = choose(caps, losses, current, cfg.probe_tolerance)
    for c in controllers:
        c.probed(chosen, rises)
