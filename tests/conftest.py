"""Shared fixtures: a tiny prepared corpus, megatron state reset, GPU marker, a fixed
capacity estimate."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not the tests/gpu dir name
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A small prepared dataset from the embedded stdlib corpus (vocab 512)."""
    from locmoe_train.data import prepare

    out = str(tmp_path_factory.mktemp("data") / "stdlib_tiny")
    rc = prepare.main(["--output", out, "--max-bytes", "400000", "--vocab-size", "512"])
    assert rc == 0
    return out


@pytest.fixture
def megatron_reset():
    """Tear down process groups and megatron's global state after a single-process test."""
    yield
    from locmoe_train.parallel.state import destroy_parallel

    destroy_parallel()


@pytest.fixture
def fixed_estimate(monkeypatch):
    """Replace the capacity statistic: ``box[0]`` is the capacity per sequence that the
    controller's next re-estimations ask for (inf: no cut)."""
    from locmoe_train.moe import capacity
    from locmoe_train.moe.capacity_stats import Measurement

    box = [0.0]
    monkeypatch.setattr(capacity, "measure", lambda *a, **kw: Measurement(box[0], 0.0, 0.0))
    return box
