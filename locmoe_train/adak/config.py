"""The Ada-K stage's configuration (the ``adak`` section), METHOD.md section 7."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from locmoe_train.errors import UserError


@dataclass
class AdaKConfig:
    """The Ada-K post-training stage (`locmoe-train adak`), METHOD.md section 7."""
    # PPO steps (one batch of train.global_batch_size sequences each), after the warm start.
    steps: int = 100
    # Warm-start steps before PPO (0: none): cross-entropy of pi(k|s) to the top-p count.
    warm_start_steps: int = 0
    # Mean expert count the warm start's top-p threshold p* aims at; null = moe.top_k.
    warm_start_mean_k: Optional[float] = None
    # AdamW on the allocators only (constant learning rate).
    lr: float = 1e-3
    # AdamW weight decay of the allocators.
    weight_decay: float = 0.1
    # Max global gradient norm of the allocators; 0 disables clipping.
    grad_clip: float = 1.0
    # PPO epochs over each rollout batch.
    ppo_epochs: int = 2
    # PPO ratio clip.
    clip: float = 0.2
    # PPO discount per layer (1: no discount over layers).
    gamma: float = 1.0
    # lambda of the expected-k penalty lambda * sum_n n P(n).
    k_penalty: float = 3e-3
    # Validation (argmax k against top-K) every N steps (0: only at the end).
    eval_interval: int = 50
    # Log every N steps.
    log_interval: int = 10
    # Stage checkpoints (allocators, optimizer, step, data position, RNG) every N
    # steps (0: only at the end) under <out_dir>/checkpoints, keeping the last `keep`.
    checkpoint_interval: int = 50
    # Stage checkpoints to keep.
    keep: int = 2
    # null = start fresh; "auto" = latest valid stage checkpoint in out_dir (fresh if none); or a path.
    resume: Optional[str] = None
    # Directory of the stage's outputs (metrics, checkpoints, the final model).
    out_dir: str = "runs/adak"

    def validate(self, moe) -> None:
        """Checks of the ``adak`` section (``moe``: the model's MoE section)."""
        E = moe.num_experts
        for key, low in [("steps", 1), ("ppo_epochs", 1), ("log_interval", 1), ("keep", 1),
                         ("warm_start_steps", 0), ("eval_interval", 0),
                         ("checkpoint_interval", 0)]:
            if getattr(self, key) < low:
                raise UserError(f"adak.{key}={getattr(self, key)} must be >= {low}.")
        for key in ("lr", "clip"):
            if getattr(self, key) <= 0:
                raise UserError(f"adak.{key}={getattr(self, key)} must be > 0.")
        for key in ("weight_decay", "k_penalty", "grad_clip"):
            if getattr(self, key) < 0:
                raise UserError(f"adak.{key}={getattr(self, key)} must be >= 0.")
        if not 0 < self.gamma <= 1:
            raise UserError(f"adak.gamma={self.gamma} must lie in (0, 1] (1: no discount over "
                            f"layers).")
        if self.warm_start_mean_k is not None and not 1 <= self.warm_start_mean_k <= E:
            raise UserError(f"adak.warm_start_mean_k={self.warm_start_mean_k} must lie in "
                            f"[1, moe.num_experts={E}] (or null for moe.top_k).")
