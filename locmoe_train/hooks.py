"""Hooks: code a user or a test runs inside the loop without editing it.

``LOCMOE_HOOKS=module:factory[,module:factory...]`` is read once, when a run
starts; each ``factory(pctx)`` returns an object with any of:
* ``step_end(step)``: after every optimizer step (``Trainer``);
* ``after_shards(step)``: in a checkpoint save, after this rank's tensors are
  written and before the rest (``Checkpointer``);
* ``train_loss(step, loss) -> loss``: each training micro-batch's loss, before
  backward (``TrainStep``; tests poison it to exercise the non-finite guard).
Nothing is read per step. The test suite installs ``tests/hooks.py`` this
way to crash a rank at a step or slow a save down.
"""

from __future__ import annotations

import importlib
import os

from locmoe_train.errors import UserError

ENV = "LOCMOE_HOOKS"


def load_hooks(pctx, spec: str | None = None) -> list:
    spec = os.environ.get(ENV, "") if spec is None else spec
    hooks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        module, _, factory = item.partition(":")
        try:
            fn = getattr(importlib.import_module(module), factory or "make_hook")
        except (ImportError, AttributeError) as e:
            raise UserError(f"{ENV}={spec!r}: cannot load {item!r} ({e}); give module:factory "
                            f"importable from PYTHONPATH.") from None
        hooks.append(fn(pctx))
    return hooks


def call(hooks, name: str, *args) -> None:
    for hook in hooks:
        method = getattr(hook, name, None)
        if method is not None:
            method(*args)
