"""The non-finite guard in one process: a poisoned step changes nothing and is counted.

The run-level behaviour (exit status 3, the error line, the kept checkpoint, 2
ranks) is in tests/integration/test_nonfinite_cli.py.
"""

from __future__ import annotations

import pytest
import torch

from hooks import Poison
from locmoe_train.config import load_config
from locmoe_train.nonfinite import CAUSES, NonFiniteGuard, step_code

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "moe.num_experts=4", "moe.top_k=2", "data.seq_len=16", "train.global_batch_size=4",
        "train.micro_batch_size=2", "optim.lr=1e-2", "optim.warmup_steps=0"]


def _state(model, optimizer) -> dict:
    sd = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()
          if v is not None}  # megatron keeps None extra states
    for i, st in enumerate(optimizer.state.values()):
        sd.update({f"opt/{i}/{k}": v.detach().clone() for k, v in st.items()})
    return sd


def _run(device: str, fused: bool | None, kind: str, router: str = "topk"):
    """Steps 1-4 of a tiny model with step 3 poisoned; the state after each step."""
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train_step import TrainStep

    cfg = load_config(None, TINY + [f"train.device={device}", f"moe.router={router}"])
    cfg.model.vocab_size = 512
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, device, cfg.train.seed)
    try:
        model = build_model(cfg, pctx, 512, torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=fused)
        step = TrainStep(model, opt, cfg, pctx, torch.float32,
                         moe=build_runtime(model, cfg, pctx), hooks=[Poison(True, range(3, 4), kind)])
        g = torch.Generator().manual_seed(0)
        batch = [torch.randint(0, 512, (2, 17), generator=g) for _ in range(2)]
        states, metrics = [], []
        for i in range(1, 5):
            metrics.append(step(batch, i))
            states.append(_state(model, opt))
        return states, metrics, step.guard
    finally:
        destroy_parallel()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fused, kind, cause", [
    (None, "nan", "loss is NaN"),  # the CPU path: the host reads the verdict
    (True, "inf", "loss is inf"),  # fused AdamW skips on device (found_inf), as on GPU
    (True, "grad", "grad norm is NaN"),  # a finite loss with NaN gradients
])
def test_poisoned_step_changes_nothing(megatron_reset, fused, kind, cause):
    states, metrics, guard = _run("cpu", fused, kind)
    _assert_same(states[1], states[2])  # step 3: weights and Adam state (its step count too)
    with pytest.raises(AssertionError):
        _assert_same(states[2], states[3])  # step 4 trains again
    assert [float(m["skipped"]) for m in metrics] == [0, 0, 1, 0]
    assert float(metrics[2]["loss"]) == 0.0  # kept out of the logged mean
    assert int(guard.total) == 1 and int(guard.streak) == 0
    assert CAUSES[int(guard.cause)] == cause and int(guard.last_bad) == 3


def test_aux_free_bias_does_not_move_on_a_skipped_step(megatron_reset):
    # The router-bias buffers are part of the model state compared above; make sure
    # they do move on good steps, or the comparison would prove nothing about them.
    states, _, _ = _run("cpu", None, "nan", router="aux_free")
    _assert_same(states[1], states[2])
    bias = [k for k in states[0] if k.endswith("expert_bias")]
    assert bias and not all(torch.equal(states[0][k], states[3][k]) for k in bias)


def test_streak_patience_and_message():
    guard = NonFiniteGuard("skip", 3, torch.device("cpu"))
    nan, fine = torch.tensor(float("nan")), torch.tensor(1.0)
    no_loss_flags = torch.zeros(2)
    for step, norm in enumerate([fine, nan, nan, fine, nan, nan], start=1):
        guard.update(step_code(norm, no_loss_flags), step)
        assert not bool(guard.tripped())
    guard.update(step_code(fine, torch.tensor([1.0, 0.0])), 7)  # one rank's loss is NaN
    assert bool(guard.tripped()) and int(guard.total) == 5
    # Sticky: finite steps and a later streak change neither the flag nor the message.
    for step, norm in enumerate([fine, fine, nan, nan, nan, nan, fine], start=8):
        guard.update(step_code(norm, no_loss_flags), step)
        assert bool(guard.tripped())
    assert int(guard.streak) == 0 and int(guard.total) == 9
    assert guard.message("ck/step_3") == (
        "loss is NaN at step 7 (3 steps in a row (5-7) were skipped, "
        "train.nonfinite_patience=3); kept the last checkpoint, ck/step_3. Try a lower "
        "optim.lr, more optim.warmup_steps, optim.grad_clip=1.0 or train.precision=fp32, "
        "then resume from it with --checkpoint.resume=auto.")
    stop = NonFiniteGuard("stop", 5, torch.device("cpu"))
    stop.update(step_code(torch.tensor(float("inf")), no_loss_flags), 2)
    assert bool(stop.tripped())
    assert stop.message(None).startswith(
        "grad norm is inf at step 2 (train.nonfinite=stop); no checkpoint was saved.")


def test_capacity_controller_skips_a_skipped_reestimation(fixed_estimate):
    from locmoe_train.config import CapacityConfig
    from locmoe_train.moe.capacity import CapacityController

    cfg = CapacityConfig(interval=2, warmup=0, ema=0.0, multiple=1)
    ctl = CapacityController(cfg, seq_len=64, top_k=2, num_experts=4, hidden_size=16,
                             max_steps=100)
    ctl.observe(torch.randn(64, 4), torch.zeros(64, dtype=torch.long))
    fixed_estimate[0] = 20.0
    c0 = ctl.capacity
    assert ctl.step_end(2, ok=torch.tensor(False)) is None and ctl.capacity == c0
    assert ctl.step_end(4, ok=torch.tensor(True))["new"] == 20


def test_rollback_guard_leaves_nan_losses_out():
    from locmoe_train.config import CapacityConfig
    from locmoe_train.moe.capacity_guard import RollbackGuard

    guard = RollbackGuard(CapacityConfig(rollback_window=2))
    for step, loss in [(1, 1.0), (2, float("nan")), (3, 3.0), (4, 5.0)]:
        guard.record(step, torch.tensor(loss))
    assert guard._group_losses(2, None) == ([1.0], [3.0, 5.0])


@pytest.mark.gpu
def test_poisoned_step_changes_nothing_on_gpu(megatron_reset):
    # build_optimizer's choice on CUDA (fused) skips without a host read.
    states, metrics, guard = _run("cuda", True, "nan")
    _assert_same(states[1], states[2])
    assert [float(m["skipped"]) for m in metrics] == [0, 0, 1, 0] and int(guard.total) == 1


class _LossSteps:
    """A step whose loss is NaN at ``bad`` steps and 1.0 otherwise; the verdict goes
    into the real guard as ``TrainStep`` puts it there (loss flags, step_code, update)."""

    def __init__(self, guard: NonFiniteGuard, bad: range):
        self.guard, self.bad = guard, bad

    def __call__(self, micro_batches, step: int) -> dict:
        loss = torch.tensor(float("nan") if step in self.bad else 1.0)
        code = step_code(torch.tensor(0.5), torch.stack([loss.isnan(), loss.isinf()]).float())
        self.guard.update(code, step)
        ok = code == 0
        return {"loss": torch.where(ok, loss, 0.0), "skipped": (~ok).float()}

    def log_record(self, acc, n_steps, elapsed) -> dict:
        return {"loss": float(acc["loss"])}

    def eval_record(self) -> dict:
        return {"val_loss": 1.0}


class _Batches:
    def next_step(self) -> list:
        return []


class _Records:
    def __init__(self):
        self.records = []

    def write(self, record: dict) -> None:
        self.records.append(record)


def _fit(guard, bad: range, poll_every_step: bool, checkpoint_interval: int = 5):
    from types import SimpleNamespace

    from locmoe_train.trainer import Cadence, Trainer

    saved, sink = [], _Records()
    pctx = SimpleNamespace(world_size=1, device=torch.device("cpu"), is_main=True)
    trainer = Trainer(Cadence(max_steps=20, log_interval=10,
                              checkpoint_interval=checkpoint_interval),
                      pctx, _LossSteps(guard, bad), _Batches(), sink,
                      save=lambda step: saved.append(step) or f"ck/step_{step}", parts=[guard],
                      console=False, guard=guard, poll_guard_every_step=poll_every_step)
    return trainer.fit(), trainer, saved, sink.records


def test_polled_at_log_steps_only_a_finished_streak_still_stops_before_a_save():
    # One CUDA rank reads the flag only at log steps (10, 20) and before saves (5, 10, ...).
    # The streak is steps 3-4 and over by step 5; the run must still stop at step 5,
    # before saving anything, and name the streak.
    guard = NonFiniteGuard("skip", 2, torch.device("cpu"))
    outcome, trainer, saved, records = _fit(guard, range(3, 5), poll_every_step=False)
    assert (outcome, trainer.step, saved) == ("nonfinite", 5, [])
    assert [(r["step"], r["skipped_steps"], r["skipped_total"], r["nonfinite"])
            for r in records] == [(5, 2, 2, {"step": 4, "cause": "loss is NaN"})]
    assert guard.message(trainer.last_checkpoint) == (
        "loss is NaN at step 4 (2 steps in a row (3-4) were skipped, "
        "train.nonfinite_patience=2); no checkpoint was saved. Try a lower optim.lr, more "
        "optim.warmup_steps, optim.grad_clip=1.0 or train.precision=fp32 and start again.")
    # Without checkpoints in between, the next read is the log step 10.
    guard = NonFiniteGuard("skip", 2, torch.device("cpu"))
    outcome, trainer, saved, _ = _fit(guard, range(3, 5), poll_every_step=False,
                                      checkpoint_interval=0)
    assert (outcome, trainer.step) == ("nonfinite", 10)
    # Polled every step (CPU, several ranks), the same run stops at the streak's end.
    guard = NonFiniteGuard("skip", 2, torch.device("cpu"))
    outcome, trainer, saved, _ = _fit(guard, range(3, 5), poll_every_step=True)
    assert (outcome, trainer.step, saved) == ("nonfinite", 4, [])


def test_guard_state_round_trips_as_plain_ints():
    from locmoe_train.checkpoint_io import check_plain

    guard = NonFiniteGuard("skip", 3, torch.device("cpu"))
    for step, bad in enumerate([1, 0, 1, 1], start=1):
        guard.update(step_code(torch.tensor(float("nan") if bad else 1.0), torch.zeros(2)), step)
    state = guard.state_dict()
    check_plain(state, "trainer.pt")
    assert all(type(v) is int for v in state.values())
    assert (state["streak"], state["start"], state["last_bad"], state["total"],
            state["latched"]) == (2, 3, 4, 3, 0)
    resumed = NonFiniteGuard("skip", 3, torch.device("cpu"))
    resumed.load_state_dict(state)
    for g in (guard, resumed):  # the third in a row trips both the same way
        g.update(step_code(torch.tensor(float("inf")), torch.zeros(2)), 5)
    assert guard.state_dict() == resumed.state_dict() and bool(resumed.tripped())
    assert resumed.message(None) == guard.message(None)
    assert resumed.message(None).startswith("grad norm is inf at step 5 (3 steps in a row (3-5)")


def test_locality_share_leaves_a_skipped_step_out():
    # LocMoE+ with locality-aware capacity on one rank of 2 nodes (experts 0-3 local).
    # Steps 5 and 10 are skipped, and their tokens all choose local experts: counted,
    # they would move the share; step 10 is also an update step.
    from locmoe_train.config import MoEConfig
    from locmoe_train.moe.routers import RouterSetup, router_class

    cfg = MoEConfig(router="locmoe_plus", num_experts=8, top_k=1, locality_loss_coeff=0.01)
    cfg.capacity.factor0, cfg.capacity.policy = 1.0, "fixed"
    nodes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    router = router_class("locmoe_plus")(cfg, 16, RouterSetup(
        expert_node_E=nodes, local_experts_E=nodes == 0, seq_len=64, max_steps=100)).train()
    g = torch.Generator().manual_seed(0)
    share0, local, chosen = router.locality_share, 0, 0
    for step in range(1, 21):
        x = torch.randn(256, 16, generator=g)
        skipped = step in (5, 10)
        if skipped:
            x[:, :8] += 10.0  # the blocks of experts 0-3
        out = router(x)
        if not skipped:
            local += int(out.selected_TE[:, :4].sum())
            chosen += int(out.selected_TE.sum())
        router.step_end(torch.zeros(8), step=step, ok=torch.tensor(not skipped))
        if step == 10:
            assert router.locality_share == share0  # bit for bit: the update waits
    assert router.locality_share != share0 and router.locality_share == local / chosen
