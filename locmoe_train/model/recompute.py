"""Activation recompute (``train.recompute``): keep fewer activations, recompute them in backward.

* ``none``: every activation autograd needs is kept (the default);
* ``selective``: the core attention (the ``[b, h, s, s]`` scores and
  probabilities of megatron's attention, SDPA's buffers) and the expert FFN
  (the ``[N, 2F]`` gate/up projections and the SwiGLU output) are recomputed
  from their inputs;
* ``full``: each transformer layer keeps only its input; the whole layer,
  router and token dispatch included, runs again in backward.

Owns ``apply_recompute(model, mode)``, which switches the chosen modules to a
subclass whose ``forward`` goes through ``checkpointed`` (parameter names,
state dicts and ``isinstance`` checks are unchanged), and
``recomputing()``, which modules with side effects ask.

Built on ``torch.utils.checkpoint`` (non-reentrant), not on megatron-core's
``tensor_parallel.checkpoint``: megatron's reentrant ``CheckpointFunction``
gives a recomputed module no way to know it is being recomputed, so a MoE
layer under its full recompute would count its tokens, aux terms and
capacity observations twice. The RNG discipline follows megatron's: the
default generator (torch's ``preserve_rng_state``) and the named states of
megatron's RNG tracker (attention dropout under ``fork()``) are put back to
their values at the first forward while a region is recomputed. On CPU the
tracker keeps its states on the CPU generator (``parallel/compat.py``).
Context variables are replayed too: the token ids hash routing reads
(``moe.layer.token_ids_scope``) are out of scope when backward runs, and on
GPU the backward runs in another thread.

What a recomputed forward must not do again is the caller's business:
``MoELayer`` records its statistics and aux loss, LocMoE+ feeds its capacity
controller and locality demand, and the dispatchers count traffic only when
``recomputing()`` is False. The routing itself is a function of the layer
input and of router state that changes only in ``step_end`` (after the
backward), so the recompute routes every token as the first forward did
(a different routing would change the dropless layout's shapes, which
torch's checkpoint compares and refuses). Ada-K's stage runs the frozen
model without gradients, where ``checkpointed`` just calls the module.
Early stopping of the recompute is off: a layer whose recompute holds
collectives (EP all-to-all, global expert choice) runs to its end on every
rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

MODES = ("none", "selective", "full")

_depth = 0  # > 0 while a checkpointed region runs again in backward


def recomputing() -> bool:
    """True while a forward runs that must leave no trace: a checkpointed region
    recomputed (its forward ran already), or a ``no_side_effects`` block."""
    return _depth > 0


@contextlib.contextmanager
def no_side_effects():
    """Forwards in this block count, keep and observe nothing, as a recompute does
    (the capacity loss probe, ``moe/capacity_probe.py``, runs its extra forwards here)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def rng_states() -> dict:
    """Copies of every RNG state a forward may draw from: torch's CPU and current CUDA
    generators, and the named states of megatron's RNG tracker."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "tracker": _snapshot(_tracker().get_states())}


def set_rng_states(states: dict) -> None:
    """Put back what ``rng_states`` took (it can be put back any number of times)."""
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    _tracker().set_states(_snapshot(states["tracker"]))


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def _snapshot(states: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in states.items()}


class _Region:
    """The two context managers ``checkpoint(context_fn=...)`` takes for one region: the
    recompute sees the RNG tracker states and the context variables (e.g. the token ids
    of ``moe.layer.token_ids_scope``, gone by the time backward runs) of the first forward."""

    def __init__(self):
        self.states, self.context = None, None

    @contextlib.contextmanager
    def first_forward(self):
        self.states = _snapshot(_tracker().get_states())
        self.context = contextvars.copy_context()
        yield

    @contextlib.contextmanager
    def recompute(self):
        global _depth
        tracker = _tracker()
        current = tracker.get_states()
        tracker.set_states(_snapshot(self.states))
        tokens = [(var, var.set(value)) for var, value in self.context.items()]
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            for var, token in reversed(tokens):
                var.reset(token)
            tracker.set_states(current)


def _contexts():
    region = _Region()
    return region.first_forward(), region.recompute()


def checkpointed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, keeping only its inputs for backward when grad is on."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=_contexts, **kwargs)


@functools.cache
def _recomputed_class(cls: type) -> type:
    def forward(self, *args, **kwargs):
        if not self.training:
            return cls.forward(self, *args, **kwargs)
        return checkpointed(functools.partial(cls.forward, self), *args, **kwargs)

    return type(f"Recomputed{cls.__name__}", (cls,), {"forward": forward,
                                                       "__module__": cls.__module__})


def _targets(model: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from locmoe_train.moe.experts import SwiGLUExperts

    if mode == "full":
        return [m for m in model.modules() if isinstance(m, TransformerLayer)]
    return ([m.core_attention for m in model.modules() if isinstance(m, Attention)]
            + [m for m in model.modules() if isinstance(m, SwiGLUExperts)])


def apply_recompute(model: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """Make ``mode``'s modules of ``model`` recompute their activations; returns them."""
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; one of {MODES}")
    if mode == "none":
        return []
    targets = _targets(model, mode)
    for m in targets:
        if not type(m).__name__.startswith("Recomputed"):
            m.__class__ = _recomputed_class(type(m))
    return targets
