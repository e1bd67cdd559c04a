"""Core attention through PyTorch's ``scaled_dot_product_attention``.

Legend: s sequence, b batch, h heads on this TP rank, g KV groups on this rank,
d head dim.

megatron-core's local spec computes attention as explicit matmuls with a
materialised ``[b, h, s, s]`` score tensor (``DotProductAttention``). On a GPU
``F.scaled_dot_product_attention`` picks a flash or memory-efficient kernel
instead, which never materialises the scores; on CPU it is a fused reference.
This module is a drop-in ``core_attention`` for megatron's ``SelfAttention``
(same constructor and ``forward`` signature, same input/output layouts), chosen
by ``model.attention: sdpa``. It only supports what our spec uses: causal
self-attention, no attention bias, no packed sequences, vanilla softmax.

Why the explicit causal flag and not the mask megatron passes: the trainer's
mask is the plain causal triangle, and ``is_causal=True`` lets the kernel skip
the masked half instead of reading a mask tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class SDPAttention(torch.nn.Module):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type=None, pg_collection=None, **kwargs):
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__()
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal self-attention only, got {attn_mask_type}")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports the vanilla softmax only")
        self.config = config
        self.layer_number = max(1, layer_number)
        tp = (pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp")
              else config.tensor_model_parallel_size)
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        # (apply_query_key_layer_scaling divides the scores by the layer number and
        # multiplies them back inside megatron's softmax: no change to the result.)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query_sbhd, key_sbgd, value_sbgd, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert attention_bias is None and packed_seq_params is None
        s, b = query_sbhd.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]: the layout SDPA's kernels want.
        q = query_sbhd.permute(1, 2, 0, 3)
        k = key_sbgd.permute(1, 2, 0, 3)
        v = value_sbgd.permute(1, 2, 0, 3)
        gqa = self.heads != self.groups
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0 and not self.config.sequence_parallel:
            # Same RNG discipline as megatron's attention dropout under TP.
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                     scale=self.scale, enable_gqa=gqa)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                 scale=self.scale, enable_gqa=gqa)
        # [b, h, s, d] -> [s, b, h*d]
        return ctx.permute(2, 0, 1, 3).reshape(s, b, -1)
