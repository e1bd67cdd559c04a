"""The router interface, and the learned linear gate most routers share.

Legend: T tokens on this rank, D hidden size, E experts, K experts per token.

A router maps ``x_TD`` to a ``RoutingResult`` and communicates at most to
all-reduce small per-expert counts over the sequence-parallel group. It is
built with everything it needs (``RouterSetup``: the sequence-parallel group,
where each expert lives, the run's sequence length...), so a bad setting
fails at build time, not at the first step.

Every method of ``Router`` has a default; a router overrides what it does
differently:
* ``forward(x_TD, token_ids_T)``: the routing (the one method without a
  useful default);
* ``step_end(counts_E, step, loss)``: after each optimizer step, for routers
  that adapt (``adapts_to_load``); returns the events it caused (capacity
  changes) instead of keeping a mailbox;
* ``probe_controller(step)``: the capacity controller the loss probe sets
  at this step, if any;
* ``gauges()``: per-layer values identical on every rank, read at log time;
* ``checkpoint_state()`` / ``load_checkpoint_state()``: state that is not a
  module buffer (nn.Module's own ``state_dict`` name is taken);
* class-level answers asked by config, the startup summary, HF export and
  Ada-K instead of comparing router names: ``validate(cfg)``,
  ``applies_capacity(cfg)``, ``describe_capacity(cfg)``, ``hf_export(cfg)``,
  ``adak_support(cfg)``; and ``aux_terms``, the auxiliary losses
  (``moe/aux.py``) whose inputs the router provides.

``LinearGateRouter`` adds the learned gate ``logits = x W^T`` in fp32 (top-k,
expert choice and aux-free extend it). Its weight is replicated over tensor-
parallel ranks, which see different tokens under sequence parallelism, so it
carries the ``sequence_parallel`` tag: its gradient is summed over TP.

Node-limited routing (``moe.max_nodes_per_token``): ``Router.node_mask`` gives
the (token, expert) pairs allowed on each token's top nodes, ranked by the
router's own selection scores; each router restricts its usual selection to
them. Whether the limit leaves room for ``top_k`` experts is checked when the
router is built.

Locality node bias (``moe.locality_node_bias``; routers with
``supports_node_bias``): a learned ``node_bias`` [N nodes, E], zero at start;
a rank adds its node's row to its routing scores (selection and gate alike,
``add_node_bias``). It is the rank-dependent term the locality loss trains.
Without it the loss cannot act: every rank draws tokens from the same
distribution, so a router that sees only the token sends the same share of
every rank's tokens to each expert, and the same-node share stays at the
fraction of experts on a node whatever the routing (docs/locality.md). Each
row gets gradient only from its node's ranks; it is not weight-decayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from locmoe_train.errors import UserError
from locmoe_train.moe.aux import AUX_NAMES, AuxContext, active_terms, compute
from locmoe_train.moe.config import MoEConfig
from locmoe_train.moe.routing import (RoutingResult, check_node_limit, compact_nodes,
                                     node_limited_mask_dense)


@dataclass(frozen=True)
class RouterSetup:
    """What a router may need beyond its config; each router reads what it uses."""
    sequence_parallel: bool = False
    sp_group: object = None
    sp_size: int = 1
    # Node of each expert ([E] int64); None = all on one node.
    expert_node_E: Optional[torch.Tensor] = None
    vocab_size: int = 1  # hash routing
    seed: int = 0  # hash routing
    seq_len: int = 1  # LocMoE+ capacity (per sequence)
    max_steps: int = 1  # LocMoE+ capacity schedules
    # Bool [E]: the experts on this rank's node (locality node bias); None = unknown.
    local_experts_E: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class HFExport:
    """How a router's checkpoints export to transformers (``hf_export``)."""
    # "mixtral" when Mixtral can express it, "custom" for our trust_remote_code
    # model, None when it cannot be exported (then ``reason`` says why).
    architecture: Optional[str]
    router_type: Optional[str] = None  # the custom model's router kind
    reason: str = ""  # why it cannot be exported
    # Why Mixtral cannot express it (empty: it can, as far as the router goes).
    mixtral_mismatch: str = ""
    warnings: tuple[str, ...] = ()  # differences from the training run
    notes: tuple[str, ...] = ()  # what the user should know


class Router(nn.Module):
    # Set by the registry (``register_router``): the ``moe.router`` value.
    name: ClassVar[str] = ""
    needs_token_ids: ClassVar[bool] = False
    # True: step_end() must run after every step, with the step's global counts.
    adapts_to_load: ClassVar[bool] = False
    # Whether the node limit must leave room for top_k experts per token
    # (token-choice routers; expert choice has no per-token count).
    node_limit_needs_top_k: ClassVar[bool] = True
    # Names of the aux terms (moe/aux.py) this router provides inputs for.
    aux_terms: ClassVar[tuple[str, ...]] = ()
    # Whether forward() adds the locality node bias (``add_node_bias``).
    supports_node_bias: ClassVar[bool] = False

    def __init__(self, cfg: MoEConfig, hidden_size: int, setup: RouterSetup = RouterSetup()):
        super().__init__()
        self.cfg, self.setup = cfg, setup
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.sp_group, self.sp_size = setup.sp_group, setup.sp_size
        self.expert_node_E = setup.expert_node_E
        self._aux_context = AuxContext(top_k=cfg.top_k, sp_group=setup.sp_group,
                                       sp_size=setup.sp_size)
        self._aux = active_terms(cfg, self.aux_terms, self._aux_context, scope="router")
        self.node_bias, self._bias_row = None, 0
        if node_bias_active(cfg, self._num_nodes) and self.supports_node_bias:
            self.node_bias = nn.Parameter(torch.zeros(self._num_nodes, self.num_experts))
            setattr(self.node_bias, "no_weight_decay", True)
            setattr(self.node_bias, "keep_init", True)  # zero: model/init.py leaves it
            setattr(self.node_bias, "sequence_parallel", setup.sequence_parallel)
            if setup.local_experts_E is not None and bool(setup.local_experts_E.any()):
                self._bias_row = int(self._node_index_E[setup.local_experts_E.cpu()].min())

    def add_node_bias(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """``scores_TE`` plus this rank's node row of the locality bias (unchanged without)."""
        if self.node_bias is None:
            return scores_TE
        return scores_TE + self.node_bias[self._bias_row].float()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint from before moe.locality_node_bias: the bias starts at 0.
        if self.node_bias is not None and prefix + "node_bias" not in state_dict:
            state_dict[prefix + "node_bias"] = torch.zeros_like(self.node_bias)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __call__(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None
                 ) -> RoutingResult:
        routing = super().__call__(x_TD, token_ids_T)
        # The router-scope aux terms (moe/aux.py), right after routing.
        routing.aux.update(compute(self._aux, routing, self._aux_context))
        return routing

    @property
    def expert_node_E(self) -> torch.Tensor | None:
        """Node of each expert ([E] int64), None = one node. Setting it (the constructor
        does, from ``RouterSetup``) checks the node limit against it at once."""
        return self._expert_node_E

    @expert_node_E.setter
    def expert_node_E(self, node_E: torch.Tensor | None) -> None:
        self._expert_node_E, self._node_index_E, self._num_nodes = node_E, None, 1
        if node_E is None:
            return
        node_E = node_E.detach().cpu()
        if node_E.shape != (self.num_experts,):
            raise ValueError(f"expert_node_E has shape {tuple(node_E.shape)}, the router "
                             f"has {self.num_experts} experts")
        if self.cfg.max_nodes_per_token is not None and self.node_limit_needs_top_k:
            check_node_limit(node_E, self.cfg.max_nodes_per_token, self.top_k)
        self._node_index_E, self._num_nodes = compact_nodes(node_E)

    # ---- per step -----------------------------------------------------------
    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None
                ) -> RoutingResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def step_end(self, counts_E: torch.Tensor, step: int | None = None,
                 loss: torch.Tensor | None = None, ok: torch.Tensor | None = None) -> list[dict]:
        """After each optimizer step (adaptive routers only): that step's global tokens per
        expert, the step number, this rank's training loss (a device scalar) and ``ok``
        (a device bool, the same on every rank; false: the non-finite guard skipped the
        step, so the router's state must not move; None: not guarded). Returns the
        events this caused (dicts, e.g. a capacity change), identical on every rank."""
        return []

    def probe_controller(self, step: int):
        """The capacity controller whose C the loss probe sets at ``step``
        (``moe/capacity_probe.py``), or None."""
        return None

    def gauges(self) -> dict[str, float]:
        return {}

    def checkpoint_state(self) -> dict:
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        pass

    # ---- class-level answers -------------------------------------------------
    @classmethod
    def validate(cls, cfg: MoEConfig) -> None:
        """UserError if ``cfg`` asks this router for something it cannot do."""
        if cfg.locality_node_bias is True and not cls.supports_node_bias:
            raise UserError(
                f"moe.locality_node_bias=true is not supported by moe.router={cfg.router} "
                f"(topk and locmoe_plus have it): set it to auto or false.")
        if cfg.pad_to_capacity and not cls.applies_capacity(cfg):
            raise UserError(
                "moe.pad_to_capacity=true needs a capacity to pad to: moe.router=topk with a "
                "moe.capacity_factor, or moe.router=locmoe_plus with moe.locmoe_plus.mode "
                f"tcr_ecr or ecr (moe.router={cfg.router} here has: {cls.describe_capacity(cfg)}).")

    @classmethod
    def applies_capacity(cls, cfg: MoEConfig) -> bool:
        """Whether training routes with a per-expert capacity (tokens can be dropped)."""
        return False

    @classmethod
    def describe_capacity(cls, cfg: MoEConfig) -> str:
        return "dropless"

    @classmethod
    def hf_export(cls, cfg: MoEConfig) -> HFExport:
        return HFExport(None, reason=f"moe.router={cfg.router} has no transformers counterpart")

    @classmethod
    def adak_support(cls, cfg: MoEConfig) -> Optional[str]:
        """None if Ada-K can build on this router, else why not."""
        return (f"locmoe-train adak builds on a top-k softmax router, got moe.router="
                f"{cfg.router!r}: pre-train with moe.router=topk to use Ada-K.")

    # ---- node-limited routing --------------------------------------------------
    def node_mask(self, scores_TE: torch.Tensor) -> torch.Tensor | None:
        """Allowed (token, expert) pairs under ``moe.max_nodes_per_token``, by ``scores_TE``.

        ``None`` when no limit applies (no limit set, no placement, or the limit
        covers every node), so unlimited routing runs exactly the usual code.
        """
        max_nodes = self.cfg.max_nodes_per_token
        if max_nodes is None or self._node_index_E is None or max_nodes >= self._num_nodes:
            return None
        if self._node_index_E.device != scores_TE.device:
            self._node_index_E = self._node_index_E.to(scores_TE.device)
        return node_limited_mask_dense(scores_TE, self._node_index_E, self._num_nodes, max_nodes)


class LinearGateRouter(Router):
    """A router with the learned linear gate ``logits_TE = x_TD W^T`` (fp32).

    It provides the inputs of every aux term (probabilities, the token choice,
    logits), so a term added to ``moe/aux.py`` applies to it without an edit
    here; a subclass that cannot (expert choice) lists the terms it does.
    """

    aux_terms = AUX_NAMES

    def __init__(self, cfg: MoEConfig, hidden_size: int, setup: RouterSetup = RouterSetup()):
        super().__init__(cfg, hidden_size, setup)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)  # replaced by model/init.py
        setattr(self.weight, "sequence_parallel", setup.sequence_parallel)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight.float())


def node_bias_active(cfg: MoEConfig, num_nodes: int) -> bool:
    """Whether ``moe.locality_node_bias`` is on for a layer whose experts span ``num_nodes``."""
    if num_nodes < 2 or cfg.locality_node_bias is False:
        return False
    return cfg.locality_node_bias is True or cfg.locality_loss_coeff > 0


def topk_map(scores_TE: torch.Tensor, k: int,
             allowed_TE: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per token; with ``allowed_TE`` only among the allowed experts.

    The router checked at build time that at least k experts are allowed per
    token (``check_node_limit``), so a disallowed (-inf) expert is never chosen.
    """
    if allowed_TE is not None:
        scores_TE = scores_TE.detach().masked_fill(~allowed_TE, float("-inf"))
    top_TK = torch.topk(scores_TE, k, dim=-1).indices
    map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, top_TK, True)
    return map_TE, top_TK
