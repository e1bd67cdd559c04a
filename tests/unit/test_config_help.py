"""``locmoe-train --help-config``, ``--print-config`` and the generated docs/configs reference.

The CLI is called in-process (``train.main``): what is tested is the text and
the exit status, not a process start.
"""

import dataclasses
import keyword
import os
import typing

import pytest
import yaml

from locmoe_train.config import TrainConfig, load_config
from locmoe_train.config_help import describe_keys, reference_markdown
from locmoe_train.errors import UserError
from locmoe_train.train import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def leaf_keys(cls, prefix=""):
    """Every settable key of a config dataclass, written independently of config_help."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        # A key that is a Python keyword is a field with a trailing "_" (checkpoint.async).
        name = f.name[:-1] if keyword.iskeyword(f.name[:-1]) else f.name
        if dataclasses.is_dataclass(hint):
            out += leaf_keys(hint, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_a_keyword_key_is_spelled_as_the_user_writes_it(tmp_path):
    cfg = load_config(QUICKSTART, ["checkpoint.async=true"])
    assert cfg.checkpoint.async_ is True and cfg.to_dict()["checkpoint"]["async"] is True
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  async: true\n")
    assert load_config(str(path)).checkpoint.async_ is True
    with pytest.raises(UserError) as e:
        load_config(QUICKSTART, ["checkpoint.async_=true"])
    assert str(e.value).startswith("unknown config key 'checkpoint.async_'. Did you mean 'async'?")


def test_every_key_is_listed_with_a_description():
    docs = {k.key: k for k in describe_keys()}
    for key in leaf_keys(TrainConfig):
        assert key in docs, key
        assert docs[key].description.strip(), f"{key} has no comment in its dataclass"
        assert docs[key].summary.endswith("."), key
    # The items of data.blend are documented too.
    assert {"data.blend[].path", "data.blend[].weight", "data.blend[].name"} <= set(docs)


def test_help_config_prints_type_default_and_description(capsys):
    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "  train.max_steps  (int; default 200)\n" \
           "      Optimizer steps of the run (the LR schedule spans them).\n" in out
    assert "  optim.schedule  (cosine | linear | constant; default cosine)\n" in out
    assert "  moe.capacity_factor  (float or null; default null)\n" in out
    assert "  moe.capacity.multiple  (int | auto; default auto)\n" in out
    assert "  data.blend  (list of mapping or null; default null)\n" in out
    assert "  checkpoint.resume  (str or null; default null)\n" \
           "      null = start fresh; \"auto\" = the one `latest` names (else the newest valid " \
           "one; fresh if there is none); or a path.\n" in out
    for key in leaf_keys(TrainConfig):
        assert f"\n  {key}  (" in out, key


def test_docs_config_reference_is_the_generated_text():
    with open(os.path.join(REPO, "docs", "config_reference.md")) as f:
        committed = f.read()
    assert committed == reference_markdown(), (
        "docs/config_reference.md is out of date: run "
        "python -m locmoe_train.config_help > docs/config_reference.md")
    for key in leaf_keys(TrainConfig):
        assert f"| `{key}` |" in committed, key


def test_print_config_is_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--config", QUICKSTART, "--train.max_steps=7", "--moe.top_k", "1",
            f"--logging.run_dir={run_dir}"]
    assert main(argv + ["--print-config"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    expected = load_config(QUICKSTART, ["train.max_steps=7", "moe.top_k=1",
                                         f"logging.run_dir={run_dir}"]).to_dict()
    assert printed == expected
    assert printed["train"]["max_steps"] == 7 and printed["moe"]["top_k"] == 1
    assert list(printed) == ["model", "moe", "parallel", "data", "optim", "train",
                             "checkpoint", "logging", "adak"]
    assert "\n  max_steps: 7\n" in out
    assert not run_dir.exists()  # nothing started, nothing written


def test_print_config_refuses_bad_input(tmp_path, capsys):
    assert main(["--print-config"]) == 2
    assert "error: no config given: pass --config FILE" in capsys.readouterr().err
    assert main(["--config", QUICKSTART, "--train.steps=3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown config key 'train.steps'. Did you mean 'max_steps'?" in err
    assert main(["--config", QUICKSTART, "--moe.router=nope", "--print-config"]) == 2
    assert "error: moe.router='nope' is not one of" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "none.yaml"), "--print-config"]) == 2
    assert "does not exist" in capsys.readouterr().err
