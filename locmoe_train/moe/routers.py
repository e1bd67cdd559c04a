"""Routers, chosen by ``moe.router``: top-k softmax, expert choice, aux-loss-free bias, hash.

Legend: T tokens on this rank, D hidden size, E experts, K experts per token.

A router maps ``x_TD`` to a ``RoutingResult`` and communicates only to
all-reduce the small per-expert counts its losses need across the
sequence-parallel group. Router logits are computed in fp32. Router weights
are replicated over tensor-parallel ranks, which see different tokens under
sequence parallelism, so they carry the ``sequence_parallel`` tag: their
gradients are summed over the TP group.

Node-limited routing (``moe.max_nodes_per_token``): ``Router._node_mask``
gives the (token, expert) pairs allowed on each token's top nodes, ranked by
the router's own selection scores, and each router restricts its usual
selection to them. The check that the limit leaves room for ``top_k`` experts
needs the expert placement (``expert_node_E``), which the layer sets after
building the router, so it runs at the first forward (a ``UserError``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from locmoe_train.config import MoEConfig
from locmoe_train.moe.losses import router_z_loss, switch_load_balancing_loss
from locmoe_train.moe.routing import (RoutingResult, check_node_limit, compact_nodes,
                                     drop_over_capacity, expert_capacity,
                                     node_limited_mask_dense)


class Router(nn.Module):
    needs_token_ids = False
    adapts_to_load = False  # True: step_end() must run after every step, with global counts
    # Extra constructor arguments this router takes from the layer's context.
    init_kwargs: tuple[str, ...] = ()
    # Node of each expert ([E] int64), set by the layer; None = all on one node.
    expert_node_E: torch.Tensor | None = None
    # Whether the node limit must leave room for top_k experts per token
    # (token-choice routers; expert choice has no per-token count).
    node_limit_needs_top_k = True
    # (expert_node_E it was built from, device, dense node index [E] there, N).
    _node_layout_cache: tuple | None = None

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

    def _node_layout(self, device) -> tuple[torch.Tensor, int]:
        """Dense node index of each expert on ``device`` and the node count, cached.

        Rebuilt when ``expert_node_E`` is replaced by another tensor (not when
        it is modified in place) or the device changes; the first build checks
        that the node limit leaves room for ``top_k`` experts.
        """
        cache = self._node_layout_cache
        if cache is None or cache[0] is not self.expert_node_E or cache[1] != device:
            node_E = self.expert_node_E.detach().cpu()
            if node_E.shape != (self.num_experts,):
                raise ValueError(f"expert_node_E has shape {tuple(node_E.shape)}, the router has "
                                 f"{self.num_experts} experts")
            if self.node_limit_needs_top_k:
                check_node_limit(node_E, self.cfg.max_nodes_per_token, self.top_k)
            node_index_E, num_nodes = compact_nodes(node_E)
            cache = (self.expert_node_E, device, node_index_E.to(device), num_nodes)
            self._node_layout_cache = cache
        return cache[2], cache[3]

    def _node_mask(self, scores_TE: torch.Tensor) -> torch.Tensor | None:
        """Allowed (token, expert) pairs under ``moe.max_nodes_per_token``, by ``scores_TE``.

        ``None`` when no limit applies (no limit set, no placement, or the limit
        covers every node), so unlimited routing runs exactly the usual code.
        """
        max_nodes = self.cfg.max_nodes_per_token
        if max_nodes is None or self.expert_node_E is None:
            return None
        node_index_E, num_nodes = self._node_layout(scores_TE.device)
        if max_nodes >= num_nodes:
            return None
        return node_limited_mask_dense(scores_TE, node_index_E, num_nodes, max_nodes)


def _topk_map(scores_TE: torch.Tensor, k: int,
              allowed_TE: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per token; with ``allowed_TE`` only among the allowed experts.

    The caller guarantees at least k allowed experts per token
    (``check_node_limit``), so a disallowed (-inf) expert is never chosen.
    """
    if allowed_TE is not None:
        scores_TE = scores_TE.detach().masked_fill(~allowed_TE, float("-inf"))
    top_TK = torch.topk(scores_TE, k, dim=-1).indices
    map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, top_TK, True)
    return map_TE, top_TK


class TopKRouter(Router):
    """Switch/GShard token choice: softmax over experts, top-k, optional renormalisation.

    With ``moe.capacity_factor`` each expert keeps at most
    ``ceil(factor * T * K / E)`` tokens, chosen by ``moe.drop_policy``;
    without it the routing is dropless.

    With ``moe.max_nodes_per_token`` the top-k is taken among the experts on
    the token's top nodes (ranked by probability); the gates are still the
    softmax over all experts at the chosen ones (renormalised only with
    ``renormalize``), and the balance loss sees the unmasked probabilities.
    """

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        selected_TE, _ = _topk_map(probs_TE, self.top_k, self._node_mask(probs_TE))
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

    With ``moe.max_nodes_per_token`` an expert only takes tokens whose top
    nodes (ranked by probability) include its node, so it may fill fewer than
    C slots. There is no per-token count to protect, so no top_k check.
    """

    node_limit_needs_top_k = False

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        c = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else self.top_k
        capacity = min(x_TD.shape[0], expert_capacity(x_TD.shape[0], self.num_experts, 1, c))
        allowed_TE = self._node_mask(probs_TE)
        candidates_TE = probs_TE.detach()
        if allowed_TE is not None:
            candidates_TE = candidates_TE.masked_fill(~allowed_TE, float("-inf"))
        top_CE = torch.topk(candidates_TE, capacity, dim=0).indices
        map_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, top_CE, True)
        if allowed_TE is not None:  # fewer than C allowed tokens: the rest were -inf picks
            map_TE &= allowed_TE
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

    With ``moe.max_nodes_per_token`` nodes are ranked by the biased selection
    scores (score + bias) and the top-k is taken among their experts.
    """

    adapts_to_load = True

    def __init__(self, cfg, hidden_size, sequence_parallel, sp_group=None, sp_size=1):
        super().__init__(cfg, hidden_size, sequence_parallel, sp_group, sp_size)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE.detach() + self.expert_bias
        selected_TE, _ = _topk_map(select_TE, self.top_k, self._node_mask(select_TE))
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

    ``moe.max_nodes_per_token`` needs nothing here: each token goes to one
    expert, hence one node, and the limit is at least 1.
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
