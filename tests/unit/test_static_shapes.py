"""The padded MoE paths have static shapes and never read device data on the host.

Run under ``FakeTensorMode``, any op whose output shape depends on tensor
values (``nonzero``, boolean-mask indexing) raises, and so does any host read
of a value (``.item()``, ``.tolist()``). A forward and backward of the layer
that pass there can be CUDA-graphed or compiled without graph breaks, and on
a GPU never wait for the device (tests/gpu checks the same with CUDA's sync
debug mode). The dropless layout is the control: it must fail.

The padded layer also compiles with ``torch.compile(fullgraph=True)``, forward
and backward, and the compiled layer equals the eager one (issue 18).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

from locmoe_train.config import load_config

E, D, FFN, S, B = 4, 16, 16, 4, 3  # bf16 grouped_mm wants 16-byte strides

PADDED = {
    "topk_capacity": ["moe.router=topk", "moe.top_k=2", "moe.capacity_factor=0.5"],
    "locmoe_plus": ["moe.router=locmoe_plus", "moe.top_k=1", "moe.capacity.factor0=0.5"],
    "locmoe_plus_ecr": ["moe.router=locmoe_plus", "moe.top_k=1", "moe.locmoe_plus.mode=ecr",
                        "moe.capacity.factor0=0.5"],
}


def _fake_step(overrides):
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.moe.routers import RouterSetup
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, [f"moe.num_experts={E}", f"model.hidden_size={D}",
                             "model.num_attention_heads=2", f"moe.ffn_hidden_size={FFN}",
                             "moe.experts=grouped", "moe.z_loss_coeff=0.001", *overrides])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 0)
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe,
                     ffn_hidden_size=FFN, setup=RouterSetup(seq_len=S)).to(torch.bfloat16)
    x = torch.randn(S, B, D, dtype=torch.bfloat16, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, _ = layer(x)
        loss = out.float().pow(2).mean() + layer.pop_aux_loss()
        loss.backward()
    return out


@pytest.mark.parametrize("name", list(PADDED))
def test_padded_layer_is_static(megatron_reset, name):
    out = _fake_step([*PADDED[name], "moe.pad_to_capacity=true"])
    assert out.shape == (S, B, D)


def test_dropless_layout_is_data_dependent(megatron_reset):
    with pytest.raises(DynamicOutputShapeException):
        _fake_step(PADDED["locmoe_plus"])


def _layer_and_input(overrides):
    from locmoe_train.model.gpt import transformer_config
    from locmoe_train.moe.layer import MoELayer
    from locmoe_train.moe.routers import RouterSetup
    from locmoe_train.parallel.state import init_parallel

    cfg = load_config(None, [f"moe.num_experts={E}", f"model.hidden_size={D}",
                             "model.num_attention_heads=2", f"moe.ffn_hidden_size={FFN}",
                             "moe.experts=grouped", "moe.capacity.policy=fixed", *overrides])
    pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 0)
    torch.manual_seed(0)
    layer = MoELayer(transformer_config(cfg, pctx, torch.float32), cfg.moe,
                     ffn_hidden_size=FFN, setup=RouterSetup(seq_len=S)).to(torch.bfloat16)
    return layer, torch.randn(S, B, D, dtype=torch.bfloat16)


def _output_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("name", list(PADDED))
def test_padded_layer_compiles_without_graph_breaks(megatron_reset, name):
    """torch.compile(fullgraph=True) traces the padded layer's forward and backward in one
    graph (aot_eager: the graph capture itself, no code generation), and the compiled
    layer gives the eager outputs and input gradients. bf16: the fake-tensor kernel of
    grouped_mm accepts only bf16, the GPU dtype."""
    layer, x = _layer_and_input([*PADDED[name], "moe.pad_to_capacity=true"])

    def forward(inp):
        return layer(inp)[0]

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    want_out, want_dx = _output_and_grad(forward, x)
    got_out, got_dx = _output_and_grad(compiled, x)
    assert torch.equal(got_out, want_out)
    assert torch.allclose(got_dx, want_dx, rtol=1e-2, atol=1e-3)

