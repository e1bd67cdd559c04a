"""Hooks the tests install through ``LOCMOE_HOOKS`` (see ``locmoe_train/hooks.py``).

* ``hooks:crash`` with ``LOCMOE_TEST_CRASH=STEP:RANK:MARKER`` kills that rank
  after that step, once (the marker file records that it happened): lets tests
  exercise torchrun restarts.
* ``hooks:slow_save`` with ``LOCMOE_TEST_SLOW_SAVE=SECONDS`` sleeps in every
  checkpoint save after the tensors are written: tests kill -9 a save half-way.
* ``hooks:poison`` with ``LOCMOE_TEST_POISON=FIRST-LAST:RANK:KIND`` poisons that
  rank's training loss at steps FIRST..LAST: KIND ``nan`` or ``inf`` (loss and
  gradients), ``grad`` (a finite loss whose gradients are NaN): tests of the
  non-finite guard.
"""

from __future__ import annotations

import os
import time

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))


def env_for(*names: str, **env: str) -> dict:
    """Environment entries that install the named hooks in a subprocess."""
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH", "")]))
    return {"LOCMOE_HOOKS": ",".join(f"hooks:{n}" for n in names), "PYTHONPATH": path, **env}


class _Crash:
    def __init__(self, pctx):
        at_step, at_rank, self.marker = os.environ["LOCMOE_TEST_CRASH"].split(":", 2)
        self.at_step, self.mine = int(at_step), pctx.rank == int(at_rank)

    def step_end(self, step: int) -> None:
        if self.mine and step == self.at_step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


class _SlowSave:
    def __init__(self, pctx):
        self.seconds = float(os.environ["LOCMOE_TEST_SLOW_SAVE"])

    def after_shards(self, step: int) -> None:
        time.sleep(self.seconds)


def crash(pctx):
    return _Crash(pctx)


def slow_save(pctx):
    return _SlowSave(pctx)


class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Poison:
    def __init__(self, rank: int, steps: range, kind: str):
        self.mine, self.steps, self.kind = rank, steps, kind

    def train_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if not self.mine or step not in self.steps:
            return loss
        if self.kind == "grad":
            return _NaNGrad.apply(loss)
        return loss * float(self.kind)


def poison_spec(spec: str, rank: int) -> Poison:
    """``FIRST-LAST:RANK:KIND`` (``FIRST:RANK:KIND`` for one step) -> the hook for ``rank``."""
    steps, at_rank, kind = spec.split(":")
    first, _, last = steps.partition("-")
    return Poison(rank == int(at_rank), range(int(first), int(last or first) + 1), kind)


def poison(pctx):
    return poison_spec(os.environ["LOCMOE_TEST_POISON"], pctx.rank)
