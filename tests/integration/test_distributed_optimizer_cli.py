"""``optim.distributed`` through the real CLI at DP=2: the same losses as the non-sharded
optimizer over 20 steps, the memory each rank's optimizer holds, a sharded checkpoint that
resumes bit for bit, and resharding to one rank without sharding and back.

Two 20-step runs at 2 ranks (non-sharded and sharded, both saving at step 10)
are shared by the tests; each resume starts from one of their step-10
checkpoints. Dropping the optimizer state on resume moves the loss by about
2% here, so the 1e-5 checks do see whether Adam's moments came through.
"""

import os
import re

import pytest
import torch

from helpers import checkpoint_tensors, read_metrics, run_cli

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--model.num_attention_heads=4", "--moe.num_experts=4",
        "--moe.top_k=2", "--data.seq_len=32", "--train.global_batch_size=8",
        "--train.micro_batch_size=2", "--train.max_steps=20", "--train.eval_interval=0",
        "--train.eval_samples=8", "--optim.warmup_steps=2", "--optim.lr=5e-3",
        "--logging.log_interval=1", "--logging.console=false", "--checkpoint.interval=10",
        "--parallel.ep=1"]
SHARDED = ["--optim.distributed=true"]


def train(run_dir, tiny_data, extra, nproc=2):
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}", *extra],
                nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


def checkpoint(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def shards(run_dir, step):
    """Every tensor of the checkpoint of ``step``, whole (whatever layout wrote it)."""
    return checkpoint_tensors(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"))


def state_mib(stdout):
    return float(re.search(r"optim {4}: AdamW, .*state ([0-9.]+) MiB per rank", stdout).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("zero")
    plain = train(root / "plain", tiny_data, [])
    sharded = train(root / "sharded", tiny_data, SHARDED)
    return root, plain.stdout, sharded.stdout


def test_sharded_losses_equal_non_sharded_and_state_per_rank(runs):
    root, plain_out, sharded_out = runs
    plain, sharded = losses(root / "plain"), losses(root / "sharded")
    assert sorted(plain) == sorted(sharded) == list(range(1, 21))
    for step in plain:
        assert sharded[step] == pytest.approx(plain[step], rel=1e-6, abs=0), step
    assert plain[20] < plain[1] - 0.5  # it trains: equality is not of two flat lines
    assert "AdamW, not sharded" in plain_out
    assert "AdamW, distributed (state sharded over dp 2, experts over edp 2)" in sharded_out
    # Adam's moments halve; the fp32 slice and its gradient (4 + 4 bytes over 2 ranks)
    # take the room they free (tests/distributed/test_distributed_optimizer.py measures
    # the tensors). The non-sharded run also keeps full gradients, which are not counted.
    plain_mib, sharded_mib = state_mib(plain_out), state_mib(sharded_out)
    moments, slices = (float(x) for x in re.search(
        r"MiB per rank \(Adam moments ([0-9.]+) \+ fp32 parameter slice and its gradient "
        r"([0-9.]+)\)", sharded_out).groups())
    assert moments == pytest.approx(plain_mib / 2, rel=0.01)
    assert slices == pytest.approx(moments, rel=0.01)
    assert sharded_mib == pytest.approx(moments + slices, abs=0.01)


def test_sharded_checkpoint_resumes_bit_exactly(runs, tiny_data):
    root, _, _ = runs
    r = train(root / "resumed", tiny_data,
              SHARDED + ["--checkpoint.resume=" + checkpoint(root / "sharded", 10)])
    assert "at step 10" in r.stdout and "layout changed" not in r.stdout
    got, want = losses(root / "resumed"), losses(root / "sharded")
    assert sorted(got) == list(range(11, 21))
    assert all(got[s] == want[s] for s in got), (got, want)  # bit for bit
    a, b = shards(root / "sharded", 20), shards(root / "resumed", 20)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The sharded optimizer saves the same layout-free tensors as the non-sharded one.
    plain = shards(root / "plain", 20)
    assert plain.keys() == a.keys() and any(k.endswith("/exp_avg_sq") for k in a)
    assert all(plain[k].shape == a[k].shape for k in a)


def test_reshards_to_one_rank_non_sharded_and_back(runs, tiny_data):
    root, _, _ = runs
    # Sharded at DP=2 -> non-sharded on 1 rank (DP=1).
    r = train(root / "one_rank", tiny_data,
              ["--checkpoint.resume=" + checkpoint(root / "sharded", 10)], nproc=1)
    assert "layout changed" in r.stdout
    got, want = losses(root / "one_rank"), losses(root / "sharded")
    assert sorted(got) == list(range(11, 21))
    for step in got:  # same math, other reduction order
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    # Non-sharded at DP=2 -> sharded at DP=2.
    train(root / "to_sharded", tiny_data,
          SHARDED + ["--checkpoint.resume=" + checkpoint(root / "plain", 10)])
    got, want = losses(root / "to_sharded"), losses(root / "plain")
    assert sorted(got) == list(range(11, 21))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


@pytest.mark.slow  # 4 ranks on 2 cores
def test_sharded_at_ep2_dp2_resumes_from_dp2(runs, tiny_data):
    """Sharded at DP=2 (EP=1) -> sharded on 4 ranks at EP=2: dense state over DP=4, the
    experts' over their own expert-data-parallel group of 2."""
    root, _, _ = runs
    r = train(root / "ep2dp2", tiny_data,
              SHARDED + ["--parallel.ep=2",
                         "--checkpoint.resume=" + checkpoint(root / "sharded", 10)], nproc=4)
    assert "state sharded over dp 4, experts over edp 2" in r.stdout
    got, want = losses(root / "ep2dp2"), losses(root / "sharded")
    assert sorted(got) == list(range(11, 21))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
