"""A run with attention dropout resumes bit for bit: the checkpoint's RNG file holds
megatron's tensor-parallel RNG tracker (which the dropout forks) besides torch's,
Python's and NumPy's states, all as tensors and plain values."""

import pytest
import torch

from helpers import read_metrics, run_cli

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--model.num_attention_heads=4", "--moe.num_experts=4",
        "--moe.top_k=2", "--data.seq_len=32", "--train.global_batch_size=8",
        "--train.micro_batch_size=4", "--train.max_steps=4", "--train.eval_interval=0",
        "--train.eval_samples=8", "--optim.warmup_steps=2", "--optim.lr=5e-3",
        "--logging.log_interval=1", "--logging.console=false", "--checkpoint.interval=2",
        "--parallel.ep=1", "--model.attention_dropout=0.2"]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


@pytest.mark.slow  # three training runs (~30 s on 2 shared cores)
def test_resume_with_attention_dropout_is_bit_exact(tmp_path, tiny_data):
    runs = {}
    for name, extra in [("straight", []), ("split", ["--train.exit_at_step=2"]),
                        ("split", ["--checkpoint.resume=auto"])]:
        runs[name] = tmp_path / name
        r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={runs[name]}",
                            *extra])
        assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout
    assert _losses(runs["split"]) == _losses(runs["straight"])
    rng = torch.load(runs["split"] / "checkpoints" / "step_00000002" / "rng_rank00000.pt",
                     weights_only=True)
    assert "model-parallel-rng" in rng["tracker"]
