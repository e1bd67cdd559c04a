"""The capacity controller at 2 ranks: every rank takes the same decisions from different data.

Legend: T tokens on a rank, E experts.

Each rank observes its own (rank-seeded) affinities and reports its own
training losses; the ranks must agree on C, the events and the gauges. The
statistics are also checked against one process holding all the tokens.
"""

import json
import math

import torch

from harness import run_ranks
from locmoe_train.config import CapacityConfig
from locmoe_train.moe.capacity import CapacityController, estimate_q

S, E, D, W = 256, 8, 64, 3


def affinity(x_TD):
    T, d = x_TD.shape
    return x_TD.view(T, E, d // E).sum(-1) / (math.sqrt(d / E) * x_TD.norm(dim=1, keepdim=True))


def clustered(g, T, noise):
    expert_T = torch.randint(0, E, (T,), generator=g)
    gates_ED = torch.zeros(E, D)
    for i in range(E):
        gates_ED[i, i * D // E:(i + 1) * D // E] = 1 / math.sqrt(D / E)
    return gates_ED[expert_T] + noise * torch.randn(T, D, generator=g) / math.sqrt(D)


def _controller_run(rank):
    """One rank's run, coinciding and general statistics (runs in the harness's gloo group)."""
    # 1) A run: features cluster over time, rank-dependent token counts and losses.
    # rollback_window 3 > interval 2: a cut is checked 4 steps later, no cut in between.
    cfg = CapacityConfig(interval=2, warmup=2, ema=0.8, multiple=2, rollback_window=W)
    ctl = CapacityController(cfg, S, 1, E, D, 100)
    g = torch.Generator().manual_seed(100 + rank)
    events, gauges, losses = [], [], []
    for step in range(1, 41):
        x = clustered(g, T=320 + 192 * rank, noise=4.0 * (1 - step / 40) + 0.3)
        a_TE = affinity(x)
        ctl.observe(a_TE, a_TE.argmax(1))
        # After the first cut rank 0 gets worse and rank 1 better (the mean improves):
        # no rollback. After the fifth cut both get worse: rollback.
        loss = 3.0 - 0.01 * step + 0.5 * rank
        cuts = ctl.cuts
        for i, delta in [(0, [0.3, -0.4][rank]), (4, 0.5)]:
            if len(cuts) > i and cuts[i]["step"] < step <= cuts[i]["step"] + W:
                loss += delta
        losses.append(loss)
        ctl.record_loss(step, torch.tensor(loss))
        ev = ctl.step_end(step)
        if ev:
            events.append(ev)
        gauges.append(ctl.gauges())
    sd = ctl.state_dict()
    shared = {k: v for k, v in sd.items() if k not in ("loss_window", "pending")}

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
    a_gen = affinity(clustered(gd, T=200 + 100 * rank, noise=6.0))
    t_gen = a_gen.argmax(1)
    q_g, m_g = estimate_q(a_gen, t_gen)

    data = {"a_coincide": a_coincide, "t_coincide": t_coincide, "a_gen": a_gen, "t_gen": t_gen}
    return {"events": events, "gauges": gauges, "losses": losses, "capacity": ctl.capacity,
            "c_floor": ctl.c_floor, "state": shared,
            "q_coincide": q_c.tolist(), "m_coincide": m_c.tolist(),
            "q_gen": q_g.tolist(), "m_gen": m_g.tolist()}, data


def _q_at(a_TE, top1_T, m_E):
    """Fraction of each expert's outsiders at or above ``m_E`` (one process, all tokens)."""
    a_TE = a_TE.double()
    ins_TE = top1_T[:, None] == torch.arange(a_TE.shape[1])[None, :]
    ge_E = ((a_TE >= m_E[None, :]) & ~ins_TE).sum(0).double()
    return ge_E / (~ins_TE).sum(0).clamp(min=1).double()


def test_capacity_controller_agrees_across_ranks():
    out, data = zip(*run_ranks(_controller_run, 2))

    # Same decisions, events and gauges on both ranks (NaN-safe through the JSON text).
    for key in ["events", "gauges", "capacity", "c_floor", "state"]:
        assert json.dumps(out[0][key]) == json.dumps(out[1][key]), key
    assert out[0]["losses"] != out[1]["losses"]  # the ranks really saw different losses
    events = out[0]["events"]
    reasons = [e["reason"] for e in events]
    assert reasons.count("reestimate") >= 5 and reasons.count("rollback") == 1, events
    assert len(out[0]["state"]["cuts"]) == reasons.count("reestimate")
    steps = [e["step"] for e in events]
    assert all(b - a >= 4 for a, b in zip(steps, steps[1:]))  # each cut waited for its check
    # The first cut was kept although rank 0 alone would have rolled it back...
    k1 = events[0]["step"]
    l0 = out[0]["losses"]
    before, after = sum(l0[k1 - 3:k1]) / 3, sum(l0[k1:k1 + 3]) / 3  # steps k-2..k, k+1..k+3
    assert after > before * 1.02 and events[1]["reason"] == "reestimate"
    # ... and the fifth was rolled back at its check, four steps later, never to be cut again.
    fifth = out[0]["state"]["cuts"][4]
    assert events[-1] == {"step": fifth["step"] + 4, "old": fifth["new"], "new": fifth["old"],
                          "reason": "rollback"}
    assert out[0]["capacity"] == out[0]["c_floor"] == fifth["old"]
    # Ten-plus re-estimations measured something on every rank alike.
    measured = [g for g in out[0]["gauges"] if not math.isnan(g["q"])]
    assert len(measured) >= 10 and measured[-1]["q"] < measured[0]["q"]

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
