"""``checkpoint.async`` on a GPU (``gpu`` marker: skipped without CUDA): the host copy of a
GPU piece is pinned and reused by the next save, and a background save written while
training goes on resumes the same run bit for bit (the CPU path of the same code is
tested in ``tests/unit/test_checkpoint_pieces.py`` and ``test_async_save.py``)."""

from __future__ import annotations

import pytest
import torch

from helpers import read_metrics
from locmoe_train import train
from locmoe_train.checkpoint_async import host_copy
from test_gpu_resume import TINY

pytestmark = pytest.mark.gpu


def test_host_copy_of_a_gpu_piece_is_pinned_and_reused():
    buffers = {}
    live = torch.arange(8, dtype=torch.float32, device="cuda")
    first = host_copy(live[2:6], buffers, "x")
    torch.cuda.synchronize()
    live.add_(100)
    assert first.device.type == "cpu" and first.is_pinned()
    assert first.tolist() == [2.0, 3.0, 4.0, 5.0]
    second = host_copy(live[2:6], buffers, "x")
    torch.cuda.synchronize()
    assert second.data_ptr() == first.data_ptr() and second.tolist() == [102.0, 103.0,
                                                                         104.0, 105.0]


@pytest.mark.parametrize("distributed", [False, True])
def test_async_save_on_gpu_resumes_exactly(tmp_path, tiny_data, capsys, distributed):
    args = [*TINY, f"--data.path={tiny_data}", "--train.device=cuda", "--train.max_steps=4",
            f"--optim.distributed={str(distributed).lower()}", "--checkpoint.async=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main([*args, f"--logging.run_dir={straight}"]) == 0
    assert train.main([*args, f"--logging.run_dir={split}", "--train.exit_at_step=2"]) == 0
    assert train.main([*args, f"--logging.run_dir={split}", "--checkpoint.resume=auto"]) == 0
    capsys.readouterr()

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}

    assert losses(split) == losses(straight) and sorted(losses(split)) == [1, 2, 3, 4]
