"""Every float setting must be finite: `x > 0` range checks let inf through (NaN fails
them only by accident), and no float key gives inf or NaN a meaning."""

import pytest

from locmoe_train.config import load_config
from locmoe_train.errors import UserError


def message(key: str, shown: str) -> str:
    return (f"{key}={shown} is not a finite number; every number in the config must be "
            f"finite: give a finite value.")


@pytest.mark.parametrize("section, key, value, shown", [
    ("optim", "lr", ".inf", "inf"),           # passed `lr > 0`: every step non-finite
    ("optim", "grad_clip", ".inf", "inf"),    # passed `>= 0`
    ("optim", "weight_decay", ".nan", "nan"),
    ("moe", "aux_loss_coeff", ".inf", "inf"),
    ("model", "init_std", "-.inf", "-inf"),
])
def test_yaml_float_keys_refuse_inf_and_nan(tmp_path, section, key, value, shown):
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(e.value) == message(f"{section}.{key}", shown)


def test_overrides_refuse_inf_and_nan_also_as_strings_and_in_optional_keys():
    for item, key, shown in [("optim.lr=inf", "optim.lr", "inf"),
                             ("optim.eps=.inf", "optim.eps", "inf"),
                             ("moe.capacity_factor=.inf", "moe.capacity_factor", "inf"),
                             ("optim.min_lr=NaN", "optim.min_lr", "nan")]:
        with pytest.raises(UserError) as e:
            load_config(None, [item])
        assert str(e.value) == message(key, shown), item
    # Finite values, and null for an optional key, still load.
    cfg = load_config(None, ["optim.lr=2e-3", "moe.capacity_factor=null"])
    assert cfg.optim.lr == 2e-3 and cfg.moe.capacity_factor is None
