"""The capacity controller at 2 ranks: every rank takes the same decisions from different data.

Legend: T tokens on a rank, E experts, K experts per token, W = rollback_window.

Each rank observes its own (rank-seeded) affinities and reports its own
training losses; the ranks must agree on C, the events, the rollback guard's
verdicts and the gauges. Every statistic is also checked against one process:
exactly when both ranks hold the same tokens, and through METHOD's q (whose
per-rank medians are averaged) on general data.
"""

import json
import math

import pytest
import torch

from harness import run_ranks
from locmoe_train.moe import capacity_stats
from locmoe_train.config import CapacityConfig
from locmoe_train.moe.capacity import CapacityController
from locmoe_train.moe.capacity_stats import STATISTICS, estimate_q, measure
from locmoe_train.moe.routers.locmoe_plus import grap_affinity
from locmoe_train.moe.synthetic_features import clustered_features

S, E, D, W = 256, 8, 64, 3


def affinity(x_TD):
    return grap_affinity(x_TD, E)


def clustered(g, T, tightness):
    return clustered_features(g, T, E, D, tightness)


def _measurements(aff_TE, K):
    top_TK = aff_TE.topk(K, dim=1).indices
    return {f"{name}/{K}": measure(name, aff_TE, top_TK, local_capacity=20, seq_len=S,
                                   rho=0.5).__dict__ for name in STATISTICS}


def _inputs(seed, T):
    """Affinities per tightness (isotropic, loose, tight) and K."""
    out = {}
    for K in (1, 2):
        for tightness in (0.0, 3.0, 16.0):
            g = torch.Generator().manual_seed(seed + int(tightness * 10) + K)
            out.setdefault(f"{tightness}", {})[K] = affinity(clustered(g, T, tightness))
    return out


def _controller_run(rank):
    """One rank's run and statistics (runs in the harness's gloo group)."""
    # 1) A run: features cluster over time, rank-dependent token counts and losses.
    # W = 3 > interval 2: cuts are made while the previous one awaits its check.
    cfg = CapacityConfig(interval=2, warmup=2, ema=0.8, multiple=1, rollback_window=W,
                         rollback_holdoff=1, rollback_tolerance=0.02)
    ctl = CapacityController(cfg, S, 1, E, D, 100)
    g = torch.Generator().manual_seed(100 + rank)
    events, gauges, losses = [], [], []
    for step in range(1, 61):
        a_TE = affinity(clustered(g, T=512 + 256 * rank, tightness=min(16.0, step / 2)))
        ctl.observe(a_TE, a_TE.argmax(1))
        # After the first cut rank 0 gets worse and rank 1 better (the mean improves):
        # kept. After the third cut both get worse: a rollback, and cuts again later.
        loss = 3.0 - 0.01 * step + 0.5 * rank
        cuts = ctl.cuts
        for i, delta in [(0, [0.3, -0.4][rank]), (2, 0.5)]:
            if len(cuts) > i and cuts[i]["step"] < step <= cuts[i]["step"] + W:
                loss += delta
        losses.append(loss)
        ctl.record_loss(step, torch.tensor(loss))
        ev = ctl.step_end(step)
        if ev:
            events.append(ev)
        gauges.append(ctl.gauges())
    shared = {k: v for k, v in ctl.state_dict().items() if k != "loss_window"}

    # Every statistic on the same tokens on both ranks, and on each rank's own tokens.
    same = {t: {k: v for K, a_TE in by_k.items() for k, v in _measurements(a_TE, K).items()}
            for t, by_k in _inputs(seed=0, T=700).items()}
    own = {t: {k: v for K, a_TE in by_k.items() for k, v in _measurements(a_TE, K).items()}
           for t, by_k in _inputs(seed=50 * rank, T=400 + 300 * rank).items()}

    # 2) Statistics where the per-rank medians coincide: every expert's ins affinities
    # have median 0.5 on each rank (different counts); expert 3 is chosen only on rank 1,
    # expert 4 by nobody. Other entries of a row lie below its top-1 value.
    gd = torch.Generator().manual_seed(7 + rank)
    ins = {0: [[0.25, 0.5, 0.75], [0.25, 0.375, 0.5, 0.625, 0.75]][rank],
           1: [[0.5], [0.125, 0.5, 0.875]][rank],
           2: [[0.25, 0.375, 0.625, 0.75], [0.5, 0.5]][rank],
           3: [[], [0.25, 0.5, 0.75]][rank]}
    rows, top1 = [], []
    for i, vals in ins.items():
        for v in vals:
            row = -0.25 + (v + 0.25) * torch.rand(5, generator=gd)
            row[i] = v
            rows.append(row)
            top1.append(i)
    perm = torch.randperm(len(rows), generator=gd)
    a_coincide = torch.stack(rows)[perm]
    t_coincide = torch.tensor(top1)[perm]
    q_c, m_c = estimate_q(a_coincide, t_coincide)

    # 3) General statistics: different data, different medians per rank.
    a_gen = affinity(clustered(gd, T=200 + 100 * rank, tightness=1.3))
    t_gen = a_gen.argmax(1)
    q_g, m_g = estimate_q(a_gen, t_gen)

    data = {"a_coincide": a_coincide, "t_coincide": t_coincide, "a_gen": a_gen, "t_gen": t_gen}
    return {"events": events, "gauges": gauges, "losses": losses, "capacity": ctl.capacity,
            "state": shared, "same": same, "own": own,
            "q_coincide": q_c.tolist(), "m_coincide": m_c.tolist(),
            "q_gen": q_g.tolist(), "m_gen": m_g.tolist()}, data


def _q_at(a_TE, top1_T, m_E):
    """Fraction of each expert's outsiders at or above ``m_E`` (one process, all tokens)."""
    a_TE = a_TE.double()
    ins_TE = top1_T[:, None] == torch.arange(a_TE.shape[1])[None, :]
    ge_E = ((a_TE >= m_E[None, :]) & ~ins_TE).sum(0).double()
    return ge_E / (~ins_TE).sum(0).clamp(min=1).double()


def test_capacity_controller_agrees_across_ranks(monkeypatch):
    out, data = zip(*run_ranks(_controller_run, 2))

    # Same decisions, events, gauges and guard state on both ranks (NaN-safe through JSON).
    for key in ["events", "gauges", "capacity", "state", "same", "own"]:
        assert json.dumps(out[0][key]) == json.dumps(out[1][key]), key
    assert out[0]["losses"] != out[1]["losses"]  # the ranks really saw different losses
    events = out[0]["events"]
    reasons = [e["reason"] for e in events]
    assert reasons.count("rollback") == 1 and reasons.count("reestimate") >= 5, events
    cuts = out[0]["state"]["cuts"]
    assert len(cuts) == reasons.count("reestimate")
    assert cuts[1]["step"] - cuts[0]["step"] == 2  # the next cut did not wait for the check
    # The first cut was kept although rank 0 alone would have rolled it back...
    k1 = cuts[0]["step"]
    l0 = out[0]["losses"]
    before, after = sum(l0[k1 - 3:k1]) / 3, sum(l0[k1:k1 + 3]) / 3  # steps k-2..k, k+1..k+3
    assert after > before * 1.02 and events[1]["reason"] == "reestimate"
    # ... the third cut's harm shows first in the second cut's window (W > interval), so
    # the second is rolled back at its check, the pending third with it; then C shrinks again.
    second, third = cuts[1], cuts[2]
    rollback = reasons.index("rollback")
    assert events[rollback] == {"step": second["step"] + W, "old": third["new"],
                                "new": second["old"], "reason": "rollback"}
    assert "reestimate" in reasons[rollback + 1:]
    assert out[0]["capacity"] < third["new"]
    assert out[0]["state"]["streak"] == 0  # the retry's cut passed its check
    measured = [g for g in out[0]["gauges"] if not math.isnan(g["q"])]
    assert len(measured) >= 10 and measured[-1]["q"] < measured[0]["q"]

    # The same tokens on both ranks: the agreed quantiles and thresholds are one copy's,
    # the counts twice one copy's. One process on one copy gives the same numbers once
    # its count bound is taken at the doubled count (the bound is not linear).
    bound = capacity_stats.count_upper_bound
    monkeypatch.setattr(capacity_stats, "count_upper_bound", lambda k: bound(2 * k) / 2)
    a_same = _inputs(seed=0, T=700)
    for tightness, by_stat in out[0]["same"].items():
        for key, got in by_stat.items():
            name, K = key.split("/")
            want = _measurements(a_same[tightness][int(K)], int(K))[key]
            for field in ("estimate", "q", "delta0"):
                assert (got[field] == pytest.approx(want[field], rel=1e-12)
                        or math.isnan(got[field]) and math.isnan(want[field])), (key, field)
    monkeypatch.undo()
    assert out[0]["same"]["0.0"]["tail_quantile/1"]["estimate"] > S  # isotropic: no cut
    assert out[0]["own"]["16.0"]["tail_quantile/1"]["estimate"] < 36  # clustered: a cut

    # Coinciding per-rank medians: 2-rank q and m equal one process on all tokens.
    a_all = torch.cat([d["a_coincide"] for d in data])
    t_all = torch.cat([d["t_coincide"] for d in data])
    q1, m1 = estimate_q(a_all, t_all)
    for o in out:
        assert o["m_coincide"] == m1.tolist() == [0.5, 0.5, 0.5, 0.5, 0.0]
        assert o["q_coincide"] == q1.tolist()
    assert 0 < max(q1.tolist()) < 1 and q1[4] == 0  # a real count; nobody chose expert 4

    # General data: m is the count-weighted mean of the per-rank medians, and q lies
    # between the single-process q at the smallest and at the largest per-rank median.
    assert out[0]["q_gen"] == out[1]["q_gen"] and out[0]["m_gen"] == out[1]["m_gen"]
    local = [estimate_q(d["a_gen"], d["t_gen"]) for d in data]
    counts = [torch.bincount(d["t_gen"], minlength=8).double() for d in data]
    m_expected = (counts[0] * local[0][1] + counts[1] * local[1][1]) / (counts[0] + counts[1])
    m2 = torch.tensor(out[0]["m_gen"], dtype=torch.float64)
    assert torch.allclose(m2, m_expected, rtol=0, atol=1e-12)
    assert not torch.equal(local[0][1], local[1][1])  # the medians really differ
    a_all = torch.cat([d["a_gen"] for d in data])
    t_all = torch.cat([d["t_gen"] for d in data])
    m_lo = torch.minimum(local[0][1], local[1][1])
    m_hi = torch.maximum(local[0][1], local[1][1])
    q2 = torch.tensor(out[0]["q_gen"], dtype=torch.float64)
    assert torch.equal(q2, _q_at(a_all, t_all, m2))  # exact for the agreed median
    assert (_q_at(a_all, t_all, m_hi) <= q2).all() and (q2 <= _q_at(a_all, t_all, m_lo)).all()
    assert q2.min() > 0
    # The 2-rank q sits strictly inside the bracket for some expert: the bound has teeth.
    assert ((_q_at(a_all, t_all, m_hi) < q2) & (q2 < _q_at(a_all, t_all, m_lo))).any()
