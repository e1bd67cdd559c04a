"""Checkpoint files hold tensors and plain values only, and load without the full
unpickler: the RNG states (Python, NumPy, torch) round-trip exactly through such a
file, saving anything else fails, and a file that needs the unpickler is refused
unless allowed."""

import os
import random

import numpy as np
import pytest
import torch

from locmoe_train.checkpoint import save_synced
from locmoe_train.checkpoint_io import check_loadable, load_file, rng_state, set_rng_state
from locmoe_train.errors import UserError


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(),
            torch.rand(3).tolist())


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.gauss(0, 1)  # leaves a cached Gaussian in both generators' states
    np.random.randn()
    save_synced(rng_state(), str(tmp_path / "rng.pt"))
    want = _draws()
    state = load_file(str(tmp_path), "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rng.pt")) == []
    assert isinstance(state["python"]["state"], torch.Tensor)
    assert isinstance(state["numpy"]["key"], torch.Tensor)
    set_rng_state(state, "rng.pt")
    assert _draws() == want


def test_a_format_1_rng_file_restores_the_torch_state_only(tmp_path):
    torch.save({"cpu": torch.get_rng_state(), "cuda": None}, str(tmp_path / "rng.pt"))
    want = torch.rand(3)
    set_rng_state(load_file(str(tmp_path), "rng.pt"), "rng.pt")
    assert torch.equal(torch.rand(3), want)


def test_a_file_that_is_no_rng_state_is_a_user_error():
    with pytest.raises(UserError, match="is not an RNG state file"):
        set_rng_state({"cpu": "nonsense"}, "rng.pt")


@pytest.mark.parametrize("value", [np.float64(1.0), np.int64(3), np.zeros(2), object(),
                                   torch.nn.Parameter(torch.zeros(1)), {1, 2}])
def test_saving_anything_but_tensors_and_plain_values_fails(tmp_path, value):
    with pytest.raises(TypeError, match="is not a tensor or plain value"):
        save_synced({"ok": [1, 2.0, None, "s", (True,), torch.zeros(1)], "bad": value},
                    str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()


def test_a_pickle_payload_is_refused_unless_allowed(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"step": 1, "x": Payload(str(marker))}, str(tmp_path / "trainer.pt"))
    with pytest.raises(UserError) as e:
        load_file(str(tmp_path), "trainer.pt")
    assert str(e.value).startswith(f"checkpoint file {tmp_path / 'trainer.pt'} holds pickled "
                                   f"Python objects (builtins.exec)")
    assert str(e.value).endswith("with --checkpoint.allow_pickle=true.")
    with pytest.raises(UserError, match="--allow-pickle"):
        check_loadable(str(tmp_path), ["trainer.pt"], option="--allow-pickle")
    check_loadable(str(tmp_path), ["trainer.pt"], allow_pickle=True)  # accepted, not read
    assert not marker.exists()
    assert load_file(str(tmp_path), "trainer.pt", allow_pickle=True) == {"step": 1, "x": None}
    assert marker.exists()  # allowed: it ran


def test_an_unreadable_file_is_a_user_error(tmp_path):
    (tmp_path / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"trainer.pt cannot be read"):
        load_file(str(tmp_path), "trainer.pt")
    with pytest.raises(UserError, match=r"missing.pt cannot be read"):
        load_file(str(tmp_path), "missing.pt")
