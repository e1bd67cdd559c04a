"""Expert choice (Zhou et al. 2022, ``moe.router: expert_choice``).

Legend: T tokens on this rank, E experts, C tokens per expert.
"""

from __future__ import annotations

import torch

from locmoe_train.moe.routers import register_router
from locmoe_train.moe.routers.base import HFExport, LinearGateRouter
from locmoe_train.moe.routing import RoutingResult, expert_capacity


@register_router("expert_choice")
class ExpertChoiceRouter(LinearGateRouter):
    """Each expert takes its top-C tokens by softmax score.

    ``C = ceil(c * T / E)`` with ``c = moe.capacity_factor`` (default: top_k),
    so on average each token gets ``c`` experts; some get none. Balanced by
    construction: no balance loss (z-loss still applies when set).

    With ``moe.max_nodes_per_token`` an expert only takes tokens whose top
    nodes (ranked by probability) include its node, so it may fill fewer than
    C slots. There is no per-token count to protect, so no top_k check.
    """

    node_limit_needs_top_k = False
    aux_terms = ("z_loss", "locality_loss")

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        c = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else self.top_k
        capacity = min(x_TD.shape[0], expert_capacity(x_TD.shape[0], self.num_experts, 1, c))
        allowed_TE = self.node_mask(probs_TE)
        candidates_TE = probs_TE.detach()
        if allowed_TE is not None:
            candidates_TE = candidates_TE.masked_fill(~allowed_TE, float("-inf"))
        top_CE = torch.topk(candidates_TE, capacity, dim=0).indices
        map_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, top_CE, True)
        if allowed_TE is not None:  # fewer than C allowed tokens: the rest were -inf picks
            map_TE &= allowed_TE
        return RoutingResult(map_TE, probs_TE * map_TE, logits_TE,
                             requested_slots=capacity * self.num_experts, capacity=capacity,
                             probs_TE=probs_TE)

    @classmethod
    def applies_capacity(cls, cfg) -> bool:
        return True

    @classmethod
    def describe_capacity(cls, cfg) -> str:
        return f"expert choice x{cfg.capacity_factor or cfg.top_k}"

    @classmethod
    def hf_export(cls, cfg) -> HFExport:
        return HFExport(None, reason="each expert picks its tokens from the whole batch, which "
                                     "a causal language model cannot reproduce token by token")
