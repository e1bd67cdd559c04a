"""Hooks the tests install through ``LOCMOE_HOOKS`` (see ``locmoe_train/hooks.py``).

* ``hooks:crash`` with ``LOCMOE_TEST_CRASH=STEP:RANK:MARKER`` kills that rank
  after that step, once (the marker file records that it happened): lets tests
  exercise torchrun restarts.
* ``hooks:slow_save`` with ``LOCMOE_TEST_SLOW_SAVE=SECONDS`` sleeps in every
  checkpoint save after the tensors are written: tests kill -9 a save half-way.
"""

from __future__ import annotations

import os
import time

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
