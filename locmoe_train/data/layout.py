"""How a step's batch splits over micro-batches and data-parallel ranks."""

from __future__ import annotations

from locmoe_train.errors import UserError


def check_batch_layout(global_batch_size: int, micro_batch_size: int, dp_size: int) -> None:
    """UserError unless a step's batch splits into equal micro-batches on every DP rank.

    The one place this is checked: by ``validate`` (dp 1), ``locmoe-train --check``
    and the data loader (the real data-parallel size).
    """
    per_round = micro_batch_size * dp_size
    if global_batch_size % per_round == 0:
        return
    lower = global_batch_size // per_round * per_round
    nearby = [v for v in (lower, lower + per_round) if v > 0]
    per_rank_ok = global_batch_size % dp_size == 0
    micro_ok = [m for m in range(1, global_batch_size // dp_size + 1)
                if (global_batch_size // dp_size) % m == 0] if per_rank_ok else []
    raise UserError(
        f"train.global_batch_size ({global_batch_size}) must be divisible by "
        f"train.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size}) "
        f"= {per_round}; use train.global_batch_size "
        f"{' or '.join(str(v) for v in nearby)}"
        + (f", or train.micro_batch_size one of {micro_ok}" if micro_ok else "") + ".")
