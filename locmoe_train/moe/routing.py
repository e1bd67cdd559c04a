"""What a router hands to the dispatcher, and the capacity/drop rules.

Legend: T tokens on this rank, E experts.

A routing decision is a boolean map ``routing_map_TE`` (token t is processed
by expert e) and the gate values ``gates_TE`` (zero where the map is False).
The map form covers every router alike: top-k (exactly K per token), expert
choice (any number per token, C per expert), hash (one per token) and
dropped tokens (no expert: the residual carries them).

Node-limited routing (``moe.max_nodes_per_token = M``, DeepSeek-V3 style):
each token may use experts on at most M nodes. ``node_limited_mask`` ranks
the nodes per token by their best expert score and allows the experts on the
token's top-M nodes; the routers then run their usual selection restricted to
the allowed experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from locmoe_train.errors import UserError


@dataclass
class RoutingResult:
    routing_map_TE: torch.Tensor  # bool: kept (token, expert) pairs
    gates_TE: torch.Tensor  # fp32 gate values, 0 where not routed
    scores_TE: torch.Tensor  # fp32 raw router output (logits or scores), for metrics
    # Slots the router wanted to fill (T*K for token choice), for the drop fraction.
    requested_slots: int
    # Per-expert capacity when the routing is capacity-bounded, else None.
    capacity: Optional[int] = None
    # Unweighted aux terms the router computed (moe/aux.py), name -> scalar with grad.
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    # Inputs of the auxiliary losses (moe/aux.py), with grad where they have one:
    # router probabilities over all experts (balance and locality losses) ...
    probs_TE: Optional[torch.Tensor] = None
    # ... the token choice before any capacity drop (balance loss) ...
    selected_TE: Optional[torch.Tensor] = None
    # ... and the logits the probabilities came from (z-loss); None: scores_TE.
    logits_TE: Optional[torch.Tensor] = None

    @property
    def gate_logits_TE(self) -> torch.Tensor:
        return self.scores_TE if self.logits_TE is None else self.logits_TE


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


def drop_over_capacity_per_expert(routing_map_TE: torch.Tensor, priority_TE: torch.Tensor,
                                  capacity_E: torch.Tensor) -> torch.Tensor:
    """``drop_over_capacity`` (policy ``probs``) with expert e keeping at most
    ``capacity_E[e]`` tokens (int64 [E]); equal capacities give exactly its result."""
    num_tokens = routing_map_TE.shape[0]
    masked = priority_TE.float().masked_fill(~routing_map_TE, float("-inf"))
    order_TE = torch.sort(masked, dim=0, descending=True, stable=True).indices
    slot_T1 = torch.arange(num_tokens, device=routing_map_TE.device)[:, None]
    keep_TE = torch.zeros_like(routing_map_TE)
    keep_TE.scatter_(0, order_TE, (slot_T1 < capacity_E.to(slot_T1.device)[None, :])
                     .expand_as(routing_map_TE))
    return routing_map_TE & keep_TE


# ---- node-limited routing ---------------------------------------------------------
# Legend: N nodes that hold experts of this layer, M = moe.max_nodes_per_token.


def compact_nodes(expert_node_E: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Node ids (any int64 values) -> dense indices ``0..N-1`` in increasing id order, and N.

    Runs ``torch.unique``, which syncs with the host on accelerators: routers
    call it once and cache the result (``Router._node_layout``).
    """
    if expert_node_E.dim() != 1:
        raise ValueError(f"expert_node_E must be 1-D [E], got shape {tuple(expert_node_E.shape)}")
    nodes_N, node_index_E = torch.unique(expert_node_E, sorted=True, return_inverse=True)
    return node_index_E, int(nodes_N.numel())


def node_limited_mask_dense(scores_TE: torch.Tensor, node_index_E: torch.Tensor, num_nodes: int,
                            max_nodes: int) -> torch.Tensor:
    """``node_limited_mask`` with the nodes already dense (``compact_nodes``): no host sync.

    ``node_index_E`` must be on the device of ``scores_TE``.
    """
    T, E = scores_TE.shape
    if max_nodes >= num_nodes:
        return torch.ones(T, E, dtype=torch.bool, device=scores_TE.device)
    scores_TE = scores_TE.detach()
    index_TE = node_index_E.view(1, E).expand(T, E)
    # Node score: the best score over the node's experts.
    node_score_TN = scores_TE.new_full((T, num_nodes), float("-inf")).scatter_reduce(
        1, index_TE, scores_TE, reduce="amax", include_self=True)
    # Stable descending sort: among equal node scores the lower node index ranks first.
    top_TM = torch.sort(node_score_TN, dim=1, descending=True, stable=True).indices[:, :max_nodes]
    allowed_TN = torch.zeros(T, num_nodes, dtype=torch.bool, device=scores_TE.device)
    allowed_TN.scatter_(1, top_TM, True)
    return allowed_TN.gather(1, index_TE)


def node_limited_mask(scores_TE: torch.Tensor, expert_node_E: torch.Tensor | None,
                      max_nodes: int) -> torch.Tensor:
    """Bool ``[T, E]``: True where expert e's node is among token t's top-``max_nodes`` nodes.

    A node's score for a token is the maximum of ``scores_TE`` over the experts
    on that node (DeepSeek-V3's node-limited routing, with the max as the node
    score). Ties between nodes go to the lower node id, so the mask is
    deterministic. ``expert_node_E`` ([E] int64, any device, ids need not be
    contiguous) gives each expert's node; ``None`` means one node. With
    ``max_nodes`` >= the number of nodes every expert is allowed.
    """
    T, E = scores_TE.shape
    if expert_node_E is None:
        return torch.ones(T, E, dtype=torch.bool, device=scores_TE.device)
    if expert_node_E.shape != (E,):
        raise ValueError(f"expert_node_E has shape {tuple(expert_node_E.shape)}, "
                         f"scores have {E} experts")
    node_index_E, num_nodes = compact_nodes(expert_node_E.to(scores_TE.device))
    return node_limited_mask_dense(scores_TE, node_index_E, num_nodes, max_nodes)


def check_node_limit(expert_node_E: torch.Tensor, max_nodes: int, top_k: int) -> None:
    """UserError unless any ``max_nodes`` nodes together hold at least ``top_k`` experts.

    Otherwise a token whose top nodes are the smallest ones could not get
    ``top_k`` experts. Needs the expert placement, which the layer sets after
    the router is built, so routers run this at their first forward.
    """
    counts_N = torch.unique(expert_node_E.detach().cpu(), return_counts=True)[1]
    counts = sorted(counts_N.tolist())
    if max_nodes >= len(counts) or sum(counts[:max_nodes]) >= top_k:
        return
    fewest = sum(counts[:max_nodes])
    need = next((m for m in range(1, len(counts) + 1) if sum(counts[:m]) >= top_k), len(counts))
    raise UserError(
        f"moe.max_nodes_per_token={max_nodes} with moe.top_k={top_k}: the experts are spread "
        f"over {len(counts)} nodes with {counts} experts per node, so {max_nodes} node(s) may "
        f"hold only {fewest} experts and a token could not get its top_k experts. Set "
        f"moe.max_nodes_per_token >= {need} (or null for no limit), or moe.top_k <= {fewest}.")
