"""GPU correctness (``gpu`` marker; skipped without CUDA).

* The first training steps of a tiny model on GPU in bf16 (SDPA attention,
  grouped-GEMM experts, fused AdamW) follow the CPU fp32 run: same init, same
  batches; the loss may differ by bf16 rounding, which we bound at 2% relative
  per step (bf16 has an 8-bit mantissa: ~0.4% per rounding, accumulated over
  a few layers and steps).
* Grouped-GEMM experts in bf16 on GPU match the per-expert fp32 reference to
  bf16 accuracy, including an expert that receives no tokens (the padded
  LocMoE+ case is in tests/unit/test_padded_experts.py, with a CPU twin).
* bf16 training through the CLI on real text with the routers as they are
  (no forced balance): the loss falls and stays finite; the tokens per
  expert and the step time of each logged window are written to
  ``$LOCMOE_GPU_REPORT/gpu_training.json`` when that folder is set
  (scripts/device_check.sh sets it to its output folder).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from locmoe_train.config import load_config

pytestmark = pytest.mark.gpu

TINY = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
        "moe.num_experts=8", "moe.top_k=2", "data.seq_len=64", "train.global_batch_size=8",
        "train.micro_batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0"]


def _losses(device: str, precision: str, steps: int = 4) -> list[float]:
    from locmoe_train.model.gpt import build_model
    from locmoe_train.moe.impls import build_runtime
    from locmoe_train.optim.optimizer import build_optimizer
    from locmoe_train.parallel.state import destroy_parallel, init_parallel
    from locmoe_train.train_step import TrainStep

    cfg = load_config(None, TINY + [f"train.device={device}", f"train.precision={precision}"])
    cfg.model.vocab_size = 512
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, device, cfg.train.seed)
    try:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = build_model(cfg, pctx, 512, dtype)
        step = TrainStep(model, build_optimizer(model, cfg.optim), cfg, pctx, dtype,
                         moe=build_runtime(model, cfg, pctx))
        g = torch.Generator().manual_seed(0)
        # One batch, repeated: the model memorises it, so the loss must fall.
        batch = [torch.randint(0, 512, (4, 65), generator=g) for _ in range(2)]
        out = []
        for i in range(steps):
            out.append(float(step(batch, i + 1)["loss"]))
        return out
    finally:
        destroy_parallel()


def test_bf16_gpu_losses_follow_cpu_fp32():
    cpu = _losses("cpu", "fp32")
    gpu = _losses("cuda", "bf16")
    for a, b in zip(cpu, gpu):
        assert abs(a - b) / a < 2e-2, (cpu, gpu)
    assert gpu[-1] < gpu[0]  # and it trains


def test_grouped_experts_match_reference_on_gpu():
    from locmoe_train.moe.experts import SwiGLUExperts

    torch.manual_seed(0)
    ref = SwiGLUExperts(4, 256, 512, "loop")
    fast = SwiGLUExperts(4, 256, 512, "grouped").cuda()
    fast.load_state_dict(ref.state_dict())
    counts = torch.tensor([40, 0, 100, 16])  # one expert with no tokens
    x = torch.randn(int(counts.sum()), 256)
    want = ref(x, counts)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fast(x.cuda(), counts.cuda())
    assert got.dtype == torch.bfloat16
    err = (got.float().cpu() - want).abs().max() / want.abs().max()
    assert err < 2e-2, err


def test_padded_locmoe_plus_step_has_no_host_sync(megatron_reset):
    """LocMoE+ with a capacity, pad_to_capacity and grouped experts: static
    shapes, so a training forward and backward never wait on the GPU (the
    precondition for CUDA graphs / torch.compile without graph breaks)."""
    from locmoe_train.model.gpt import build_model, causal_mask
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, TINY + ["moe.router=locmoe_plus", "moe.top_k=1",
                                    "moe.pad_to_capacity=true", "moe.experts=grouped",
                                    "moe.capacity.policy=fixed", "moe.capacity.factor0=0.8",
                                    "train.device=cuda"])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cuda", cfg.train.seed)
    model = build_model(cfg, pctx, 512, torch.bfloat16)
    tokens = torch.randint(0, 512, (4, 64), device="cuda")
    labels = torch.randint(0, 512, (4, 64), device="cuda")
    pos = torch.arange(64, device="cuda")[None].expand(4, 64)
    mask = causal_mask(64, "cuda")
    for sync_mode in ("default", "error"):  # warm-up (lazy inits), then checked
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens, pos, mask, labels=labels).float().mean()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


REAL_ROUTERS = {
    "top2_dropless": ["--config", "configs/quickstart_topk.yaml"],
    "locmoe_plus": ["--config", "configs/quickstart.yaml"],  # top-2, TCR then ECR, capacity
}


def train_real_router(run_dir, data_path: str, name: str, device: str = "cuda",
                      steps: int = 60) -> list[dict]:
    """Train a small model through the CLI in bf16 on real text; the logged records."""
    from helpers import read_metrics, run_cli

    r = run_cli([*REAL_ROUTERS[name], "--model.num_layers=4", "--model.hidden_size=256",
                 "--model.num_attention_heads=4", "--moe.num_experts=8",
                 "--data.seq_len=256", "--train.global_batch_size=16",
                 "--train.micro_batch_size=16", f"--train.max_steps={steps}",
                 f"--train.eval_interval={steps}", "--train.eval_samples=32",
                 "--logging.log_interval=10", "--optim.warmup_steps=10",
                 f"--train.device={device}",
                 f"--train.precision={'bf16' if device == 'cuda' else 'fp32'}",
                 "--parallel.ep=1", f"--data.path={data_path}", f"--logging.run_dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return [x for x in read_metrics(str(run_dir)) if "loss" in x]


@pytest.mark.parametrize("name", list(REAL_ROUTERS))
def test_bf16_training_with_the_real_router(tmp_path, tiny_data, name):
    train = train_real_router(tmp_path / name, tiny_data, name)
    tokens_per_step = 16 * 256
    previous = 0
    for x in train:
        assert math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]), x
        steps, previous = x["step"] - previous, x["step"]
        for layer in x["moe"].values():
            kept = sum(layer["tokens_per_expert"])
            assert 0 < kept <= 2 * tokens_per_step * steps, layer
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    out = os.environ.get("LOCMOE_GPU_REPORT")
    if out:  # one file for all routers: the device's output folder takes few files
        path = os.path.join(out, "gpu_training.json")
        report = json.load(open(path)) if os.path.exists(path) else {}
        report[name] = [{"step": x["step"], "loss": x["loss"], "step_time_s": x["step_time_s"],
                         "tokens_per_s": x["tokens_per_s"],
                         "moe_imbalance": x["moe_imbalance"],
                         "dropped_fraction": {k: v["dropped_fraction"]
                                              for k, v in x["moe"].items()},
                         "tokens_per_expert": {k: v["tokens_per_expert"]
                                               for k, v in x["moe"].items()}}
                        for x in train]
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
