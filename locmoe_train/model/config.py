"""The model's shape: the ``model`` section, and the checks that need nothing but it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from locmoe_train.errors import UserError


@dataclass
class ModelConfig:
    # Transformer layers.
    num_layers: int = 4
    # Model width (hidden size of every layer).
    hidden_size: int = 128
    # Attention heads per layer; must divide model.hidden_size.
    num_attention_heads: int = 4
    # Grouped-query attention; null means one KV head per query head.
    num_query_groups: Optional[int] = None
    # Dense (non-MoE) layers' SwiGLU width; null = 8/3 * hidden rounded up to 64.
    ffn_hidden_size: Optional[int] = None
    # Every k-th layer is an MoE layer (1: every layer; 2: layers 2, 4, ...).
    moe_every: int = 1
    # Vocabulary size; null takes it from the prepared data's tokenizer.
    vocab_size: Optional[int] = None
    # Embedding/output rows are padded to a multiple of this (independent of TP
    # so that layouts with different TP sizes build the same model).
    make_vocab_size_divisible_by: int = 128
    # Base of the rotary position embedding (RoPE) frequencies.
    rotary_base: float = 10000.0
    # Epsilon of the RMSNorm layers.
    norm_eps: float = 1e-5
    # Standard deviation of the normal initialisation of the weights.
    init_std: float = 0.02
    # Dropout on the output of attention and MLP blocks (0: none).
    hidden_dropout: float = 0.0
    # Dropout on the attention probabilities (0: none).
    attention_dropout: float = 0.0
    # Share one matrix between the input embedding and the output layer.
    tie_embeddings: bool = False
    # Core attention: sdpa = torch's scaled_dot_product_attention (flash /
    # memory-efficient kernels on GPU); megatron = megatron-core's unfused
    # DotProductAttention (materialises the [b, h, s, s] scores).
    attention: Literal["sdpa", "megatron"] = "sdpa"

    def validate(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "moe_every",
                    "make_vocab_size_divisible_by"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            near = min((d for d in range(1, self.hidden_size + 1) if self.hidden_size % d == 0),
                       key=lambda d: abs(d - self.num_attention_heads))
            raise UserError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}: pick a head count "
                f"that divides the hidden size (e.g. {near}).")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise UserError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}: use a divisor of the head count.")
        if self.moe_every > self.num_layers:
            raise UserError(
                f"model.moe_every={self.moe_every} is larger than model.num_layers="
                f"{self.num_layers}, so the model would have no MoE layer: use a value between "
                f"1 and {self.num_layers}.")
        for key in ("num_query_groups", "ffn_hidden_size", "vocab_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer "
                                f"(or null for the default).")
        for key in ("rotary_base", "norm_eps", "init_std"):
            if not getattr(self, key) > 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be > 0.")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"model.{key}={getattr(self, key)} must lie in [0, 1).")
