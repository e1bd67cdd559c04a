"""Switch/GShard token choice (``moe.router: topk``).

Legend: T tokens on this rank, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from locmoe_train.moe.routers import register_router
from locmoe_train.moe.routers.base import HFExport, LinearGateRouter, topk_map
from locmoe_train.moe.routing import RoutingResult, drop_over_capacity, expert_capacity


@register_router("topk")
class TopKRouter(LinearGateRouter):
    """Softmax over experts, top-k, optional renormalisation.

    With ``moe.capacity_factor`` each expert keeps at most
    ``ceil(factor * T * K / E)`` tokens, chosen by ``moe.drop_policy``;
    without it the routing is dropless.

    With ``moe.max_nodes_per_token`` the top-k is taken among the experts on
    the token's top nodes (ranked by probability); the gates are still the
    softmax over all experts at the chosen ones (renormalised only with
    ``renormalize``), and the balance loss sees the unmasked probabilities.

    With the locality node bias (``moe.locality_node_bias``) the rank's node row
    is added to the logits before the softmax.
    """

    supports_node_bias = True

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.add_node_bias(self.logits(x_TD))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        selected_TE, _ = topk_map(probs_TE, self.top_k, self.node_mask(probs_TE))
        gates_TE = probs_TE * selected_TE
        if self.cfg.renormalize:
            gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True)
        kept_TE, capacity = selected_TE, None
        if self.cfg.capacity_factor is not None:
            capacity = expert_capacity(x_TD.shape[0], self.num_experts, self.top_k,
                                       self.cfg.capacity_factor)
            kept_TE = drop_over_capacity(selected_TE, probs_TE, capacity, self.cfg.drop_policy)
        return RoutingResult(kept_TE, gates_TE * kept_TE, logits_TE,
                             requested_slots=x_TD.shape[0] * self.top_k, capacity=capacity,
                             probs_TE=probs_TE, selected_TE=selected_TE)

    @classmethod
    def applies_capacity(cls, cfg) -> bool:
        return cfg.capacity_factor is not None

    @classmethod
    def describe_capacity(cls, cfg) -> str:
        return f"factor {cfg.capacity_factor}" if cfg.capacity_factor else "dropless"

    @classmethod
    def hf_export(cls, cfg) -> HFExport:
        warnings = ()
        if cfg.capacity_factor is not None:
            warnings = (
                f"moe.capacity_factor={cfg.capacity_factor}: the training run dropped tokens "
                f"routed to a full expert (in evaluation too); the exported model is dropless "
                f"(every token reaches its top_k experts), so its outputs differ from this run's "
                f"wherever an expert overflowed.",)
        if not cfg.renormalize:
            return HFExport("custom", "topk", mixtral_mismatch=(
                "moe.renormalize=false (Mixtral renormalises the chosen top-k gates)"),
                warnings=warnings)
        return HFExport("mixtral", "topk", warnings=warnings)

    @classmethod
    def adak_support(cls, cfg):
        if cfg.capacity_factor is not None:
            return (f"moe.capacity_factor={cfg.capacity_factor}: a per-token expert count needs "
                    f"dropless dispatch; pass --moe.capacity_factor=null (it does not change the "
                    f"model's weights).")
        return None
