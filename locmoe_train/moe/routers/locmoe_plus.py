"""LocMoE+ affinity router (``moe.router: locmoe_plus``, settings in
``moe.locmoe_plus``), METHOD.md sections 1-2.

Legend: T tokens on this rank, D hidden, E experts, K (= l) experts per token,
B = D / E channels per expert block, C capacity per sequence.

* Affinity (GrAP gating): expert i owns the contiguous channel block B_i and its
  fixed gate vector is ``E/D`` on B_i, so the cosine affinity is
  ``delta[t,i] = sum(x_t[B_i]) / (sqrt(B) |x_t|)``. No learned router weights:
  routing is learned by the hidden states (the balance and locality losses and
  the gate values send gradient into earlier layers), so the gate value is
  never detached.
* Token choice (TCR): each token takes its top-K experts by affinity.
* Expert choice (ECR): each expert keeps at most its C best candidates by
  affinity (per rank: ``C_local = ceil(C * T / seq_len)``), or with
  ``moe.locmoe_plus.ranking: global`` the C best over the TP/sequence-parallel group.
* Gate value: ``softmax(delta / tau)`` at the kept experts, not renormalised.
  ``tau: auto`` is ``1 / sqrt(D)``: on isotropic features delta has standard
  deviation ``1 / sqrt(D)``, so the logits start at unit variance (tau = 1
  makes the gate about 1/E whatever the routing; docs/locmoe_plus.md, "The
  gate"). ``learn_tau`` learns ``log tau``, so tau stays positive.
* Locality node bias (``moe.locality_node_bias``): the rank's node row is
  added to the logits, and token choice ranks by the logits (the same order as
  delta without the bias). Expert choice still ranks a candidate by delta: one
  rank's candidates all carry the same bias for an expert.
* Locality-aware capacity (with the node bias, ``ranking: local``): expert
  choice caps each expert per source rank. When routing prefers the rank's
  own node, its local experts get more than ``1/E`` of its tokens and a
  uniform per-rank cap would drop them while the remote experts' slots for
  this rank go unused. So the rank's cap of an expert is scaled by the
  measured demand: ``ceil(C_local * w_e)``, with ``w_e = sigma / (L/E)`` on
  the L experts of the rank's node and ``(1 - sigma) / (1 - L/E)`` elsewhere.
  ``sigma`` is the same-node share of the token choices, all-reduced over
  every rank every ``LOCALITY_INTERVAL`` steps (C shapes are static between
  updates); a step the non-finite guard skipped is not counted, and does not
  update it. With every node holding ``E/N`` experts, an expert's caps summed
  over all source ranks stay ``C_local * world``, as with uniform caps.
* C comes from the ``CapacityController`` (moe/capacity.py), re-estimated
  every ``moe.capacity.interval`` steps in ``step_end``.
* Evaluation runs token choice only (ECR is non-causal) unless
  ``moe.locmoe_plus.eval_token_choice`` is false.
* Node limit (``moe.max_nodes_per_token = M``): nodes are ranked per token by
  their best affinity; TCR takes the top-K among the experts on the token's
  top-M nodes, and in ``ecr`` mode expert e's candidates are only the tokens
  that allow e. ECR after TCR is unchanged (its candidates are already allowed).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from locmoe_train.errors import UserError
from locmoe_train.model.recompute import recomputing
from locmoe_train.moe.aux import AUX_NAMES
from locmoe_train.moe.capacity import CapacityController
from locmoe_train.moe.routers import register_router
from locmoe_train.moe.routers.base import HFExport, Router, RouterSetup, topk_map
from locmoe_train.moe.routing import (RoutingResult, drop_over_capacity,
                                     drop_over_capacity_per_expert)

# Steps between updates of the same-node share that scales the per-rank capacities.
LOCALITY_INTERVAL = 10


def grap_affinity(x_TD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cosine of each token with each expert's fixed block gate vector, in fp32."""
    T, D = x_TD.shape
    block = D // num_experts
    x = x_TD.float()
    sums_TE = x.view(T, num_experts, block).sum(-1)
    norm_T1 = x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return sums_TE / (math.sqrt(block) * norm_T1)


def resolved_tau(tau, hidden_size: int) -> float:
    """``moe.locmoe_plus.tau`` as a number: auto is ``1 / sqrt(hidden_size)``."""
    return 1.0 / math.sqrt(hidden_size) if tau == "auto" else float(tau)


@register_router("locmoe_plus")
class LocMoEPlusRouter(Router):
    adapts_to_load = True
    aux_terms = AUX_NAMES  # it provides every term's inputs
    supports_node_bias = True

    def __init__(self, cfg, hidden_size, setup: RouterSetup = RouterSetup()):
        if hidden_size % cfg.num_experts:
            raise UserError(
                f"moe.router=locmoe_plus splits the hidden vector into one block per expert, so "
                f"model.hidden_size={hidden_size} must be divisible by moe.num_experts="
                f"{cfg.num_experts}.")
        super().__init__(cfg, hidden_size, setup)
        self.lcfg = cfg.locmoe_plus
        tau = torch.tensor(resolved_tau(self.lcfg.tau, hidden_size))
        if self.lcfg.learn_tau:
            self.log_tau = nn.Parameter(tau.log())
            setattr(self.log_tau, "sequence_parallel", setup.sequence_parallel)
            setattr(self.log_tau, "keep_init", True)  # starts at log(tau): model/init.py leaves it
        else:
            self.register_buffer("tau", tau)
        self.controller = CapacityController(cfg.capacity, setup.seq_len, cfg.top_k,
                                             cfg.num_experts, hidden_size, setup.max_steps)
        # Locality-aware capacity: this rank's node's experts and the measured share.
        local_E = None
        if self.node_bias is not None and setup.local_experts_E is not None:
            local_E = setup.local_experts_E.bool()
            if not 0 < int(local_E.sum()) < self.num_experts:
                local_E = None
        self.register_buffer("_local_E", local_E, persistent=False)
        # The same mask on the host, so the caps need no device read in forward.
        self._local_list = None if local_E is None else tuple(local_E.tolist())
        self.locality_share = (None if local_E is None
                               else sum(self._local_list) / self.num_experts)
        self._demand = None  # [local, all] token choices since the last update
        # The current step's, counted into _demand at step_end unless the step is skipped.
        self._step_demand = None
        self._caps = (None, None)  # (capacity, T, share, device) -> per-expert caps, cached

    def temperature(self) -> torch.Tensor:
        """The gate temperature (0-dim): the ``tau`` buffer, or ``exp(log_tau)`` if learned."""
        return self.log_tau.exp() if self.lcfg.learn_tau else self.tau

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from before log tau held a learned tau as the parameter ``tau``.
        if self.lcfg.learn_tau and prefix + "tau" in state_dict:
            state_dict[prefix + "log_tau"] = state_dict.pop(prefix + "tau").log()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _capacity_applies(self) -> bool:
        if self.lcfg.mode == "tcr":
            return False
        return self.training or not self.lcfg.eval_token_choice

    def forward(self, x_TD, token_ids_T=None) -> RoutingResult:
        T = x_TD.shape[0]
        delta_TE = grap_affinity(x_TD, self.num_experts)
        logits_TE = self.add_node_bias(delta_TE / self.temperature())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        allowed_TE = self.node_mask(delta_TE)
        rank_TE = delta_TE if self.node_bias is None else logits_TE
        selected_TE, top_TK = topk_map(rank_TE.detach(), self.top_k, allowed_TE)
        kept_TE, capacity, requested = selected_TE, None, T * self.top_k
        if self._capacity_applies():
            capacity = self.controller.local_capacity(T)
            capacity_E = self._capacity_per_expert(capacity, T)
            if self.lcfg.mode == "ecr":
                candidates_TE = (torch.ones_like(selected_TE) if allowed_TE is None
                                 else allowed_TE)
                # An expert cannot take > T. Under a node limit it may also have fewer than
                # C allowed tokens; those slots count as unfilled (no host sync to count them).
                requested = min(capacity, T) * self.num_experts
            else:
                candidates_TE = selected_TE
            if capacity_E is not None:
                kept_TE = drop_over_capacity_per_expert(candidates_TE, delta_TE, capacity_E)
                capacity = min(T, int(capacity_E.max()))  # what a padded layout must hold
            else:
                kept_TE = self._expert_choice(candidates_TE, delta_TE, capacity)
            if self.cfg.pad_to_capacity:
                # The padded dispatcher gives every expert exactly `capacity` rows on
                # this rank. Ranked over the SP group, an expert may take up to the
                # group's C from one rank's tokens: pad to that bound. The cut below
                # only binds on exactly tied affinities at the group's threshold.
                if self.lcfg.ranking == "global" and self.sp_size > 1:
                    capacity = min(T, self.controller.local_capacity(T * self.sp_size))
                kept_TE = drop_over_capacity(kept_TE, delta_TE, capacity, "probs")
        if self.training and not recomputing():  # the first forward observed these tokens
            self.controller.observe(delta_TE.detach(), top_TK)
            if self._local_E is not None:
                demand = torch.stack([(selected_TE & self._local_E).sum(),
                                      selected_TE.sum()]).double()
                self._step_demand = (demand if self._step_demand is None
                                     else self._step_demand + demand)
        return RoutingResult(kept_TE, probs_TE * kept_TE, delta_TE, requested_slots=requested,
                             capacity=capacity, probs_TE=probs_TE, selected_TE=selected_TE,
                             logits_TE=logits_TE)

    def _capacity_per_expert(self, capacity: int, T: int) -> torch.Tensor | None:
        """Per-expert caps for this rank under locality-aware capacity, else None."""
        if self._local_list is None or (self.lcfg.ranking == "global" and self.sp_size > 1):
            return None
        key = (capacity, T, self.locality_share, self._local_E.device)
        if self._caps[0] != key:  # new C, batch shape or share: computed on the host
            frac = sum(self._local_list) / self.num_experts
            w_local = self.locality_share / frac
            w_remote = (1.0 - self.locality_share) / (1.0 - frac)
            caps = [max(1, min(T, math.ceil(round(capacity * (w_local if local else w_remote),
                                                  9))))
                    for local in self._local_list]
            self._caps = (key, torch.tensor(caps, dtype=torch.int64,
                                            device=self._local_E.device))
        return self._caps[1]

    def _update_locality_share(self, step: int, ok: torch.Tensor | None) -> None:
        """Count the step's token choices, and every ``LOCALITY_INTERVAL`` steps set the
        share from those since the last update. A skipped step (``ok`` false) is left out
        (on device: no sync), and on an update step the share stays and the update waits
        for the next one (``ok`` is the same on every rank, so all of them wait)."""
        if self._local_E is None:
            return
        demand, self._step_demand = self._step_demand, None
        if demand is not None:
            if ok is not None:
                demand = torch.where(ok, demand, 0.0)
            self._demand = demand if self._demand is None else self._demand + demand
        if step % LOCALITY_INTERVAL or (ok is not None and not bool(ok)):
            return
        demand = (self._demand if self._demand is not None
                  else torch.zeros(2, dtype=torch.float64, device=self._local_E.device))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(demand)
        if float(demand[1]) > 0:
            self.locality_share = float(demand[0] / demand[1])
        self._demand = None

    def _expert_choice(self, candidates_TE, delta_TE, capacity: int) -> torch.Tensor:
        """Keep each expert's best ``capacity`` candidates by affinity (this rank, or the SP group)."""
        if self.lcfg.ranking == "local" or self.sp_size == 1:
            return drop_over_capacity(candidates_TE, delta_TE, capacity, "probs")
        # Global: each expert's C-th best candidate score over the group is the bar.
        group_capacity = self.controller.local_capacity(delta_TE.shape[0] * self.sp_size)
        masked = delta_TE.detach().masked_fill(~candidates_TE, float("-inf"))
        k = min(group_capacity, masked.shape[0])
        local_best = torch.topk(masked, k, dim=0).values
        gathered = torch.empty(self.sp_size * k, masked.shape[1], device=masked.device)
        dist.all_gather_into_tensor(gathered, local_best.contiguous(), group=self.sp_group)
        if gathered.shape[0] <= group_capacity:
            return candidates_TE
        threshold_E = torch.topk(gathered, group_capacity, dim=0).values[-1]
        return candidates_TE & (masked >= threshold_E)

    def step_end(self, counts_E, step=None, loss=None, ok=None) -> list[dict]:
        if step is None:
            return []
        if loss is not None:
            # A skipped step's loss is NaN to the rollback guard: left out of its windows.
            self.controller.record_loss(step, loss if ok is None else
                                        torch.where(ok, loss, float("nan")))
        self._update_locality_share(step, ok)
        event = self.controller.step_end(step, ok=ok)
        # Token choice alone applies no capacity: the controller still measures
        # (q, target, C_min are diagnostics) but its C is not in effect.
        if event is None or self.lcfg.mode == "tcr":
            return []
        return [event]

    def probe_controller(self, step: int):
        # Token choice alone applies no capacity: nothing to probe.
        if self.lcfg.mode == "tcr" or not self.controller.probe_due(step):
            return None
        return self.controller

    def gauges(self) -> dict[str, float]:
        gauges = self.controller.gauges()
        if self.lcfg.mode == "tcr":
            del gauges["capacity"]
        if self.locality_share is not None:
            gauges["locality_share"] = self.locality_share
        return gauges

    def checkpoint_state(self) -> dict:
        state = {"controller": self.controller.state_dict()}
        if self.locality_share is not None:
            # The share is identical on every rank; the demand since the last update is
            # this rank's own.
            state["locality_share"] = self.locality_share
            state["locality_demand"] = (None if self._demand is None
                                        else [float(v) for v in self._demand.tolist()])
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])
        if self.locality_share is not None and "locality_share" in state:
            self.locality_share = float(state["locality_share"])
            demand = state.get("locality_demand")
            self._demand = (None if demand is None else
                            torch.tensor(demand, dtype=torch.float64, device=self._local_E.device))

    # ---- class-level answers -------------------------------------------------------
    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.capacity_factor is not None:
            raise UserError(
                f"moe.capacity_factor={cfg.capacity_factor} does not apply to "
                f"moe.router=locmoe_plus, whose capacity starts at moe.capacity.factor0 and is "
                f"managed by moe.capacity.policy: remove moe.capacity_factor.")
        tau = cfg.locmoe_plus.tau
        if tau != "auto" and tau <= 0:
            raise UserError(f"moe.locmoe_plus.tau={tau} must be > 0, or auto "
                            f"(1 / sqrt(model.hidden_size)).")

    @classmethod
    def applies_capacity(cls, cfg) -> bool:
        return cfg.locmoe_plus.mode != "tcr"

    @classmethod
    def describe_capacity(cls, cfg) -> str:
        if cfg.locmoe_plus.mode == "tcr":
            return "none (token choice only)"
        c = cfg.capacity
        if c.policy == "controller":
            return (f"{c.policy} from factor {c.factor0} ({c.statistic}, every {c.interval} "
                    f"steps after {c.warmup})")
        return f"{c.policy} from factor {c.factor0}"

    @classmethod
    def hf_export(cls, cfg) -> HFExport:
        notes, warnings = (), ()
        mode = cfg.locmoe_plus.mode
        if mode != "tcr" and cfg.locmoe_plus.eval_token_choice:
            notes = (f"LocMoE+ expert capacity (moe.locmoe_plus.mode={mode}) applies in "
                     f"training only; the exported model routes by token choice, as this run's "
                     f"evaluation does.",)
        elif mode != "tcr":
            warnings = ("moe.locmoe_plus.eval_token_choice=false: this run evaluated with "
                        "LocMoE+ expert capacity, which depends on the whole sequence; the "
                        "exported model routes by token choice without capacity, so its outputs "
                        "differ where tokens were dropped.",)
        return HFExport("custom", "locmoe_plus", notes=notes, warnings=warnings,
                        mixtral_mismatch="moe.router=locmoe_plus (Mixtral routes with a learned "
                                         "softmax top-k gate: moe.router=topk)")
