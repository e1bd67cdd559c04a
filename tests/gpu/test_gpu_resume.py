"""Save, resume and take a step on a GPU, with the default optimizer (torch's fused
AdamW: ``build_optimizer`` fuses on CUDA) and with ``optim.distributed`` (issue 23,
item 4). The ``cuda`` cases carry the ``gpu`` marker (skipped without CUDA); the
``cpu`` cases run the same code everywhere.

Before the fix every resume on a GPU with the default optimizer failed at its first
step: the loaded Adam ``step`` stayed on the CPU while the fused kernel and the
non-finite guard's ``found_inf`` are on the GPU.
"""

from __future__ import annotations

import math

import pytest

from helpers import read_metrics
from locmoe_train import train

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--model.num_attention_heads=4", "--moe.num_experts=4",
        "--moe.top_k=2", "--data.seq_len=32", "--parallel.ep=1", "--train.global_batch_size=8",
        "--train.micro_batch_size=4", "--train.eval_samples=8", "--train.eval_interval=0",
        "--optim.warmup_steps=0", "--logging.log_interval=1", "--logging.console=false",
        "--checkpoint.interval=2", "--train.max_steps=3"]


@pytest.mark.parametrize("distributed", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_then_step(tmp_path, tiny_data, capsys, device, distributed):
    run_dir = tmp_path / "run"
    args = [*TINY, f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}",
            f"--train.device={device}", f"--optim.distributed={str(distributed).lower()}"]
    assert train.main([*args, "--train.exit_at_step=2"]) == 0
    capsys.readouterr()
    rc = train.main([*args, "--checkpoint.resume=auto"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in out.out
    loss = {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}
    assert sorted(loss) == [1, 2, 3] and math.isfinite(loss[3])
