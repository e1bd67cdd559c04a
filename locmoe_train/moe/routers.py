"""Routers, chosen by ``moe.router``: top-k softmax, expert choice, aux-loss-free bias, hash.

Legend: T tokens on this rank, D hidden size, E experts, K experts per token.

A router maps ``x_TD`` to a ``RoutingResult`` and communicates only to
all-reduce the small per-expert counts its losses need across the
sequence-parallel group. Router logits are computed in fp32. Router weights
are replicated over tensor-parallel ranks, which see different tokens under
sequence parallelism, so they carry the ``sequence_parallel`` tag: their
gradients are summed over the TP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from locmoe_train.config import MoEConfig
from locmoe_train.moe.losses import router_z_loss, switch_load_balancing_loss
from locmoe_train.moe.routing import RoutingResult, drop_over_capacity, expert_capacity


class Router(nn.Module):
    needs_token_ids = False
    adapts_to_load = False  # True: step_end() must run after every step, with global counts
    # Extra constructor arguments this router takes from the layer's context.
    init_kwargs: tuple[str, ...] = ()

    def __init__(self, cfg: MoEConfig, hidden_size: int, sequence_parallel: bool,
                 sp_group=None, sp_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.sp_group, self.sp_size = sp_group, sp_size
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)  # replaced by model/init.py
        setattr(self.weight, "sequence_parallel", sequence_parallel)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight.float())

    def _aux(self, logits_TE, probs_TE, selected_TE) -> dict[str, torch.Tensor]:
        aux = {}
        if self.cfg.aux_loss_coeff > 0:
            aux["load_balancing_loss"] = switch_load_balancing_loss(
                probs_TE, selected_TE, self.top_k, self.sp_group, self.sp_size)
        if self.cfg.z_loss_coeff > 0:
            aux["z_loss"] = router_z_loss(logits_TE, self.sp_group, self.sp_size)
        return aux

    def step_end(self, counts_E: torch.Tensor, step: int | None = None, loss=None) -> None:
        """After each optimizer step: that step's global tokens per expert, the step
        number and this rank's training loss (a device scalar)."""


def _topk_map(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top_TK = torch.topk(scores_TE, k, dim=-1).indices
    map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, top_TK, True)
    return map_TE, top_TK


class TopKRouter(Router):
    """Switch/GShard token choice: softmax over experts, top-k, optional renormalisation.

    With ``moe.capacity_factor`` each expert keeps at most
    ``ceil(factor * T * K / E)`` tokens, chosen by ``moe.drop_policy``;
    without it the routing is dropless.
    """

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        selected_TE, _ = _topk_map(probs_TE, self.top_k)
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
                             aux=self._aux(logits_TE, probs_TE, selected_TE), probs_TE=probs_TE)


class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: each expert takes its top-C tokens by softmax score.

    ``C = ceil(c * T / E)`` with ``c = moe.capacity_factor`` (default: top_k),
    so on average each token gets ``c`` experts; some get none. Balanced by
    construction: no balance loss (z-loss still applies when set).
    """

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        c = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else self.top_k
        capacity = min(x_TD.shape[0], expert_capacity(x_TD.shape[0], self.num_experts, 1, c))
        top_CE = torch.topk(probs_TE, capacity, dim=0).indices
        map_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, top_CE, True)
        aux = {}
        if self.cfg.z_loss_coeff > 0:
            aux["z_loss"] = router_z_loss(logits_TE, self.sp_group, self.sp_size)
        return RoutingResult(map_TE, probs_TE * map_TE, logits_TE,
                             requested_slots=capacity * self.num_experts, capacity=capacity,
                             aux=aux, probs_TE=probs_TE)


class AuxFreeRouter(Router):
    """DeepSeek-V3 aux-loss-free balancing: sigmoid scores, top-k of score + bias.

    The bias only changes *which* experts are chosen; gates are the chosen
    sigmoid scores, normalised to sum to 1. After each step the bias of
    overloaded experts drops and that of underloaded ones rises by
    ``moe.bias_update_rate``. The bias is a buffer: in the state dict, not
    touched by the optimizer.
    """

    adapts_to_load = True

    def __init__(self, cfg, hidden_size, sequence_parallel, sp_group=None, sp_size=1):
        super().__init__(cfg, hidden_size, sequence_parallel, sp_group, sp_size)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        selected_TE, _ = _topk_map(scores_TE.detach() + self.expert_bias, self.top_k)
        gates_TE = scores_TE * selected_TE
        gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return RoutingResult(selected_TE, gates_TE, logits_TE,
                             requested_slots=x_TD.shape[0] * self.top_k,
                             aux=self._aux(logits_TE, probs_TE, selected_TE), probs_TE=probs_TE)

    @torch.no_grad()
    def step_end(self, counts_E: torch.Tensor, step=None, loss=None) -> None:
        error_E = counts_E.float().mean() - counts_E.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(error_E)


class HashRouter(Router):
    """Roller et al. 2021 hash layers: a fixed random map from token id to expert.

    No learned router. The map is a seeded balanced assignment of the
    vocabulary (``vocab_id -> perm(vocab_id) % E``). Gate value 1.
    """

    needs_token_ids = True
    init_kwargs = ("vocab_size", "seed")

    def __init__(self, cfg, hidden_size, sequence_parallel, sp_group=None, sp_size=1,
                 vocab_size: int = 1, seed: int = 0):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.sp_group, self.sp_size = sp_group, sp_size
        perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("table", perm % cfg.num_experts, persistent=False)

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        if token_ids_T is None:
            raise RuntimeError("hash routing needs the token ids (set_token_ids was not called)")
        expert_T = self.table.to(token_ids_T.device)[token_ids_T]
        map_TE = F.one_hot(expert_T, self.num_experts).bool()
        scores_TE = map_TE.float()
        return RoutingResult(map_TE, scores_TE, scores_TE, requested_slots=x_TD.shape[0])


ROUTERS = {"topk": TopKRouter, "expert_choice": ExpertChoiceRouter,
           "aux_free": AuxFreeRouter, "hash": HashRouter}


def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum per-expert counts over every rank (each token is routed on exactly one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts
