"""Config loading, overrides and validation messages."""

import os

import pytest
import yaml

from locmoe_train.config import (TrainConfig, dump_config, load_config,
                                 parse_override_args)
from locmoe_train.errors import UserError
from locmoe_train.moe.impls import check_impl
from locmoe_train.parallel.state import check_layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_validate():
    cfg = load_config(None, [])
    assert isinstance(cfg, TrainConfig)
    assert cfg.moe.impl == "native" and cfg.moe.router == "topk"
    assert cfg.parallel.etp is None and cfg.expert_tp == 1  # resolved: our layer keeps whole experts per rank
    megatron = load_config(None, ["moe.impl=megatron", "parallel.tp=2", "data.seq_len=128"])
    assert megatron.expert_tp == 2  # megatron's default: etp follows tp
    assert megatron.parallel.etp is None  # derived, not written back: validate() does not mutate
    assert cfg.dense_ffn_hidden_size == 384  # 8/3 * 128 rounded up to 64


def test_shipped_configs_load():
    for root, _, files in os.walk(os.path.join(REPO, "configs")):
        if os.path.relpath(root, REPO).split(os.sep)[:2] == ["configs", "sweeps"]:
            continue  # sweep files, not run configs: tests/unit/test_sweep.py dry-runs them
        for name in files:
            if name.endswith(".yaml"):
                check_impl(load_config(os.path.join(root, name), []))


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, {"model": {"hidden_size": 64, "num_attention_heads": 2},
                            "optim": {"lr": 1}})
    cfg = load_config(path, parse_override_args(
        ["--train.max_steps=50", "--parallel.ep", "2", "--moe.capacity_factor=1.5",
         "--data.path=/x/y"]))
    assert cfg.model.hidden_size == 64
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # ints widen to float
    assert cfg.train.max_steps == 50
    assert cfg.parallel.ep == 2
    assert cfg.moe.capacity_factor == 1.5
    assert cfg.data.path == "/x/y"
    assert load_config(None, ["optim.lr=5e-3"]).optim.lr == 0.005  # YAML 1.1 reads this as str
    cfg2 = load_config(path, ["moe.capacity_factor=null"])
    assert cfg2.moe.capacity_factor is None


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "parallel.ep=4"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, str(out))
    again = load_config(str(out), [])
    assert again == cfg


def _nest(key: str, value) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


# The range audit of every numeric key: (key, first invalid value, its message, nearest
# valid value).
RANGES = [
    ("optim.lr", 0.0, "optim.lr=0.0 must be > 0.", 1e-4),  # 1e-4: the default min_lr
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0 (0: no weight decay).", 0.0),
    ("optim.beta1", 1.0, "optim.beta1=1.0 must lie in [0, 1).", 0.0),
    ("optim.beta2", -0.5, "optim.beta2=-0.5 must lie in [0, 1).", 0.999),
    ("optim.eps", 0.0, "optim.eps=0.0 must be > 0.", 1e-12),
    ("optim.grad_clip", -1.0, "optim.grad_clip=-1.0 must be >= 0 (0 disables clipping).", 0.0),
    ("optim.min_lr", -1e-4, "optim.min_lr=-0.0001 must lie in [0, optim.lr=0.001].", 0.0),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1 must be >= 0.", 0),
    ("train.seed", -1, "train.seed=-1 must be >= 0.", 0),
    ("train.eval_interval", -5, "train.eval_interval=-5 must be >= 0 (0: validate only at the "
     "end).", 0),
    ("train.eval_samples", 0, "train.eval_samples=0 must be a positive integer.", 1),
    ("train.nonfinite_patience", 0, "train.nonfinite_patience=0 must be a positive integer.", 1),
    ("train.exit_at_step", 0, "train.exit_at_step=0 must be >= 1 or null.", 1),
    ("train.micro_batch_size", 0, "train.micro_batch_size=0 must be a positive integer.", 1),
    ("checkpoint.interval", -1, "checkpoint.interval=-1 must be >= 0", 0),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be a positive integer.", 1),
    ("logging.log_interval", 0, "logging.log_interval=0 must be a positive integer.", 1),
    ("data.seq_len", 0, "data.seq_len=0 must be a positive integer.", 1),
    ("parallel.timeout_minutes", 0, "parallel.timeout_minutes=0 must be a positive integer.", 1),
    ("parallel.ranks_per_node", 0, "parallel.ranks_per_node=0 must be >= 1 or null.", 1),
    ("model.num_query_groups", -2, "model.num_query_groups=-2 must be a positive integer (or "
     "null for the default).", 1),
    ("model.ffn_hidden_size", -64, "model.ffn_hidden_size=-64 must be a positive integer (or "
     "null for the default).", 64),
    ("model.vocab_size", 0, "model.vocab_size=0 must be a positive integer (or null for the "
     "default).", 1),
    ("model.rotary_base", 0.0, "model.rotary_base=0.0 must be > 0.", 1.0),
    ("model.norm_eps", -1e-5, "model.norm_eps=-1e-05 must be > 0.", 1e-12),
    ("model.init_std", 0.0, "model.init_std=0.0 must be > 0.", 1e-6),
    ("model.hidden_dropout", 1.0, "model.hidden_dropout=1.0 must lie in [0, 1).", 0.0),
    ("moe.ffn_hidden_size", 0, "moe.ffn_hidden_size=0 must be a positive integer (or null for "
     "model.ffn_hidden_size).", 64),
    ("moe.aux_loss_coeff", -0.01, "moe.aux_loss_coeff=-0.01 must be >= 0 (0 turns it off).", 0.0),
    ("moe.z_loss_coeff", -1.0, "moe.z_loss_coeff=-1.0 must be >= 0 (0 turns it off).", 0.0),
    ("moe.locality_loss_coeff", -1.0, "moe.locality_loss_coeff=-1.0 must be >= 0", 0.0),
    ("moe.bias_update_rate", -1e-3, "moe.bias_update_rate=-0.001 must be >= 0", 0.0),
    ("moe.locality_eps", 1.5, "moe.locality_eps=1.5 must lie in [0, 1].", 1.0),
    ("moe.capacity_factor", 0.0, "moe.capacity_factor=0.0 must be > 0", 0.01),
    ("moe.capacity.warmup", -1, "moe.capacity.warmup=-1 must be >= 0.", 0),
    ("moe.capacity.decay_to", 0.0, "moe.capacity needs decay_to > 0 and 0 <= decay_fraction <= 1 "
     "(got decay_to=0.0, decay_fraction=0.1).", 0.01),
    ("moe.capacity.decay_fraction", 1.5, "moe.capacity needs decay_to > 0 and 0 <= "
     "decay_fraction <= 1 (got decay_to=0.66, decay_fraction=1.5).", 1.0),
    ("moe.capacity.rollback_sigma", -1.0, "moe.capacity.rollback_sigma=-1.0 must be >= 0", 0.0),
    ("moe.capacity.factor0", 0.0, "moe.capacity needs 0 < min_fraction <= 1", 0.5),
]
RANGE_CASES = [(_nest(key, bad), message) for key, bad, message, _ in RANGES]
RANGE_BOUNDS = [_nest(key, good) for key, _, _, good in RANGES]


@pytest.mark.parametrize("data, message", [
    ({"model": {"hiden_size": 3}},
     "unknown config key 'model.hiden_size'. Did you mean 'hidden_size'?"),
    ({"modle": {}}, "unknown config key 'modle'. Did you mean 'model'?"),
    ({"train": {"max_steps": "ten"}},
     "train.max_steps='ten' has the wrong type: expected int, got str."),
    ({"train": {"max_steps": 1.5}},
     "train.max_steps=1.5 has the wrong type: expected int, got float."),
    ({"optim": {"lr": "fast"}}, "optim.lr='fast' has the wrong type: expected float, got str."),
    ({"model": {"tie_embeddings": 1}},
     "model.tie_embeddings=1 has the wrong type: expected bool, got int."),
    ({"moe": {"dispatcher": "nccl"}},
     "moe.dispatcher='nccl' is not one of 'alltoall', 'hierarchical' for moe.impl=native."),
    ({"moe": {"num_experts": 6}, "parallel": {"ep": 4}},
     "moe.num_experts=6 is not divisible by parallel.ep=4"),
    ({"model": {"hidden_size": 100, "num_attention_heads": 3}},
     "model.hidden_size=100 is not divisible by model.num_attention_heads=3"),
    ({"moe": {"top_k": 9}}, "moe.top_k=9 exceeds moe.num_experts=8"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}},
     "train.global_batch_size (10) must be divisible by train.micro_batch_size (4)"),
    ({"parallel": {"tp": 2}, "data": {"seq_len": 33}},
     "data.seq_len=33 is not divisible by parallel.tp=2"),
    ({"train": {"max_steps": 0}}, "train.max_steps=0 must be a positive integer."),
    ({"model": {"moe_every": 9}}, "model.moe_every=9 is larger than model.num_layers=4"),
    ({"moe": {"router": "hash"}}, "moe.router=hash sends each token to one expert: set moe.top_k=1"),
    ({"moe": {"impl": "megatron", "router": "expert_choice"}},
     "moe.router='expert_choice' needs moe.impl=native"),
    ({"moe": {"pad_to_capacity": True}},
     "moe.pad_to_capacity=true needs a capacity to pad to: moe.router=topk with a "
     "moe.capacity_factor, or moe.router=locmoe_plus with moe.locmoe_plus.mode tcr_ecr or ecr"),
    ({"moe": {"pad_to_capacity": True, "router": "locmoe_plus", "locmoe": {"mode": "tcr"}}},
     "moe.pad_to_capacity=true needs a capacity to pad to"),
    ({"parallel": {"tp": 2, "etp": 2}},
     "moe.impl=native keeps whole experts on each rank (expert tensor parallel 1), but "
     "parallel.etp=2"),
    ({"moe": {"router": "locmoe_plus", "capacity_factor": 1.1}},
     "moe.capacity_factor=1.1 does not apply to moe.router=locmoe_plus"),
    ({"moe": {"capacity": {"interval": 0}}}, "moe.capacity.interval=0 must be >= 1."),
    ({"moe": {"capacity": {"ema": 1.0}}}, "moe.capacity needs 0 < min_fraction <= 1"),
    ({"moe": {"capacity": {"polcy": "fixed"}}},
     "unknown config key 'moe.capacity.polcy'. Did you mean 'policy'?"),
    ({"moe": {"dispatcher": "allgather"}},
     "moe.dispatcher='allgather' is only available with moe.impl=megatron"),
] + [(data, message) for data, message in RANGE_CASES])
def test_validation_messages(tmp_path, data, message):
    # As the entry points load a config: the config's own checks, then the
    # implementation's (router, dispatcher), which the config does not import.
    with pytest.raises(UserError) as e:
        check_impl(load_config(write(tmp_path, data), []))
    assert message in str(e.value)


def test_every_range_case_is_accepted_at_its_bound(tmp_path):
    # The cases above are rejected; the nearest valid value of each key is not, so the
    # checks draw the line where the messages say.
    for data in RANGE_BOUNDS:
        check_impl(load_config(write(tmp_path, data), []))


def test_bad_override_forms():
    with pytest.raises(UserError, match="overrides look like --section.key=value"):
        parse_override_args(["max_steps=3"])
    with pytest.raises(UserError, match="has no value"):
        parse_override_args(["--train.max_steps"])
    with pytest.raises(UserError, match="unknown config key 'train.steps'"):
        load_config(None, ["train.steps=3"])
    with pytest.raises(UserError, match="names a whole section"):
        load_config(None, ["train=3"])


def test_base_inheritance(tmp_path):
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(
        {"model": {"hidden_size": 64, "num_layers": 2}, "train": {"max_steps": 9}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "parent.yaml", "model": {"num_layers": 3}}))
    cfg = load_config(str(child), [])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.max_steps) == (64, 3, 9)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        load_config(str(loop), [])
    ablation = load_config(os.path.join(REPO, "configs/ablations/locmoe_plus_tcr_only.yaml"), [])
    assert ablation.moe.router == "locmoe_plus" and ablation.moe.locmoe_plus.mode == "tcr"
    assert ablation.parallel.ranks_per_node == 1 and ablation.moe.top_k == 1


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(str(bad), [])


def test_layout_checks():
    cfg = load_config(None, ["parallel.ep=2"])
    assert check_layout(cfg.parallel, 2, cfg.expert_tp) == (1, 2, 1)
    tp2 = load_config(None, ["parallel.tp=2"])
    assert check_layout(tp2.parallel, 4, tp2.expert_tp) == (1, 2, 4)
    megatron_tp2 = load_config(None, ["parallel.tp=2", "moe.impl=megatron"])
    assert megatron_tp2.expert_tp == 2  # megatron's default: expert TP = TP
    assert check_layout(megatron_tp2.parallel, 4, megatron_tp2.expert_tp) == (2, 2, 2)
    with pytest.raises(UserError, match="parallel.ep=2 x expert tensor parallel 1 = 2 does not "
                                        "divide the world size 3"):
        check_layout(cfg.parallel, 3, 1)
    with pytest.raises(UserError, match="parallel.tp=2 does not divide the world size 3"):
        check_layout(load_config(None, ["parallel.tp=2"]).parallel, 3, 1)
    with pytest.raises(UserError, match="parallel.ranks_per_node=3 does not divide"):
        check_layout(load_config(None, ["parallel.ranks_per_node=3"]).parallel, 4, 1)


def test_deprecated_spellings_still_load(tmp_path, capsys):
    """moe.impl=locmoe and the moe.locmoe section: accepted, with a note naming the new one."""
    import locmoe_train.config as config_module

    config_module._noted.clear()
    path = tmp_path / "old.yaml"
    path.write_text("moe:\n  impl: locmoe\n  router: locmoe_plus\n  top_k: 1\n"
                    "  locmoe:\n    tau: 0.5\n")
    cfg = load_config(str(path), ["moe.locmoe.mode=ecr"])
    assert cfg.moe.impl == "native"
    assert (cfg.moe.locmoe_plus.tau, cfg.moe.locmoe_plus.mode) == (0.5, "ecr")
    err = capsys.readouterr().err
    assert err.count("note: moe.locmoe is deprecated, use moe.locmoe_plus") == 1
    assert "note: moe.impl=locmoe is deprecated, use moe.impl=native" in err
    from locmoe_train.config import upgrade_saved

    saved = {"moe": {"impl": "locmoe", "locmoe": {"tau": 0.5}}, "model": {}}
    assert upgrade_saved(saved) == {"moe": {"impl": "native", "locmoe_plus": {"tau": 0.5}},
                                    "model": {}}


def test_validate_does_not_change_the_config():
    cfg = load_config(None, ["parallel.tp=2", "data.seq_len=128"])
    before = cfg.to_dict()
    cfg.validate()
    assert cfg.to_dict() == before
