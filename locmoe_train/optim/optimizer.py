"""AdamW with decoupled weight decay and the param groups we train with.

No weight decay on 1-D parameters (norm weights; the model has no biases):
decaying a norm's gain towards zero fights the normalisation. Nor on a
parameter tagged ``no_weight_decay`` (the routers' locality node bias). Fused AdamW is
used on CUDA when available (torch >= 2.0), foreach elsewhere.

``optim.distributed: true`` builds the sharded AdamW of ``optim/distributed.py``
instead. The functions below answer for either kind, so the train step and the
checkpoints need not know which one they have.
"""

from __future__ import annotations

import torch

from locmoe_train.config import OptimConfig
from locmoe_train.optim.distributed import DistributedAdamW, adam_state_bytes
from locmoe_train.parallel.grads import GradSync


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, pctx=None):
    """torch AdamW, or with ``cfg.distributed`` the sharded one (needs ``pctx``)."""
    on_cuda = next(model.parameters()).is_cuda
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                  fused=True if on_cuda else None)
    if cfg.distributed:
        assert pctx is not None, "the distributed optimizer needs the parallel context"
        return DistributedAdamW(model, groups, pctx, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def build_grad_sync(optimizer, model: torch.nn.Module, pctx) -> GradSync:
    """The gradient reduction that goes with ``optimizer``."""
    if isinstance(optimizer, DistributedAdamW):
        return optimizer.grad_sync(model)
    return GradSync(model, pctx)


def load_param_state(optimizer, param: torch.Tensor, state: dict) -> None:
    """Give ``param`` its full per-parameter ``state``, each tensor where torch's AdamW
    wants it (the distributed optimizer keeps this rank's slice, in the state it made
    as AdamW would)."""
    if isinstance(optimizer, DistributedAdamW):
        optimizer.load_param_state(param, state)
        return
    group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
    optimizer.state[param] = {key: place_state(param, group, key, value)
                              for key, value in state.items()}


def place_state(param: torch.Tensor, group: dict, key: str, value):
    """``value`` of state ``key`` on the device and dtype torch's own
    ``Optimizer.load_state_dict`` gives it: ``step`` stays where it is (on the CPU, as
    saved) unless the group is fused or capturable, whose kernels want it as fp32 on
    the parameter's device; the moments go to the parameter's device and dtype.
    Assigning the state directly would skip that policy, and a fused AdamW on a GPU
    would then meet a CPU step. Uses torch's rule itself; it looks a parameter up by
    id in saved-style groups, so one group that holds this parameter as id 0 is given."""
    if not torch.is_tensor(value):
        return value
    flags = {"params": [0], "fused": group.get("fused"), "capturable": group.get("capturable")}
    return torch.optim.Optimizer._process_value_according_to_param_policy(
        param, value, 0, [flags], key)


def state_parts(optimizer) -> dict[str, int]:
    """Bytes the optimizer holds on this rank between steps, by kind: ``adam`` (exp_avg,
    exp_avg_sq and the step count; allocated on the first step) and, for the distributed
    optimizer, ``slices`` (its fp32 copy of this rank's slice of the parameters and that
    slice's gradient, which stays until the next ``zero_grad``)."""
    if isinstance(optimizer, DistributedAdamW):
        return optimizer.state_parts()
    return {"adam": adam_state_bytes(optimizer)}


def state_bytes(optimizer) -> int:
    """Bytes the optimizer holds on this rank between steps: ``state_parts`` summed."""
    return sum(state_parts(optimizer).values())


def held_bytes(optimizer, model: torch.nn.Module) -> int:
    """Measured, not computed: the bytes of every tensor reachable from ``optimizer``'s
    attributes (state, slices, their gradients...), each storage once, leaving out the
    model's parameters and their gradients. Checks ``state_bytes`` (tests, the benchmark)."""
    model_storages = {t.untyped_storage().data_ptr() for p in model.parameters()
                      for t in (p, p.grad) if t is not None}
    seen, storages, todo = set(), {}, [optimizer]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in model_storages:
                storages[storage.data_ptr()] = storage.nbytes()
            if obj.is_leaf and obj.grad is not None:
                todo.append(obj.grad)
        elif isinstance(obj, dict):
            todo += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo += list(obj)
        elif type(obj).__module__.startswith(("locmoe_train.", "torch.optim")):
            todo += list(getattr(obj, "__dict__", {}).values())  # our parts, torch's AdamW
    return sum(storages.values())
