"""Shared by the shard-equivalence tests (importable as `workers`): a run on N ranks vs one rank.

A test module defines ``run_scenario(name, world, num_shards)``: it builds its
layer for ``world`` ranks, cuts a fixed global input into ``num_shards``
shards (rank r runs shard r; one rank runs them all), and returns rank 0's
results (None elsewhere). ``parallel_and_reference`` runs it on ``world`` ranks
and on one rank with as many shards, for the tests to compare.
"""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from harness import run_ranks
from locmoe_train.parallel.state import destroy_parallel


def parallel_and_reference(run_scenario: Callable, world: int, names: list[str]
                           ) -> tuple[dict, dict]:
    """Rank 0's results by scenario name: on ``world`` ranks, then on one rank."""
    par = run_ranks(_scenarios, world, run_scenario, names, world)[0]
    ref = run_ranks(_scenarios, 1, run_scenario, names, world)[0]
    return par, ref


def _scenarios(rank: int, run_scenario: Callable, names: list[str], num_shards: int) -> dict:
    world = dist.get_world_size()
    results = {name: run_scenario(name, world, num_shards) for name in names}
    destroy_parallel()
    return results
