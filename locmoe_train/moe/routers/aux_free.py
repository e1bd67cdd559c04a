"""DeepSeek-V3 aux-loss-free balancing (``moe.router: aux_free``).

Legend: T tokens on this rank, E experts.
"""

from __future__ import annotations

import torch

from locmoe_train.moe.routers import register_router
from locmoe_train.moe.routers.base import HFExport, LinearGateRouter, RouterSetup, topk_map
from locmoe_train.moe.routing import RoutingResult


@register_router("aux_free")
class AuxFreeRouter(LinearGateRouter):
    """Sigmoid scores, top-k of score + bias.

    The bias only changes *which* experts are chosen; gates are the chosen
    sigmoid scores, normalised to sum to 1. After each step the bias of
    overloaded experts drops and that of underloaded ones rises by
    ``moe.bias_update_rate``. The bias is a buffer: in the state dict, not
    touched by the optimizer.

    With ``moe.max_nodes_per_token`` nodes are ranked by the biased selection
    scores (score + bias) and the top-k is taken among their experts.
    """

    adapts_to_load = True

    def __init__(self, cfg, hidden_size, setup: RouterSetup = RouterSetup()):
        super().__init__(cfg, hidden_size, setup)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE.detach() + self.expert_bias
        selected_TE, _ = topk_map(select_TE, self.top_k, self.node_mask(select_TE))
        gates_TE = scores_TE * selected_TE
        gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return RoutingResult(selected_TE, gates_TE, logits_TE,
                             requested_slots=x_TD.shape[0] * self.top_k, probs_TE=probs_TE,
                             selected_TE=selected_TE)

    @torch.no_grad()
    def step_end(self, counts_E, step=None, loss=None, ok=None) -> list[dict]:
        error_E = counts_E.float().mean() - counts_E.float()
        delta_E = self.cfg.bias_update_rate * torch.sign(error_E)
        if ok is not None:  # a skipped step moves no bias (on device: no host sync)
            delta_E = delta_E * ok
        self.expert_bias += delta_E
        return []

    @classmethod
    def hf_export(cls, cfg) -> HFExport:
        return HFExport("custom", "aux_free", mixtral_mismatch=(
            "moe.router=aux_free (Mixtral routes with a learned softmax top-k gate: "
            "moe.router=topk)"))
