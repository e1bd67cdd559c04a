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
