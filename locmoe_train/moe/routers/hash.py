"""Hash layers (Roller et al. 2021, ``moe.router: hash``).

Legend: T tokens on this rank, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locmoe_train.errors import UserError
from locmoe_train.moe.routers import register_router
from locmoe_train.moe.routers.base import HFExport, Router, RouterSetup
from locmoe_train.moe.routing import RoutingResult


@register_router("hash")
class HashRouter(Router):
    """A fixed random map from token id to expert; no learned router.

    The map is a seeded balanced assignment of the vocabulary
    (``vocab_id -> perm(vocab_id) % E``). Gate value 1. The token ids come
    from the layer (``moe/layer.py: token_ids_scope``).

    ``moe.max_nodes_per_token`` needs nothing here: each token goes to one
    expert, hence one node, and the limit is at least 1.
    """

    needs_token_ids = True

    def __init__(self, cfg, hidden_size, setup: RouterSetup = RouterSetup()):
        super().__init__(cfg, hidden_size, setup)
        perm = torch.randperm(setup.vocab_size,
                              generator=torch.Generator().manual_seed(setup.seed))
        self.register_buffer("table", perm % cfg.num_experts, persistent=False)

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        if token_ids_T is None:
            raise RuntimeError("hash routing needs the token ids: run the model inside "
                               "moe.layer.token_ids_scope(ids)")
        expert_T = self.table.to(token_ids_T.device)[token_ids_T]
        map_TE = F.one_hot(expert_T, self.num_experts).bool()
        scores_TE = map_TE.float()
        return RoutingResult(map_TE, scores_TE, scores_TE, requested_slots=x_TD.shape[0])

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.top_k != 1:
            raise UserError(f"moe.router=hash sends each token to one expert: set moe.top_k=1 "
                            f"(got {cfg.top_k}).")

    @classmethod
    def hf_export(cls, cfg) -> HFExport:
        return HFExport(None, reason="its experts depend on the token ids, which transformers "
                                     "does not pass to the MLP layers")
