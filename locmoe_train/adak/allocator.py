"""Ada-K allocator: a per-token number of experts on top of a pre-trained top-K router.

Legend: T tokens on this rank, D hidden size, E experts (also the number of
choices k in {1..E}: column j of the allocator's output is k = j + 1).

``AdaKRouter`` is a ``Router`` (``moe/routers/base.py``) that wraps one MoE
layer's pre-trained ``TopKRouter`` (kept as ``.base``, frozen by the stage)
and adds the allocator ``W_alloc`` ([E, D], no bias, on the router input).
It is not a ``moe.router`` choice: ``install_allocators`` puts it into every
``MoELayer`` of a loaded model. Per token it picks ``k``, then activates the
token's ``k`` most probable experts under the base router's softmax. The gates
are what the base router would give those experts: the softmax probability,
renormalised over the chosen experts only when ``moe.renormalize`` is set.
So ``k = K`` reproduces the base top-K layer exactly: same experts, same gate
arithmetic. (The base router picks with ``torch.topk``, we rank with a stable
sort; they could order two exactly equal probabilities differently, which
continuous router logits do not produce.) Its routing carries the inputs of
the linear gate's aux terms (probabilities, selection, logits), so the layer
it is installed in computes the same terms in training mode; the stage runs
the frozen model in eval mode, where the layer computes none.

How ``k`` is chosen is a string, ``router.mode``:
* ``topk``: hand the token to the base router unchanged (the R* baseline);
* ``sample``: ``k ~ pi(k|s) = softmax(W_alloc s)``, by inverse CDF on uniforms
  from the router's own ``generator`` (PPO rollouts; a per-layer, per-rank
  generator makes the draws reproducible and checkpointable);
* ``argmax``: the most probable ``k`` (evaluation);
* ``forced``: ``router.forced_k`` (an int or a ``[T]`` tensor; tests).

Every forward stores a ``Decision`` on ``router.last``: the router input
(the state ``s_l`` of each token), the chosen ``k`` and its log-probability
under the allocator at that time, and the base router's probabilities. The
PPO stage reads them after the forward; the dispatcher needs nothing new,
since dropless dispatch already takes any number of experts per token.

Not owned here: the PPO/warm-start losses (``adak/ppo.py``), the steps that
train the allocators (``adak/step.py``) and the stage (``adak/stage.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from locmoe_train.moe.routers import LinearGateRouter, Router
from locmoe_train.moe.routing import RoutingResult

MODES = ("topk", "sample", "argmax", "forced")


@dataclass
class Decision:
    x_TD: torch.Tensor  # router input (detached): the state s_l of each token
    k_T: torch.Tensor  # int64 experts chosen per token
    logp_T: Optional[torch.Tensor]  # log pi(k|s) of the chosen k (None in topk mode)
    probs_TE: torch.Tensor  # base router probabilities (detached)


class AdaKRouter(Router):
    # The linear gate's terms: the routing below carries their inputs.
    aux_terms = LinearGateRouter.aux_terms

    def __init__(self, base: Router, hidden_size: int | None = None):
        if not isinstance(base, LinearGateRouter):
            raise TypeError(f"Ada-K needs a router with a linear gate (logits()); got "
                            f"{type(base).__name__}")
        hidden_size = hidden_size or base.weight.shape[1]
        super().__init__(base.cfg, hidden_size, base.setup)
        self.base = base
        # Zero init: pi(k|s) starts uniform over 1..E (the warm start moves it to ~K).
        self.alloc_weight = nn.Parameter(torch.zeros(self.num_experts, hidden_size))
        # Router inputs differ across sequence-parallel ranks: the grad is summed over TP.
        setattr(self.alloc_weight, "sequence_parallel", base.setup.sequence_parallel)
        self.mode = "topk"
        self.forced_k: int | torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.last: Decision | None = None

    def log_policy(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``log pi(k|s)`` over k = 1..E, ``[T, E]``, in fp32 (autocast off, so a PPO epoch
        recomputes exactly what the rollout recorded)."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.alloc_weight.float())
        return torch.log_softmax(logits_TE, dim=-1)

    def _choose_k(self, logp_TE: torch.Tensor) -> torch.Tensor:
        T, E = logp_TE.shape
        if self.mode == "argmax":
            return logp_TE.argmax(-1) + 1
        if self.mode == "sample":
            u_T = torch.rand(T, generator=self.generator, device=logp_TE.device)
            cdf_TE = torch.cumsum(logp_TE.exp(), dim=-1)
            return (cdf_TE < u_T[:, None]).sum(-1).clamp_max(E - 1) + 1
        if self.mode == "forced":
            k = self.forced_k
            if k is None:
                raise RuntimeError("mode 'forced' needs router.forced_k (an int or a [T] tensor)")
            k_T = torch.as_tensor(k, device=logp_TE.device).to(torch.int64).expand(T)
            if int(k_T.min()) < 1 or int(k_T.max()) > E:
                raise ValueError(f"forced k must lie in [1, {E}]")
            return k_T
        raise ValueError(f"unknown Ada-K mode {self.mode!r}; one of {MODES}")

    def forward(self, x_TD: torch.Tensor, token_ids_T=None) -> RoutingResult:
        if self.mode == "topk":
            routing = self.base(x_TD, token_ids_T)
            k_T = torch.full((x_TD.shape[0],), self.top_k, dtype=torch.int64, device=x_TD.device)
            self.last = Decision(x_TD.detach(), k_T, None, routing.probs_TE.detach())
            return routing
        logits_TE = self.base.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        with torch.no_grad():
            logp_TE = self.log_policy(x_TD)
            k_T = self._choose_k(logp_TE)
            logp_T = logp_TE.gather(1, (k_T - 1)[:, None]).squeeze(1)
            selected_TE = topk_per_token(probs_TE, k_T)
        gates_TE = probs_TE * selected_TE
        if self.cfg.renormalize:
            gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True)
        self.last = Decision(x_TD.detach(), k_T, logp_T, probs_TE.detach())
        # requested_slots stays a device tensor (sum of k): no host sync here.
        return RoutingResult(selected_TE, gates_TE, logits_TE, requested_slots=k_T.sum(),
                             probs_TE=probs_TE, selected_TE=selected_TE)


def topk_per_token(scores_TE: torch.Tensor, k_T: torch.Tensor) -> torch.Tensor:
    """Bool ``[T, E]``: each token's ``k_T[t]`` highest-scoring experts (stable for ties)."""
    T, E = scores_TE.shape
    order_TE = torch.sort(scores_TE.detach(), dim=-1, descending=True, stable=True).indices
    rank_TE = torch.empty_like(order_TE).scatter_(
        1, order_TE, torch.arange(E, device=scores_TE.device).expand(T, E))
    return rank_TE < k_T[:, None]


def install_allocators(model: nn.Module) -> list[AdaKRouter]:
    """Wrap the router of every ``MoELayer`` in ``model``; returns them in layer order."""
    from locmoe_train.moe.layer import MoELayer

    routers = []
    for module in model.modules():
        if isinstance(module, MoELayer):
            if not isinstance(module.router, AdaKRouter):
                base = module.router
                module.router = AdaKRouter(base).to(base.weight.device)
            routers.append(module.router)
    return routers


def set_mode(routers: list[AdaKRouter], mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown Ada-K mode {mode!r}; one of {MODES}")
    for r in routers:
        r.mode = mode
