"""What a router hands to the dispatcher, and the capacity/drop rules.

Legend: T tokens on this rank, E experts.

A routing decision is a boolean map ``routing_map_TE`` (token t is processed
by expert e) and the gate values ``gates_TE`` (zero where the map is False).
The map form covers every router alike: top-k (exactly K per token), expert
choice (any number per token, C per expert), hash (one per token) and
dropped tokens (no expert: the residual carries them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RoutingResult:
    routing_map_TE: torch.Tensor  # bool: kept (token, expert) pairs
    gates_TE: torch.Tensor  # fp32 gate values, 0 where not routed
    scores_TE: torch.Tensor  # fp32 raw router output (logits or scores), for metrics
    # Slots the router wanted to fill (T*K for token choice), for the drop fraction.
    requested_slots: int
    # Per-expert capacity when the routing is capacity-bounded, else None.
    capacity: Optional[int] = None
    # Unweighted auxiliary terms (name -> scalar tensor with grad).
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    # Router probabilities over all experts (with grad), for the locality loss.
    probs_TE: Optional[torch.Tensor] = None


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert may take: ``ceil(factor * T * K / E)`` (at least 1).

    Rounded to 9 decimals before the ceiling so that float noise does not add
    a slot (1.1 * 25 * 2 / 5 is 11.000000000000002 in binary floating point).
    """
    return max(1, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


def drop_over_capacity(routing_map_TE: torch.Tensor, priority_TE: torch.Tensor, capacity: int,
                       policy: str) -> torch.Tensor:
    """Keep at most ``capacity`` tokens per expert.

    ``policy="probs"`` keeps each expert's highest-priority tokens (ties go to
    the earlier token); ``"position"`` keeps the first ones in token order.
    """
    num_tokens = routing_map_TE.shape[0]
    if capacity >= num_tokens:
        return routing_map_TE
    if policy == "position":
        rank_TE = torch.cumsum(routing_map_TE.to(torch.int32), dim=0)
        return routing_map_TE & (rank_TE <= capacity)
    if policy != "probs":
        raise ValueError(f"unknown drop policy {policy!r}")
    masked = priority_TE.float().masked_fill(~routing_map_TE, float("-inf"))
    # Stable descending sort: equal priorities keep token order.
    order_TE = torch.sort(masked, dim=0, descending=True, stable=True).indices
    keep_TE = torch.zeros_like(routing_map_TE)
    keep_TE.scatter_(0, order_TE[:capacity], True)
    return routing_map_TE & keep_TE
