"""The LocMoE+ capacity controller: arithmetic, rounding, decisions, schedules, resume.

Legend: T tokens, D hidden size, E experts, s = seq_len.

Cases that pin exact decision arithmetic replace the statistic with a chosen
capacity estimate (the ``fixed_estimate`` fixture, tests/conftest.py); the
statistics themselves are tested in test_capacity_stats.py and the rollback
guard in test_capacity_guard.py.
Synthetic features come from ``moe/synthetic_features.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from locmoe_train.config import CapacityConfig
from locmoe_train.errors import UserError
from locmoe_train.moe import capacity_stats
from locmoe_train.moe.capacity import CapacityController
from locmoe_train.moe.capacity_stats import c_min_lower_bound
from locmoe_train.moe.routers.locmoe_plus import grap_affinity
from locmoe_train.moe.synthetic_features import clustered_features

S, E, D = 256, 8, 64


def observe(ctl: CapacityController, x_TD: torch.Tensor) -> None:
    a_TE = grap_affinity(x_TD, ctl.num_experts)
    ctl.observe(a_TE, a_TE.argmax(1))


def controller(seq_len=S, top_k=1, num_experts=E, max_steps=1000, **kw) -> CapacityController:
    kw = {"interval": 1, "warmup": 1, "rollback_window": 1, **kw}
    cfg = CapacityConfig(**kw)
    cfg.validate()
    return CapacityController(cfg, seq_len, top_k, num_experts, D, max_steps)


def run(ctl, steps, losses=None):
    """step_end over ``steps`` with a dummy observation; returns the events."""
    events = []
    a_TE = torch.zeros(4, ctl.num_experts)
    for step in steps:
        ctl.observe(a_TE, torch.zeros(4, dtype=torch.long))
        if losses is not None:
            ctl.record_loss(step, torch.tensor(losses(step)))
        ev = ctl.step_end(step)
        if ev:
            events.append(ev)
    return events


# ---- arithmetic -------------------------------------------------------------------


def test_c0_floor_and_local_capacity():
    ctl = controller(seq_len=128, top_k=2)
    assert ctl.c0 == 36  # ceil(1.1 * 128 * 2 / 8) = ceil(35.2)
    assert ctl.c_floor == 15  # ceil(0.4 * 36) = ceil(14.4)
    assert ctl.capacity == 36
    assert ctl.local_capacity(128) == 36
    assert ctl.local_capacity(512) == 144  # four sequences on this rank
    assert ctl.local_capacity(64) == 18  # half a sequence (sequence parallel)
    assert ctl.local_capacity(1) == 1  # ceil(36 / 128)
    assert ctl.local_capacity(0) == 1
    # 1.1 * 25 * 2 / 5 is 11.000000000000002 in floating point: still 11.
    assert controller(seq_len=25, top_k=2, num_experts=5).c0 == 11
    assert controller(seq_len=4, num_experts=64, factor0=1.0).c0 == 1  # never 0


def test_c_min_lower_bound():
    # The erfc approximation at d = 4096, n = 8: about 2.3 tokens at delta0 = 0.03 and
    # about 92 at 0.05 (METHOD says "about 2" and "about 100+").
    assert c_min_lower_bound(0.03, 4096, 8) == pytest.approx(2.2809, rel=1e-3)
    assert c_min_lower_bound(0.05, 4096, 8) == pytest.approx(91.59, rel=1e-3)
    assert c_min_lower_bound(0.0, 4096, 8) == 1 / 8
    assert c_min_lower_bound(-0.2, 4096, 8) == 1 / 8
    grid = [c_min_lower_bound(k / 100, 4096, 8) for k in range(0, 12)]
    assert all(a < b for a, b in zip(grid, grid[1:]))  # strictly increasing
    # Explosive: +0.02 in delta0 multiplies it by ~40, +0.05 by ~4e8.
    assert grid[5] / grid[3] > 30 and grid[8] / grid[3] > 1e5
    assert c_min_lower_bound(0.5, 4096, 8) == capacity_stats.C_MIN_CAP  # capped, finite
    assert c_min_lower_bound(1.0, 4096, 8) == capacity_stats.C_MIN_CAP
    # More experts share the discriminative tokens: a smaller bound.
    assert c_min_lower_bound(0.03, 4096, 64) == pytest.approx(grid[3] / 8)


def test_auto_multiple_is_relative_to_c0():
    # The largest power of two <= C0 / 16, in [1, 64].
    assert [controller(seq_len=s).multiple for s in (128, 256, 512, 1024, 4096, 8192, 65536)] \
        == [1, 2, 4, 8, 32, 64, 64]  # C0 = 18, 36, 71, 141, 564, 1127, 9012
    assert controller(seq_len=128, multiple=8).multiple == 8


@pytest.mark.parametrize("key,value,match", [
    ("multiple", 0, "moe.capacity.multiple=0 must be >= 1, or auto"),
    ("rho", 1.0, "moe.capacity.rho=1.0 must be in"),
    ("rho", -0.1, "moe.capacity.rho=-0.1"),
    ("rollback_sigma", -1.0, "moe.capacity.rollback_sigma=-1.0 must be >= 0"),
    ("rollback_tolerance", -0.5, "moe.capacity.rollback_tolerance=-0.5"),
    ("rollback_holdoff", 0, "moe.capacity.rollback_holdoff=0 must be >= 1"),
])
def test_config_errors_name_the_key_and_the_fix(key, value, match):
    with pytest.raises(UserError, match=match.replace("[", r"\[").replace(".", r"\.")):
        CapacityConfig(**{key: value}).validate()


def test_statistic_and_multiple_load_from_yaml_overrides():
    from locmoe_train.config import load_config
    cfg = load_config(None, ["moe.capacity.statistic=score_budget", "moe.capacity.multiple=4",
                             "moe.capacity.rho=0.25"])
    assert (cfg.moe.capacity.statistic, cfg.moe.capacity.multiple) == ("score_budget", 4)
    assert load_config(None, ["moe.capacity.multiple=auto"]).moe.capacity.multiple == "auto"
    with pytest.raises(UserError, match="moe.capacity.statistic='median'"):
        load_config(None, ["moe.capacity.statistic=median"])


# ---- controller decisions on synthetic features --------------------------------------


def _run_features(tightness, steps=30, seed=0, T=4096, **kw):
    g = torch.Generator().manual_seed(seed)
    ctl = controller(**kw)
    caps, events = [], []
    for step in range(1, steps + 1):
        observe(ctl, clustered_features(g, T, E, D, tightness))
        ev = ctl.step_end(step)
        events += [ev] if ev else []
        caps.append(ctl.capacity)
    return ctl, caps, events


def test_isotropic_features_keep_c0():
    for statistic in ("tail_quantile", "best_insider_q", "score_budget"):
        ctl, caps, events = _run_features(0.0, statistic=statistic, ema=0.0)
        assert events == [] and set(caps) == {ctl.c0} == {36}, statistic
        assert ctl.gauges()["capacity_target"] == 36


def test_clustered_features_lower_capacity_to_the_floor_and_no_further():
    ctl, caps, events = _run_features(16.0)  # the defaults: tail_quantile, multiple auto
    assert (ctl.c0, ctl.c_floor, ctl.multiple) == (36, 15, 2)
    assert ctl.gauges()["capacity_target"] == ctl.c_floor
    assert len(events) >= 8 and all(e["reason"] == "reestimate" for e in events)
    assert all(b <= a for a, b in zip(caps, caps[1:]))
    assert all(c == ctl.c_floor or c % 2 == 0 for c in caps)  # rounded up to the multiple
    # C_ema = 15 + 21 * 0.9^k: C0 - 2 after the first estimate, the floor after ~30.
    assert caps[0] == 34 and caps[-1] <= ctl.c_floor + 1
    assert ctl.gauges()["delta0"] > 0.6 and ctl.gauges()["q"] < 0.05  # isotropic: 1/2
    ctl, caps, _ = _run_features(64.0, steps=80, ema=0.5, multiple=1)
    assert caps[-1] == ctl.c_floor == min(caps)


def test_capacity_never_increases_with_random_features():
    g = torch.Generator().manual_seed(3)
    ctl = controller(multiple=8, interval=3, warmup=5, ema=0.6)
    caps = [ctl.capacity]
    for step in range(1, 151):
        tightness = float(torch.rand((), generator=g)) * 12  # isotropic ... clustered
        T = int(torch.randint(64, 4096, (), generator=g))
        observe(ctl, clustered_features(g, T, E, D, tightness))
        ev = ctl.step_end(step)
        assert ev is None or ev["reason"] == "reestimate"
        assert ctl.capacity <= caps[-1]
        caps.append(ctl.capacity)
        assert ctl.c_floor <= ctl.capacity <= ctl.c0
        assert ctl.capacity in (ctl.c0, ctl.c_floor) or ctl.capacity % 8 == 0
    assert len(set(caps)) >= 3


def test_no_estimate_before_warmup_or_off_interval(fixed_estimate):
    ctl = controller(seq_len=512, interval=10, warmup=20, ema=0.5, multiple=8)
    events = run(ctl, range(1, 20))
    assert events == [] and math.isnan(ctl.gauges()["q"])  # never measured
    assert run(ctl, [20]) == [{"step": 20, "old": 71, "new": 56, "reason": "reestimate"}]
    assert run(ctl, range(21, 30)) == []


def test_rounding_to_multiple_and_floor(fixed_estimate):
    # s = 512, E = 8: C0 = ceil(70.4) = 71, floor = ceil(28.4) = 29; estimate 0 -> C_tgt = 29.
    ctl = controller(seq_len=512, ema=0.5, multiple=8)
    assert (ctl.c0, ctl.c_floor) == (71, 29)
    caps = []
    for step in range(1, 11):
        run(ctl, [step])
        caps.append(ctl.capacity)
    # C_ema: 50, 39.5, 34.25, 31.6, 30.3, ... rounded up to 8: 56, 40, 40, 32, 32, ...
    assert caps == [56, 40, 40, 32, 32, 32, 32, 32, 32, 32]
    assert ctl.gauges()["capacity_target"] == 29
    # A larger target raises C_ema, but C never goes back up.
    fixed_estimate[0] = math.inf
    assert run(ctl, range(11, 20)) == [] and ctl.capacity == 32
    assert ctl.gauges()["capacity_target"] == 71  # clipped to C0
    # multiple = auto is 4 at C0 = 71. C stops at 32, the first multiple above the floor;
    # with multiple 1 it reaches the floor itself once C_ema is within 1e-9 of it.
    fixed_estimate[0] = 0.0
    ctl = controller(seq_len=512, ema=0.5)
    caps = [c for step in range(1, 61) for c in [run(ctl, [step]) and ctl.capacity] if c]
    assert caps == [52, 40, 36, 32] and ctl.capacity == 32
    ctl = controller(seq_len=512, ema=0.5, multiple=1)
    run(ctl, range(1, 61))
    assert ctl.capacity == 29


# ---- schedules ----------------------------------------------------------------------


def test_fixed_policy():
    ctl = controller(seq_len=128, policy="fixed")
    a_TE = torch.rand(16, E)
    for step in range(1, 300):
        ctl.observe(a_TE, a_TE.argmax(1))
        ctl.record_loss(step, torch.tensor(float(step)))
        assert ctl.step_end(step) is None
    assert ctl.capacity == ctl.c0 == 18
    assert len(ctl.guard.losses) == 0  # no guard, nothing kept
    assert ctl.gauges()["capacity_target"] == 18


def test_linear_decay_policy():
    # C0 = ceil(1.1 * 128 / 8) = 18; factor 1.1 -> 0.66 over the first 100 of 1000 steps.
    ctl = controller(seq_len=128, policy="linear_decay", max_steps=1000)
    caps, events = {}, []
    for step in range(1, 501):
        ev = ctl.step_end(step)
        events += [ev] if ev else []
        caps[step] = ctl.capacity
    assert ctl.c0 == 18
    assert caps[1] == 18  # 1.0956 * 16 = 17.53
    assert caps[8] == 18 and caps[9] == 17  # 17.04 -> 18; 16.97 -> 17
    assert caps[50] == 15  # 0.88 * 16 = 14.08
    assert caps[100] == 11 and caps[500] == 11  # 0.66 * 16 = 10.56, then constant
    assert events[0] == {"step": 9, "old": 18, "new": 17, "reason": "schedule"}
    assert [e["new"] for e in events] == list(range(17, 10, -1))
    assert ctl.gauges()["capacity_target"] == 11


# ---- checkpoint -----------------------------------------------------------------------


def _resume_run(ctl, steps, data_seed=7):
    """Features that cluster over time; the loss jumps after the third cut (a rollback)."""
    out = []
    for step in steps:
        g = torch.Generator().manual_seed(data_seed * 1000 + step)  # same data per step
        observe(ctl, clustered_features(g, 2048, E, D, tightness=min(16.0, step / 3)))
        cuts = ctl.cuts
        jump = len(cuts) >= 3 and cuts[2]["step"] < step <= cuts[2]["step"] + 3
        ctl.record_loss(step, torch.tensor(3.0 - 0.01 * step + (1.0 if jump else 0.0)))
        out.append((ctl.step_end(step), json.dumps(ctl.gauges())))
    return out


def test_state_dict_round_trip_continues_exactly():
    kw = dict(interval=4, warmup=4, ema=0.7, multiple=4, rollback_window=3, rollback_holdoff=1)
    ref = controller(**kw)
    full = _resume_run(ref, range(1, 81))
    events = [e for e, _ in full if e]
    reasons = [e["reason"] for e in events]
    rollback = reasons.index("rollback")
    assert "reestimate" in reasons[rollback:]  # shrinking resumed after the back-off
    split = events[rollback]["step"] + 2  # inside the back-off, cuts pending
    a = controller(**kw)
    _resume_run(a, range(1, split + 1))
    sd = json.loads(json.dumps(a.state_dict()))  # plain data only
    assert sd["hold_until"] > split and sd["loss_window"] and sd["streak"] == 1
    b = controller(**kw)
    b.load_state_dict(sd)
    assert _resume_run(b, range(split + 1, 81)) == full[split:]
    assert json.dumps(b.state_dict()) == json.dumps(ref.state_dict())


def test_old_checkpoint_state_loads_with_defaults():
    # A controller state from before the statistic and the guard: one pending cut as a
    # dict with loss sums, no back-off, a floor raised for good by an earlier rollback.
    old = {"policy": "controller", "c0": 36, "capacity": 32, "c_floor": 36, "c_ema": 31.5,
           "target": 15, "q": 0.0, "c_min": 2.0, "delta0": 0.1,
           "cuts": [{"step": 100, "old": 36, "new": 32}],
           "pending": {"step": 100, "old": 36, "before_sum": 30.0, "before_count": 10,
                       "after_sum": 6.0, "after_count": 2},
           "loss_window": [[s, 3.0] for s in range(93, 103)]}
    ctl = controller(rollback_window=10)
    ctl.load_state_dict(old)
    assert (ctl.capacity, ctl.c_floor, ctl.target) == (32, 15, 15)  # the floor is the config's
    assert ctl.guard.pending == [{"step": 100, "old": 36, "new": 32}]
    assert ctl.guard.hold_until == 0 and len(ctl.guard.losses) == 10
    assert math.isnan(ctl.gauges()["capacity_estimate"])
    # Its pending cut is judged on the losses there are: a clear jump rolls it back.
    a_TE = torch.zeros(4, E)
    for step in range(103, 111):
        ctl.observe(a_TE, torch.zeros(4, dtype=torch.long))
        ctl.record_loss(step, torch.tensor(3.5))
        ev = ctl.step_end(step)
    assert ev == {"step": 110, "old": 32, "new": 36, "reason": "rollback"}


def test_load_state_dict_rejects_a_different_shape():
    sd = controller(seq_len=128).state_dict()
    with pytest.raises(UserError, match="C0=18"):
        controller(seq_len=256).load_state_dict(sd)


def test_missing_observation_fails_loudly():
    with pytest.raises(RuntimeError, match="observe"):
        controller().step_end(1)
