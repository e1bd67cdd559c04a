"""Causal LM for exported locmoe-train checkpoints that Mixtral cannot express.

Shipped next to the weights of ``locmoe-train export-hf`` and loaded with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``;
imports only torch and transformers (>= 5). Attention, RoPE, RMSNorm, the
decoder loop, caching and generation are Mixtral's; what differs is the MLP:

* MoE layers route with ``config.router_type`` (see ``LocMoEConfig``);
  routing is dropless token choice, which is what the training run's
  evaluation computes (LocMoE+ applies its expert capacity only in training);
* with ``config.moe_every > 1`` the layers in between are dense SwiGLU MLPs.

Legend: T tokens, D hidden, E experts, K experts per token, F expert width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention, MixtralDecoderLayer, MixtralForCausalLM, MixtralModel,
    MixtralPreTrainedModel, MixtralRMSNorm, MixtralRotaryEmbedding)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from .configuration_locmoe import LocMoEConfig


class LocMoEGate(nn.Module):
    """Routing of one MoE layer: ``x_TD -> (logits_TE, weights_TK, experts_TK)``.

    ``logits_TE`` are the scores whose softmax is the routing distribution
    (for ``output_router_logits``); for LocMoE+ that is ``affinity / tau``.
    """

    def __init__(self, config: LocMoEConfig):
        super().__init__()
        self.kind = config.router_type
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.renormalize = config.renormalize
        if self.kind == "locmoe_plus":
            self.tau = nn.Parameter(torch.ones(()), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.kind == "aux_free":
            self.expert_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    def forward(self, x_TD: torch.Tensor):
        x_TD = x_TD.float()
        if self.kind == "locmoe_plus":
            # Cosine of the token with each expert's fixed gate vector (constant on the
            # expert's contiguous block of D / E channels).
            T, D = x_TD.shape
            block = D // self.num_experts
            sums_TE = x_TD.view(T, self.num_experts, block).sum(-1)
            norm_T1 = x_TD.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            affinity_TE = sums_TE / (math.sqrt(block) * norm_T1)
            logits_TE = affinity_TE / self.tau.float()
            experts_TK = torch.topk(affinity_TE, self.top_k, dim=-1).indices
            weights_TK = torch.softmax(logits_TE, dim=-1).gather(1, experts_TK)
            return logits_TE, weights_TK, experts_TK
        logits_TE = F.linear(x_TD, self.weight.float())
        if self.kind == "aux_free":
            scores_TE = torch.sigmoid(logits_TE)
            experts_TK = torch.topk(scores_TE + self.expert_bias.float(), self.top_k, -1).indices
            weights_TK = scores_TE.gather(1, experts_TK)
            return logits_TE, weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20), \
                experts_TK
        weights_TK, experts_TK = torch.topk(torch.softmax(logits_TE, dim=-1), self.top_k, -1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return logits_TE, weights_TK, experts_TK


class LocMoEExperts(nn.Module):
    """SwiGLU experts stacked as ``gate_up_proj [E, 2F, D]`` and ``down_proj [E, D, F]``."""

    def __init__(self, config: LocMoEConfig):
        super().__init__()
        E, D, Fw = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fw, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))

    def forward(self, x_TD, weights_TK, experts_TK):
        out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
        for e in torch.unique(experts_TK).tolist():
            token_T, slot_T = torch.where(experts_TK == e)
            gate, up = F.linear(x_TD[token_T], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out_TD.index_add_(0, token_T, y.float() * weights_TK[token_T, slot_T, None])
        return out_TD.to(x_TD.dtype)


class LocMoESparseBlock(nn.Module):
    def __init__(self, config: LocMoEConfig):
        super().__init__()
        self.gate = LocMoEGate(config)
        self.experts = LocMoEExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        _, weights_TK, experts_TK = self.gate(x_TD)
        return self.experts(x_TD, weights_TK, experts_TK).reshape(shape)


class LocMoEDenseMLP(nn.Module):
    def __init__(self, config: LocMoEConfig):
        super().__init__()
        D, Fw = config.hidden_size, config.dense_intermediate_size
        self.gate_proj = nn.Linear(D, Fw, bias=False)
        self.up_proj = nn.Linear(D, Fw, bias=False)
        self.down_proj = nn.Linear(Fw, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LocMoEDecoderLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer (its ``forward``) with our MLP."""

    def __init__(self, config: LocMoEConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = MixtralAttention(config, layer_idx)
        moe = layer_idx % config.moe_every == 0
        self.mlp = LocMoESparseBlock(config) if moe else LocMoEDenseMLP(config)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size,
                                                       eps=config.rms_norm_eps)


class LocMoEPreTrainedModel(MixtralPreTrainedModel):
    config_class = LocMoEConfig
    config: LocMoEConfig
    _no_split_modules = ["LocMoEDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(LocMoEGate, index=0),
        "hidden_states": LocMoEDecoderLayer,
        "attentions": MixtralAttention,
    }

    def _init_weights(self, module):
        # transformers' init functions skip tensors already loaded from the checkpoint.
        std = self.config.initializer_range
        if isinstance(module, LocMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LocMoEGate):
            if hasattr(module, "weight"):
                init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "tau"):
                init.ones_(module.tau)
            if hasattr(module, "expert_bias"):
                init.zeros_(module.expert_bias)
        else:
            super()._init_weights(module)


class LocMoEModel(LocMoEPreTrainedModel, MixtralModel):
    def __init__(self, config: LocMoEConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LocMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class LocMoEForCausalLM(LocMoEPreTrainedModel, MixtralForCausalLM):
    def __init__(self, config: LocMoEConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.model = LocMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


__all__ = ["LocMoEForCausalLM", "LocMoEModel", "LocMoEPreTrainedModel"]
