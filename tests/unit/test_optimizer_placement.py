"""Adam's state loaded from a checkpoint lands where torch's AdamW wants it (issue 23,
item 4), through the real ``Checkpointer`` save and load of a real model.

torch's own ``Optimizer.load_state_dict`` is the reference: for a fused or
capturable group, ``step`` becomes fp32 on the parameter's device; otherwise it
stays on the CPU. On this CPU-only machine the parameter's device for the
capturable case is ``meta`` (a real second device type; capturable AdamW accepts it
until it steps), which is what makes a CPU ``step`` visible: the code before the fix
put ``step`` on the CPU for every group, which on a GPU fails at the first fused step.
A fused AdamW does run on the CPU: there the resumed step must equal the step of the
optimizer that never stopped, bit for bit, for torch's AdamW and the distributed one.
"""

from __future__ import annotations

import pytest
import torch

from locmoe_train.checkpoint import Checkpointer
from locmoe_train.config import load_config
from locmoe_train.optim.distributed import DistributedAdamW
from helpers import adam_states
from locmoe_train.optim.optimizer import build_grad_sync, param_groups

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "moe.num_experts=4", "moe.top_k=2", "moe.router=topk", "data.seq_len=16",
        "parallel.ep=1", "train.device=cpu"]


@pytest.fixture
def setup(tmp_path, megatron_reset):
    """``(cfg, pctx, make_model)``: a tiny model, built identically on each call."""
    from locmoe_train.model.gpt import build_model
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, TINY + [f"checkpoint.dir={tmp_path}/ckpt"])
    cfg.model.vocab_size = 128
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
    return cfg, pctx, lambda: build_model(cfg, pctx, 128, torch.float32)


def _step(model, optimizer, seed: int, pctx=None) -> None:
    """One optimizer step on fixed pseudo-random gradients (through the gradient
    reduction that goes with ``optimizer`` when ``pctx`` is given)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if pctx is not None:
        build_grad_sync(optimizer, model, pctx).reduce()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _saved(setup, optimizer_kwargs: dict) -> tuple:
    """A checkpoint after one step of torch AdamW(**optimizer_kwargs) on the CPU:
    ``(path, model, optimizer)``."""
    cfg, pctx, make_model = setup
    model = make_model()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, **optimizer_kwargs)
    _step(model, optimizer, 0)
    path = Checkpointer(cfg, pctx).save(1, {"model": model, "optimizer": optimizer})
    return path, model, optimizer


@pytest.mark.parametrize("device, flags", [
    ("meta", {"capturable": True}),
    ("meta", {}),
    ("cpu", {"fused": True}),
    ("cpu", {"foreach": True}),
])
def test_loaded_state_is_placed_as_torch_places_it(setup, device, flags):
    cfg, pctx, make_model = setup
    path, saver, saver_opt = _saved(setup, {})
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, **flags)
    Checkpointer(cfg, pctx).load(path, {"model": model, "optimizer": optimizer})
    # torch's own placement of the same saved state, for groups with these flags (it
    # takes them from the state dict it is given).
    saved = saver_opt.state_dict()
    for group in saved["param_groups"]:
        group.update(flags)
    reference = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, **flags)
    reference.load_state_dict(saved)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len(optimizer.state) > 0
    for p in params:
        ours, torchs = optimizer.state[p], reference.state[p]
        assert ours.keys() == torchs.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in ours:
            assert (ours[key].device, ours[key].dtype) == (torchs[key].device, torchs[key].dtype)
        assert ours["exp_avg"].device == p.device
        on_device = flags.get("fused") or flags.get("capturable")
        assert ours["step"].device == (p.device if on_device else torch.device("cpu"))
        assert ours["step"].dtype == torch.float32


@pytest.mark.parametrize("distributed", [False, True])
def test_a_fused_adamw_resumes_exactly_on_cpu(setup, distributed):
    """Fused AdamW (as build_optimizer makes it on CUDA; it also runs on the CPU):
    save after one step, load into a new model and optimizer, take the next step."""
    cfg, pctx, make_model = setup

    def fused(model):
        groups = param_groups(model, 0.1)
        kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
        if distributed:
            return DistributedAdamW(model, groups, pctx, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    straight = make_model()
    opt = fused(straight)
    _step(straight, opt, 0, pctx)
    path = Checkpointer(cfg, pctx).save(1, {"model": straight, "optimizer": opt})
    _step(straight, opt, 1, pctx)

    resumed = make_model()
    opt2 = fused(resumed)
    Checkpointer(cfg, pctx).load(path, {"model": resumed, "optimizer": opt2})
    states = opt2.inner.state.values() if distributed else opt2.state.values()
    assert states and all(s["step"].dtype == torch.float32 and float(s["step"]) == 1.0
                          for s in states)
    _step(resumed, opt2, 1, pctx)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    want, got = adam_states(opt), adam_states(opt2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(want[p]["exp_avg_sq"], got[q]["exp_avg_sq"])


def test_a_load_into_a_stepped_optimizer_overwrites_its_state_in_place(setup):
    """An optimizer whose state exists already (it took a step) gets the saved state
    copied into its own tensors: the same tensors afterwards, holding the saved values."""
    cfg, pctx, make_model = setup
    path, saver, saver_opt = _saved(setup, {})
    model = make_model()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    _step(model, optimizer, 1)
    _step(model, optimizer, 2)  # other values, and step 2
    before = {id(p): {k: v.data_ptr() for k, v in optimizer.state[p].items()}
              for p in model.parameters()}
    Checkpointer(cfg, pctx).load(path, {"model": model, "optimizer": optimizer})
    for (name, p), q in zip(model.named_parameters(), saver.parameters()):
        assert torch.equal(p, q), name
        state, want = optimizer.state[p], saver_opt.state[q]
        assert {k: v.data_ptr() for k, v in state.items()} == before[id(p)], name
        assert float(state["step"]) == float(want["step"]) == 1.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], want[key]), (name, key)
