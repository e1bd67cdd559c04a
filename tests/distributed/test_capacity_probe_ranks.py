"""The capacity loss probe at 2 gloo ranks: every rank takes the same decision.

The ranks see different tokens, so their own probe losses differ; the probe
all-reduces them before deciding. First on controllers alone, with a loss that
makes a cut free on rank 0 and costly on rank 1 (each rank alone would decide
differently), then through real train steps (data parallel 2, rank-seeded data).
"""

import json

import torch

from harness import run_ranks
from locmoe_train.config import CapacityConfig
from locmoe_train.moe import capacity_probe
from locmoe_train.moe.capacity import CapacityController


def _worker(rank):
    # 1) Controllers alone: C0 = 18, floor 8. Rank 0's loss does not depend on C;
    # rank 1's rises 2% below C0, so the mean rises 1% (> the 0.5% tolerance).
    cfg = CapacityConfig(estimator="loss_probe", warmup=1, interval=1)
    ctls = [CapacityController(cfg, 128, 1, 8, 64, 100) for _ in range(2)]

    def loss():
        return torch.tensor(4.0 + (0.08 if rank == 1 and ctls[0].capacity < 18 else 0.0))

    caps = capacity_probe.candidates(18, 8, cfg.probe_points, ctls[0].round_up)
    local = capacity_probe.choose(caps, [4.0 + (0.08 if rank == 1 and c < 18 else 0.0)
                                         for c in caps], 18, cfg.probe_tolerance)[0]
    capacity_probe.run_probe(ctls, loss)
    events = [c.step_end(1) for c in ctls]
    alone = {"local_choice": local, "capacity": [c.capacity for c in ctls], "events": events,
             "probe_rise": ctls[0].probe_rise}

    # 2) Real train steps: probes at steps 2, 4 and 6 on each rank's own tokens.
    from probe_runs import build, controllers, train

    _, moe, step_fn = build(["moe.capacity.warmup=2", "moe.capacity.interval=2"])
    g = torch.Generator().manual_seed(10 + rank)
    metrics = train(step_fn, 6, g)
    return {"alone": alone, "losses": [float(m["loss"]) for m in metrics],
            "capacity": [c.capacity for c in controllers(moe)], "events": moe.pop_events(),
            "gauges": moe.gauges(), "state": {k: v for k, v in moe.state_dict()[0]["controller"]
                                              .items() if k != "loss_window"}}


def test_ranks_decide_alike_from_different_losses():
    r0, r1 = run_ranks(_worker, 2, timeout=240)
    # Alone, rank 0 would cut to the floor and rank 1 keep C0; together they keep C0.
    assert (r0["alone"]["local_choice"], r1["alone"]["local_choice"]) == (8, 18)
    assert r0["alone"] == {**r1["alone"], "local_choice": 8}
    assert r0["alone"]["capacity"] == [18, 18] and r0["alone"]["events"] == [None, None]
    # The real steps: different data on each rank, one decision.
    assert r0["losses"] != r1["losses"]
    assert r0["events"] and r0["state"]["cuts"]  # it did cut (6 steps: free cuts)
    for key in ("capacity", "events", "gauges", "state"):  # (json: NaN equals NaN)
        assert json.dumps(r0[key], sort_keys=True) == json.dumps(r1[key], sort_keys=True), key
