"""Auxiliary MoE losses as pure functions.

Legend: T tokens on this rank, E experts, K experts per token.

Both losses are *partial sums* when the tokens of one sequence are spread
over a sequence-parallel group (``group`` with ``group_size`` ranks): counts
are all-reduced (they carry no gradient), but each rank sums only its own
tokens' probabilities and divides by the global token count. The partial
losses of the group add up to the loss over all tokens, and each rank's
gradient is exactly that loss's gradient for its own tokens, so TP=2 trains
like TP=1. Without a group they are the ordinary losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def switch_load_balancing_loss(probs_TE: torch.Tensor, selected_TE: torch.Tensor, top_k: int,
                               group=None, group_size: int = 1) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_i f_i * P_i`` (unweighted).

    ``f_i``: fraction of the T*K token slots whose choice is expert i (before any
    capacity drop); ``P_i``: mean router probability of expert i over tokens.
    Equals 1 when routing is perfectly uniform.
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = selected_TE.sum(0).to(torch.float32)
    if group is not None and group_size > 1:
        dist.all_reduce(counts_E, group=group)
    total = num_tokens * group_size
    f_E = counts_E / (total * top_k)
    p_E = probs_TE.float().sum(0) / total
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor, group=None, group_size: int = 1) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (unweighted)."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return z_T.pow(2).sum() / (logits_TE.shape[0] * group_size)


def locality_loss(probs_TE: torch.Tensor, local_E: torch.Tensor, eps: float) -> torch.Tensor:
    """LocMoE locality loss ``KL(D_c || D_l)`` for this rank's tokens (unweighted).

    ``D_c``: mean router probability per expert over the rank's tokens.
    ``D_l``: ``(1 - eps) / |L|`` on the experts hosted on this rank's node (``local_E``),
    plus ``eps / E`` everywhere. Minimised by routing to experts on the same node.
    """
    num_experts = probs_TE.shape[1]
    d_c = probs_TE.float().mean(0)
    d_l = local_E.float() * (1.0 - eps) / local_E.sum().clamp_min(1) + eps / num_experts
    return torch.sum(d_c * (torch.log(d_c.clamp_min(1e-12)) - torch.log(d_l)))
