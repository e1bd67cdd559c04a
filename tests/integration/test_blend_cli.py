"""A 0.3/0.7 blend of two prepared directories through the CLI at EP=2: per-source samples,
per-dataset validation loss, the startup summary, exact resume and resume on one rank."""

import os

import pytest

from helpers import read_metrics, run_cli, run_main

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--model.num_attention_heads=4", "--moe.num_experts=4",
        "--moe.top_k=2", "--data.seq_len=32", "--train.global_batch_size=8",
        "--train.micro_batch_size=2", "--train.max_steps=6", "--train.eval_interval=3",
        "--train.eval_samples=8", "--optim.warmup_steps=2", "--optim.lr=5e-3",
        "--logging.log_interval=1", "--checkpoint.interval=3"]


@pytest.fixture(scope="module")
def code_data(tmp_path_factory, tiny_data):
    """A second dataset (this package's own source) with the first one's tokenizer."""
    from locmoe_train.data import prepare

    out = str(tmp_path_factory.mktemp("data") / "code")
    package = os.path.join(os.path.dirname(__file__), "..", "..", "locmoe_train")
    rc = prepare.main(["--input", package, "--output", out, "--valid-fraction", "0.15",
                       "--tokenizer-path", os.path.join(tiny_data, "tokenizer.model")])
    assert rc == 0
    return out


def blend(tiny_data, code_data):
    return (f"--data.blend=[{{path: {tiny_data}, weight: 0.3, name: stdlib}}, "
            f"{{path: {code_data}, weight: 0.7, name: code}}]")


def train(tmp_path, name, args, nproc):
    run_dir = tmp_path / name
    args = TINY + [f"--logging.run_dir={run_dir}", *args]
    r = run_cli(args, nproc=nproc) if nproc > 1 else run_main(args)  # 1 rank: in this process
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    records = read_metrics(str(run_dir))
    return r, [x for x in records if "loss" in x], [x for x in records if "val_loss" in x]


def test_blend_trains_at_ep2_and_resumes_exactly(tmp_path, tiny_data, code_data):
    ep2 = [blend(tiny_data, code_data), "--parallel.ep=2"]
    r, train_records, val = train(tmp_path, "straight", ep2, 2)
    assert "  data     : a blend of 2 (" in r.stdout
    assert f"              30.0% stdlib: {tiny_data} (" in r.stdout
    assert f"              70.0% code: {code_data} (" in r.stdout
    # Samples per source: Tijdeman's rule keeps every prefix of two sources within half a
    # sample of 0.3/0.7.
    for x in train_records:
        n = 8 * x["step"]
        got = x["data_samples"]
        assert got["stdlib"] + got["code"] == n
        assert abs(got["stdlib"] - 0.3 * n) <= 0.5 and abs(got["code"] - 0.7 * n) <= 0.5
    assert train_records[-1]["data_samples"] == {"stdlib": 14, "code": 34}
    # Validation per dataset, and their 0.3/0.7 mean as the total.
    assert [x["step"] for x in val] == [3, 6]
    for x in val:
        parts = x["val_by_dataset"]
        assert set(parts) == {"stdlib", "code"}
        assert x["val_loss"] == pytest.approx(0.3 * parts["stdlib"]["loss"]
                                              + 0.7 * parts["code"]["loss"], rel=1e-12)
    # Stopped at step 3 and resumed: the same losses, bit for bit.
    train(tmp_path, "split", ep2 + ["--train.exit_at_step=3"], 2)
    r, resumed, _ = train(tmp_path, "split", ep2 + ["--checkpoint.resume=auto"], 2)
    assert "at step 3" in r.stdout
    assert [(x["step"], x["loss"], x["data_samples"]) for x in resumed] == [
        (x["step"], x["loss"], x["data_samples"]) for x in train_records]
    # Resumed on one rank (data-parallel size 2 -> 1): the same samples, the same losses
    # to float rounding.
    ckpt = os.path.join(tmp_path, "split", "checkpoints", "step_00000003")
    _, one, _ = train(tmp_path, "one_rank", [blend(tiny_data, code_data), "--parallel.ep=1",
                                             f"--checkpoint.resume={ckpt}"], 1)
    want = {x["step"]: x for x in train_records}
    assert [x["step"] for x in one] == [4, 5, 6]
    for x in one:
        assert x["data_samples"] == want[x["step"]]["data_samples"]
        assert x["loss"] == pytest.approx(want[x["step"]]["loss"], rel=1e-5)
    # The blend of a checkpoint is checked on resume.
    r = run_main(TINY + [f"--data.path={tiny_data}", "--parallel.ep=1",
                         f"--logging.run_dir={tmp_path / 'x'}", f"--checkpoint.resume={ckpt}"])
    assert r.returncode == 2
    assert ("error: the checkpoint was trained on a blend (data.blend) but this run reads one "
            "dataset (data.path)") in r.stderr
