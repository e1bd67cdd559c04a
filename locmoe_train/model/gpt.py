"""GPT decoder built from megatron-core transformer layers, with MoE MLPs.

Owns: the megatron ``TransformerConfig`` derived from our config, the layer
spec (RMSNorm, causal self-attention with RoPE, SwiGLU MLP without biases),
the MoE implementation's MLP spec (``moe/impls.py``, chosen by ``moe.impl``), and
``build_model``. Parameter initialisation is in ``model/init.py``, activation
recompute (``train.recompute``) in ``model/recompute.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locmoe_train.config import TrainConfig
from locmoe_train.model.attention import SDPAttention
from locmoe_train.model.init import init_parameters
from locmoe_train.model.norm import RMSNorm
from locmoe_train.model.recompute import apply_recompute
from locmoe_train.moe.impls import check_impl, impl_class
from locmoe_train.parallel.state import ParallelContext


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def is_moe_layer(layer_index: int, moe_every: int) -> bool:
    """Megatron's ``moe_layer_freq`` convention: layers 0, k, 2k, ... (0-based) are MoE."""
    return layer_index % moe_every == 0


def transformer_config(cfg: TrainConfig, pctx: ParallelContext, precision: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, moe = cfg.model, cfg.moe
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=cfg.dense_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=pctx.tp,
        expert_model_parallel_size=pctx.ep,
        expert_tensor_parallel_size=pctx.etp,
        # MoE with TP needs sequence parallelism in megatron-core.
        sequence_parallel=pctx.tp > 1,
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_layer_freq=m.moe_every,
        moe_router_topk=moe.top_k,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=moe.dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        # Read by megatron's own MoE layer only (ours takes it from moe_cfg).
        moe_pad_expert_input_to_capacity=impl_class(moe.impl).pads_megatron_input(moe),
        # Softmax over all experts, then top-k (Switch/GShard) unless renormalised.
        moe_router_pre_softmax=not moe.renormalize,
        moe_grouped_gemm=False,
        init_method_std=m.init_std,
        # We initialise parameters ourselves, layout-independently (model/init.py).
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        bf16=precision == torch.bfloat16,
        # Fused kernels need CUDA extensions we do not require.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(cfg: TrainConfig, pctx: ParallelContext, moe: bool):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer, TransformerLayerSubmodules)

    if moe:
        mlp = impl_class(cfg.moe.impl).mlp_spec(cfg, pctx)
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    core_attention = SDPAttention if cfg.model.attention == "sdpa" else DotProductAttention
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=core_attention,
            linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm, self_attention=attention,
        self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=RMSNorm,
        mlp=mlp, mlp_bda=get_bias_dropout_add))


def block_spec(cfg: TrainConfig, pctx: ParallelContext):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layers = [layer_spec(cfg, pctx, is_moe_layer(i, cfg.model.moe_every))
              for i in range(cfg.model.num_layers)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)


def build_model(cfg: TrainConfig, pctx: ParallelContext, vocab_size: int,
                precision: torch.dtype = torch.float32):
    """Build the GPT-MoE model on ``pctx.device`` and initialise it from ``train.seed``."""
    from megatron.core.models.gpt import GPTModel

    check_impl(cfg)
    tconf = transformer_config(cfg, pctx, precision)
    model = GPTModel(
        config=tconf,
        transformer_layer_spec=block_spec(cfg, pctx),
        vocab_size=padded_vocab_size(vocab_size, cfg.make_vocab_multiple),
        max_sequence_length=cfg.data.seq_len,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        parallel_output=True,
    )
    init_parameters(model, cfg, pctx)
    apply_recompute(model, cfg.train.recompute)
    return model.to(pctx.device)


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True where attention is masked (future positions)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device),
                      diagonal=1)[None, None]
