"""The comparison of records against ones recorded on another machine
(``helpers.record_differences``): floats to 1e-6 relative, everything else exactly."""

from __future__ import annotations

import pytest

from helpers import assert_records_match, record_differences

WANT = [{"step": 3, "grad_norm": 0.7931400537490845,
         "moe": {"layer_0": {"tokens_per_expert": [31, 25, 35, 31], "capacity": 9.0,
                             "delta0": -0.019539649737998842, "q": 0.0,
                             "capacity_target": None}},
         "moe_capacity": 9},
        {"step": 4, "val_loss": 6.252348899841309}]


def _with(path: list, value) -> list:
    """A copy of WANT with the value at ``path`` (keys and indexes) replaced."""
    import copy

    out = copy.deepcopy(WANT)
    obj = out
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return out


def test_float_noise_between_cpus_passes():
    # The difference seen between two machines, and ~1e-7 relative on others.
    assert_records_match(_with([0, "grad_norm"], 0.7931401134), WANT)
    assert_records_match(_with([0, "moe", "layer_0", "delta0"], -0.019539651), WANT)
    assert_records_match(_with([1, "val_loss"], 6.252348899841309 * (1 + 5e-7)), WANT)
    assert_records_match(_with([0, "moe", "layer_0", "q"], 1e-12), WANT)  # zero up to rounding


@pytest.mark.parametrize("path, value, message", [
    ([0, "grad_norm"], 0.7931400537490845 * (1 + 2e-6), ".grad_norm: 0.7931416"),
    ([1, "val_loss"], 6.26, "[1].val_loss: 6.26 != 6.252348899841309 (beyond rel 1e-06)"),
    ([0, "moe", "layer_0", "tokens_per_expert", 1], 26,
     "[0].moe.layer_0.tokens_per_expert[1]: 26 != 25 (exact)"),
    ([0, "moe_capacity"], 10, "[0].moe_capacity: 10 != 9 (exact)"),
    ([0, "moe_capacity"], 9.0, "[0].moe_capacity: 9.0 != 9 (exact)"),  # an int stays an int
    ([0, "step"], True, "[0].step: True != 3 (exact)"),
    ([0, "moe", "layer_0", "capacity"], 10.0, "[0].moe.layer_0.capacity: 10.0 != 9.0"),
    ([0, "moe", "layer_0", "capacity_target"], 4.0,
     "[0].moe.layer_0.capacity_target: 4.0 != None (exact)"),
    ([0, "moe", "layer_0", "tokens_per_expert"], [31, 25, 35],
     "[0].moe.layer_0.tokens_per_expert: [31, 25, 35] is not a list of 4"),
])
def test_beyond_tolerance_or_not_exact_fails(path, value, message):
    with pytest.raises(AssertionError) as e:
        assert_records_match(_with(path, value), WANT)
    assert message in str(e.value)


def test_missing_and_extra_keys_fail():
    got = _with([0, "moe", "layer_0", "extra"], 1.0)
    del got[1]["val_loss"]
    assert record_differences(got, WANT) == [
        "[0].moe.layer_0.extra: not expected (1.0)", "[1].val_loss: missing"]
    with pytest.raises(AssertionError, match="records differ"):
        assert_records_match(WANT[:1], WANT)
