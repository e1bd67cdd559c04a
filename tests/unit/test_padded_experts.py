"""Padded LocMoE+ with an expert that receives no tokens: grouped GEMM equals the loop.

``grouped_mm`` has been reported to leave the output rows of empty or padded
groups uninitialised on GPU, which another project saw as NaN from the
second step on (PLATFORM.md, "Known traps on GPU"). In the padded layout an
expert that no token chose still owns C rows, all padding. Over several
training steps the layer with grouped experts must give finite outputs and
gradients equal to the per-expert loop reference. On CPU this runs in fp32
(``grouped_mm`` exists there too); the ``gpu`` case runs both in bf16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from locmoe_train.config import load_config

E, D, FFN, S, B = 4, 64, 64, 16, 4
STARVED = 3  # the expert whose gate block is pushed down: no token chooses it
STEPS = 4


def _layer(device: str, impl: str):
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.moe.routers import RouterSetup
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, [f"moe.num_experts={E}", f"model.hidden_size={D}",
                             "model.num_attention_heads=2", f"moe.ffn_hidden_size={FFN}",
                             "moe.router=locmoe_plus", "moe.top_k=1", f"moe.experts={impl}",
                             "moe.capacity.policy=fixed", "moe.capacity.factor0=1.0",
                             "moe.pad_to_capacity=true", f"train.device={device}"])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, device, 0)
    torch.manual_seed(0)
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe,
                     ffn_hidden_size=FFN, setup=RouterSetup(seq_len=S)).to(device)
    return layer


def _inputs(step: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(S, B, D, generator=g)
    block = D // E
    x[..., STARVED * block:(STARVED + 1) * block] -= 1.0  # its affinity is the lowest
    return x.to(device)


def _run(device: str, impl: str, dtype: torch.dtype) -> list[dict]:
    """Outputs and gradients of STEPS forward/backward/SGD steps of one layer."""
    from locmoe_train.moe.routers.locmoe_plus import grap_affinity

    layer = _layer(device, impl)
    head = torch.randn(S, B, D, generator=torch.Generator().manual_seed(7)).to(device)
    params = [layer.experts.w13, layer.experts.w2]
    trace = []
    for step in range(STEPS):
        x = _inputs(step, device).requires_grad_(True)
        assert not (grap_affinity(x.detach().view(-1, D), E).argmax(-1) == STARVED).any()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out, _ = layer(x)
            loss = (out.float() * head).sum() + layer.pop_aux_loss()
        layer.zero_grad(set_to_none=True)
        loss.backward()
        kept = layer.stats.pop("tokens_per_expert")
        trace.append({"out": out.detach().float().cpu(), "dx": x.grad.float().cpu(),
                      "dw13": params[0].grad.float().cpu(), "dw2": params[1].grad.float().cpu(),
                      "kept": kept.cpu()})
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
    return trace


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_padded_grouped_experts_with_an_empty_expert_equal_the_loop(megatron_reset, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    grouped = _run(device, "grouped", dtype)
    from locmoe_train.parallel.state import destroy_parallel

    destroy_parallel()
    loop = _run(device, "loop", dtype)
    for step, (g, r) in enumerate(zip(grouped, loop)):
        assert int(g["kept"][STARVED]) == 0 and int(g["kept"].sum()) > 0, g["kept"]
        assert torch.equal(g["kept"], r["kept"])
        for key in ("out", "dx", "dw13", "dw2"):
            assert torch.isfinite(g[key]).all(), (step, key)
            scale = r[key].abs().max().clamp_min(1e-12)
            err = float((g[key] - r[key]).abs().max() / scale)
            assert err < tol, (step, key, err)
        # The starved expert's weights get no gradient: only padding reached it.
        assert float(g["dw13"][STARVED].abs().max()) == 0.0
        assert float(g["dw2"][STARVED].abs().max()) == 0.0


def test_garbage_in_padding_rows_never_reaches_outputs_or_gradients(megatron_reset,
                                                                    monkeypatch):
    """The trap itself, forced: NaN in every output row of the starved expert's group (all
    padding, as uninitialised memory could hold). Padding slots combine into a dummy row
    that is cut off, so outputs and gradients still equal the clean loop reference."""
    from locmoe_train.moe.experts import SwiGLUExperts
    from locmoe_train.parallel.state import destroy_parallel

    loop = _run("cpu", "loop", torch.float32)
    destroy_parallel()
    clean = SwiGLUExperts._grouped

    def poisoned(self, x_ND, tokens_per_expert_L):
        y = clean(self, x_ND, tokens_per_expert_L)
        ends = torch.cumsum(tokens_per_expert_L, 0)
        start, end = int(ends[STARVED - 1]), int(ends[STARVED])
        assert end > start  # the starved expert still owns its C padded rows
        return y.index_fill(0, torch.arange(start, end), float("nan"))

    monkeypatch.setattr(SwiGLUExperts, "_grouped", poisoned)
    grouped = _run("cpu", "grouped", torch.float32)
    for g, r in zip(grouped, loop):
        for key in ("out", "dx", "dw13", "dw2"):
            assert torch.isfinite(g[key]).all(), key
            assert torch.allclose(g[key], r[key], rtol=1e-5, atol=1e-6), key
