"""The capacity loss probe (``moe.capacity.estimator: loss_probe``, moe/capacity_probe.py).

Legend: s tokens per sequence, b sequences per micro-batch, E experts, C0 the
starting capacity per sequence.

Real models and real train steps (2 layers, hidden 64, E = 4, top-1, s = 32,
b = 8, CPU): the probe cuts where the extra capacity holds no token, refuses a
cut on a model that has learnt a task through its experts, raises C again when
a cut costs, and its extra forwards change nothing else in training (counters,
observations, aux loss, RNG stream). The rule itself is checked on numbers;
exact resume is in tests/integration/test_capacity_probe_resume.py and rank
agreement in tests/distributed/test_capacity_probe_ranks.py.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from locmoe_train.config import load_config
from locmoe_train.errors import UserError
from locmoe_train.moe import capacity_probe
from probe_runs import build, controllers, named_tensors, successor_batch, train


# ---- the rule ---------------------------------------------------------------------


def test_choose_raises_to_the_smallest_gain_else_cuts_to_the_last_cheap_candidate():
    caps = [18, 15, 12, 10, 8]
    # At C = 12: 15 gains 0.3% (< tolerance), 18 gains 1%: raise to 18.
    assert capacity_probe.choose(caps, [3.97, 3.998, 4.01, 4.0, 4.0], 12, 0.005)[0] == 18
    # No gain above; 10 costs 0.25%, 8 costs 2%: cut to 10, not to 8.
    chosen, rises = capacity_probe.choose(caps, [4.0, 4.0, 4.0, 4.01, 4.08], 12, 0.005)
    assert chosen == 10 and rises[12] == 0.0 and rises[8] == pytest.approx(0.02)
    # A cheap candidate below a costly one is not taken; NaN is harm.
    assert capacity_probe.choose(caps, [4.0, 4.0, 4.0, 4.1, 4.0], 12, 0.005)[0] == 12
    assert capacity_probe.choose(caps, [4.0, 4.0, 4.0, math.nan, 4.0], 12, 0.005)[0] == 12
    # Candidates: the floor, C0 and the current C, rounded up as C is.
    assert capacity_probe.candidates(18, 8, 5, math.ceil, [13]) == [18, 16, 13, 11, 8]
    assert capacity_probe.candidates(18, 8, 2, lambda c: 4 * math.ceil(c / 4)) == [18, 8]


@pytest.mark.parametrize("item, message", [
    ("moe.capacity.probe_points=1", "moe.capacity.probe_points=1 must be >= 2: the loss probe "
     "tries at least the floor and C0 (5 is the default)."),
    ("moe.capacity.probe_tolerance=-0.01", "moe.capacity.probe_tolerance=-0.01 must be in "
     "[0, 1): the relative loss change a cut may cost and a raise must gain (0.005 is the "
     "default)."),
    ("moe.capacity.probe_tolerance=1", "moe.capacity.probe_tolerance=1.0 must be in [0, 1): "
     "the relative loss change a cut may cost and a raise must gain (0.005 is the default)."),
    ("moe.capacity.estimator=bogus",
     "moe.capacity.estimator='bogus' is not one of 'statistic', 'loss_probe'."),
])
def test_config_errors_name_the_key_and_the_fix(item, message):
    with pytest.raises(UserError) as e:
        load_config(None, [item])
    assert str(e.value) == message


# ---- real models --------------------------------------------------------------------


def test_cuts_to_the_floor_when_the_extra_capacity_holds_no_token(megatron_reset):
    # C0 = 4 * s * 1 / 4 = s: every token fits. The floor, 0.75 C0 = 24 per sequence
    # (192 of the micro-batch's 256 tokens), is above any expert's load here, so a cut
    # drops nothing and costs exactly nothing.
    model, moe, step_fn = build(["moe.capacity.factor0=4", "moe.capacity.min_fraction=0.75",
                                 "moe.capacity.warmup=1", "moe.capacity.interval=1"])
    g = torch.Generator().manual_seed(0)
    metrics = train(step_fn, 2, g)
    ctl = controllers(moe)
    assert [(c.c0, c.c_floor, c.capacity) for c in ctl] == [(32, 24, 24)] * 2
    assert [e["reason"] for e in moe.pop_events()] == ["reestimate"] * 2
    assert all(c.probe_rise == 0.0 for c in ctl)
    for m in metrics:  # nothing was dropped, before the cut or after it
        assert torch.equal(m["moe/tokens_per_expert"].sum(-1), torch.full((2,), 256.0))


@pytest.fixture(scope="module")
def trained():
    """20 steps at C0 on the successor task, as (state_dict, optimizer state, generator
    state): experts that carry the task, so dropping tokens costs."""
    from locmoe_train.parallel.state import destroy_parallel

    try:
        model, moe, step_fn = build(["moe.capacity.warmup=1000"])
        g = torch.Generator().manual_seed(0)
        train(step_fn, 20, g)
        return (copy.deepcopy(model.state_dict()), copy.deepcopy(step_fn.optimizer.state_dict()),
                g.get_state())
    finally:
        destroy_parallel()


def resume_trained(trained, overrides):
    model, moe, step_fn = build(overrides)
    model.load_state_dict(trained[0])
    step_fn.optimizer.load_state_dict(trained[1])
    g = torch.Generator()
    g.set_state(trained[2])
    return model, moe, step_fn, g


def test_refuses_a_cut_that_costs(megatron_reset, trained):
    model, moe, step_fn, g = resume_trained(
        trained, ["moe.capacity.warmup=21", "moe.capacity.interval=21"])
    train(step_fn, 1, g, first=21)
    ctl = controllers(moe)
    assert moe.pop_events() == [] and [c.capacity for c in ctl] == [ctl[0].c0] * 2
    assert ctl[0].probe_rise == 0.0  # it chose the current C
    # What it saw: a measurable loss rise at every lower candidate (about 19% at the floor).
    caps = capacity_probe.candidates(ctl[0].c0, ctl[0].c_floor, 5, ctl[0].round_up)
    losses = capacity_probe.probe_losses(ctl, caps, functools.partial(
        step_fn.forward_loss, successor_batch(g)))
    _, rises = capacity_probe.choose(caps, losses, ctl[0].c0, 0.005)
    assert all(rises[c] > 0.005 for c in caps[1:]) and rises[ctl[0].c_floor] > 0.05


def test_raises_c_again_when_a_cut_costs(megatron_reset, trained):
    model, moe, step_fn, g = resume_trained(
        trained, ["moe.capacity.warmup=21", "moe.capacity.interval=21"])
    ctl = controllers(moe)
    for c in ctl:  # a checkpoint that holds a cut to the floor (as a statistic may make)
        sd = c.state_dict()
        sd["capacity"] = c.c_floor
        c.load_state_dict(sd)
    train(step_fn, 1, g, first=21)
    events = moe.pop_events()
    assert [e["reason"] for e in events] == ["probe_raise"] * 2
    assert all(e["old"] == ctl[0].c_floor < e["new"] for e in events)
    assert [c.capacity for c in ctl] == [events[0]["new"]] * 2
    assert ctl[0].probe_rise < -0.005  # the raise gained more than the tolerance


def test_probe_forwards_change_nothing_else(megatron_reset):
    """A probe that can only keep C (floor = C0) runs its forward at every step; with
    dropout on, training must equal a run without any probe, bit for bit: no counter,
    aux loss, capacity observation or RNG draw of the probe reaches training."""
    from locmoe_train.parallel.state import destroy_parallel

    common = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1",
              "moe.capacity.factor0=0.6", "moe.capacity.warmup=1", "moe.capacity.interval=1"]
    runs = []
    for extra in (["moe.capacity.min_fraction=1", "moe.capacity.probe_points=2"],
                  ["moe.capacity.policy=fixed"]):
        model, moe, step_fn = build(common + extra)
        torch.manual_seed(5)
        metrics = train(step_fn, 3, torch.Generator().manual_seed(1))
        runs.append((metrics, dict(named_tensors(model)),
                     [m.router.controller._observed[0].clone() for m in moe.modules],
                     torch.get_rng_state()))
        destroy_parallel()
    (m_probe, w_probe, obs_probe, rng_probe), (m_ref, w_ref, obs_ref, rng_ref) = runs
    for a, b in zip(m_probe, m_ref):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), a
    assert w_probe.keys() == w_ref.keys() and all(torch.equal(w_probe[k], w_ref[k]) for k in w_ref)
    assert all(torch.equal(a, b) for a, b in zip(obs_probe, obs_ref))
    assert torch.equal(rng_probe, rng_ref)


def test_a_raise_supersedes_pending_cuts_and_the_guard_still_holds_cuts_back():
    """On controllers alone, with a loss that reads their C: the probe cuts, raises when
    the cut starts to cost (the rollback guard then has nothing left to judge), and
    after a guard rollback it may raise but not cut until the hold ends."""
    from locmoe_train.config import CapacityConfig
    from locmoe_train.moe.capacity import CapacityController

    cfg = CapacityConfig(estimator="loss_probe", warmup=2, interval=2, rollback_window=3,
                         rollback_holdoff=2, multiple=1)
    ctls = [CapacityController(cfg, 128, 1, 8, 64, 100) for _ in range(2)]  # C0 18, floor 8
    cost = {"below": 0, "per_slot": 0.0}  # loss rise per slot below cost["below"]

    def loss():
        return torch.tensor(4.0 + cost["per_slot"] * max(0, cost["below"] - ctls[0].capacity))

    def step(s, train_loss=3.0):
        for c in ctls:
            c.record_loss(s, torch.tensor(train_loss))
        if ctls[0].probe_due(s):
            capacity_probe.run_probe(ctls, loss)
        return [c.step_end(s) for c in ctls][0]

    assert step(1) is None and step(2)["new"] == 8  # free: to the floor
    assert ctls[0].guard.pending == [{"step": 2, "old": 18, "new": 8}]
    cost.update(below=14, per_slot=0.01)  # now each slot below 14 costs 0.25%
    ev = step(4)
    assert ev == {"step": 4, "old": 8, "new": 11, "reason": "probe_raise"}
    assert ctls[0].guard.pending == [] and step(5) is None  # nothing left for the check
    # A guard rollback (the training loss jumps after a cut) holds cuts back, not raises.
    cost.update(below=0)
    assert step(6)["new"] == 8  # free again: cut
    assert step(7, 3.5) is None and step(8, 3.5) is None  # the probe at 8 keeps 8
    assert step(9, 3.5) == {"step": 9, "old": 8, "new": 11, "reason": "rollback"}
    assert ctls[0].guard.hold_until == 14  # 2 re-estimations held: steps 10 and 12
    assert step(10) is None and step(11) is None and ctls[0].capacity == 11  # free, but held
    cost.update(below=14)  # 16 is 0.74% better than 11 (13 only 0.496%: not enough)
    assert step(12) == {"step": 12, "old": 11, "new": 16, "reason": "probe_raise"}
    cost.update(below=0)
    assert step(13) is None and step(14)["new"] == 8  # the hold is over: free, so cut
