"""The rollback guard (moe/capacity_guard.py): noise is not harm, harm is undone, then retried.

Legend: E experts, s = seq_len, W = rollback_window.

The controller runs with its statistic replaced (``fixed_estimate``, estimate 0:
it cuts towards the floor at every re-estimation it may) and losses chosen by
each test. s = 1024, E = 8: C0 = 141, floor = 57, multiple 1, EMA 0.5.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from locmoe_train.config import CapacityConfig
from locmoe_train.moe.capacity import CapacityController
from locmoe_train.moe.capacity_guard import window_excess

E = 8


def controller(**kw) -> CapacityController:
    kw = {"warmup": 50, "interval": 50, "ema": 0.5, "multiple": 1, "rollback_window": 50, **kw}
    return CapacityController(CapacityConfig(**kw), 1024, 1, E, 64, 5000)


def run(ctl, steps, loss):
    """Drive the controller; ``loss(step, rng, ctl)`` gives the step's loss. Returns events."""
    rng, events = random.Random(0), []
    a_TE = torch.zeros(4, E)
    for step in steps:
        ctl.observe(a_TE, torch.zeros(4, dtype=torch.long))
        ctl.record_loss(step, torch.tensor(loss(step, rng, ctl)))
        ev = ctl.step_end(step)
        if ev:
            events.append((ev["step"], ev["reason"], ev["new"]))
    return events


def reasons(events):
    return [r for _, r, _ in events]


def test_window_excess_by_hand():
    # Differences +-1: sigma^2 = 1/2; se = sigma * sqrt(1/4 + 1/2).
    excess, se, level = window_excess([1.0, 2.0, 1.0, 2.0], [2.0, 2.0])
    assert (excess, level) == (0.5, 1.5)
    assert se == pytest.approx(math.sqrt(0.5) * math.sqrt(0.75))
    assert window_excess([3.0], [4.0]) == (1.0, 0.0, 3.0)  # no noise estimate: se 0
    # A steady trend adds nothing to the noise: differences are constant, sigma is their size.
    _, se, _ = window_excess([1.0, 0.9, 0.8, 0.7], [0.6])
    assert se == pytest.approx(0.1 / math.sqrt(2) * math.sqrt(1 / 4 + 1))


@pytest.mark.parametrize("curve", ["flat", "power_law", "exponential"])
def test_noisy_loss_without_harm_never_rolls_back(fixed_estimate, curve):
    shape = {"flat": lambda s: 3.0, "power_law": lambda s: 2.5 + 3 / math.sqrt(s),
             "exponential": lambda s: 2.5 + 2 * math.exp(-s / 150)}[curve]
    for noise in (0.02, 0.1, 0.3):
        ctl = controller(interval=25, warmup=25, ema=0.8)
        events = run(ctl, range(1, 2001), lambda s, r, c: shape(s) + r.gauss(0, noise))
        assert reasons(events).count("reestimate") >= 10
        assert "rollback" not in reasons(events), (noise, events)
    # A straight line fitted before each cut would have over-predicted the decline of
    # these convex curves and rolled good cuts back (docs/locmoe_plus.md).


def test_a_clear_loss_jump_rolls_back(fixed_estimate):
    ctl = controller()
    # +0.2 (7%) on top of noise 0.05 once C is below C0.
    events = run(ctl, range(1, 101),
                 lambda s, r, c: 3.0 + r.gauss(0, 0.05) + 0.2 * (c.capacity < c.c0))
    assert events == [(50, "reestimate", 99), (100, "rollback", 141)]
    check = ctl.guard.last_check
    assert check["excess"] == pytest.approx(0.2, abs=0.03) and check["band"] < 0.1


def test_small_but_certain_worsening_is_within_tolerance(fixed_estimate):
    # Noise 0.001: a 0.5% worsening is ~100 standard errors, yet below rollback_tolerance.
    for jump, rolled_back in [(0.015, False), (0.06, True)]:
        ctl = controller()
        events = run(ctl, range(1, 101),
                     lambda s, r, c: 3.0 + r.gauss(0, 0.001) + jump * (c.capacity < c.c0))
        assert ("rollback" in reasons(events)) == rolled_back, jump


def test_after_a_rollback_shrinking_resumes_with_a_growing_back_off(fixed_estimate):
    ctl = controller(rollback_holdoff=2)
    # Every cut below C0 hurts: each retry is rolled back, and the hold doubles.
    events = run(ctl, range(1, 1801),
                 lambda s, r, c: 3.0 + r.gauss(0, 0.05) + 0.2 * (c.capacity < c.c0))
    assert events[:4] == [(50, "reestimate", 99), (100, "rollback", 141),
                          (250, "reestimate", 99), (300, "rollback", 141)]
    cuts = [s for s, r, _ in events if r == "reestimate"]
    # Holds of 2, 4, 8 re-estimations (100, 200, 400 steps) after each rollback.
    assert cuts == [50, 250, 550, 1050]
    assert ctl.guard.streak == 4 and ctl.c_floor == 57  # the floor never moves


def test_a_kept_cut_resets_the_back_off(fixed_estimate):
    ctl = controller(rollback_holdoff=1)
    # Only the first cut hurts, and only while it is the newest (steps 51-100).
    events = run(ctl, range(1, 601),
                 lambda s, r, c: 3.0 + r.gauss(0, 0.05) + 0.3 * (50 < s <= 100))
    assert events[:3] == [(50, "reestimate", 99), (100, "rollback", 141),
                          (200, "reestimate", 99)]
    assert ctl.guard.streak == 0 and ctl.capacity < 99 and "rollback" not in reasons(events[2:])


def test_pending_cuts_do_not_block_the_next_and_roll_back_together(fixed_estimate):
    # W = 30 > interval 10: cuts at 10 and 20 happen while 10's check is pending. The jump
    # after the first cut rolls back at 40 to C0, and the later pending cuts go with it.
    ctl = controller(warmup=10, interval=10, rollback_window=30)
    events = run(ctl, range(1, 41),
                 lambda s, r, c: 3.0 + r.gauss(0, 0.05) + 0.3 * (s > 10))
    assert events == [(10, "reestimate", 99), (20, "reestimate", 78),
                      (30, "reestimate", 68), (40, "rollback", 141)]
    assert ctl.guard.pending == [] and ctl.guard.holding(41)
    # Without the jump every cut is checked on its own window and kept.
    ctl = controller(warmup=10, interval=10, rollback_window=30)
    events = run(ctl, range(1, 101), lambda s, r, c: 3.0 + r.gauss(0, 0.05))
    assert set(reasons(events)) == {"reestimate"} and len(events) >= 5


def test_no_losses_no_judgement(fixed_estimate):
    ctl = controller()
    a_TE = torch.zeros(4, E)
    for step in range(1, 201):
        ctl.observe(a_TE, torch.zeros(4, dtype=torch.long))
        ev = ctl.step_end(step)
        assert ev is None or ev["reason"] == "reestimate"
    assert ctl.capacity < ctl.c0 and ctl.guard.pending[-1]["step"] == 200
