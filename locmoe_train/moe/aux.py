"""The auxiliary losses of the MoE layer: the one declaration of their names and weights.

Legend: T tokens on this rank, E experts.

Each ``AuxTerm`` names a term, the ``moe`` config key holding its weight and
how to compute it (unweighted) from a ``RoutingResult``. A term is computed
when its router provides its inputs (``Router.aux_terms``), its weight is
non-zero and it applies (``AuxTerm.applies``). Router-scope terms are
computed by the router right after routing (into ``RoutingResult.aux``);
layer-scope terms need the layer's placement (the locality loss: which
experts are on this node) and are computed by the layer. The layer adds the
weighted sum of both to the loss; the runtime (``moe/runtime.py``) reduces
and logs the unweighted values under the same names. A new term is one entry
here (plus its weight key in ``moe/config.py``).

The math lives in ``moe/losses.py`` (pure functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from locmoe_train.moe.losses import locality_loss, router_z_loss, switch_load_balancing_loss
from locmoe_train.moe.routing import RoutingResult


@dataclass(frozen=True)
class AuxContext:
    """What a term needs beyond the routing: the layer's setting."""
    top_k: int
    sp_group: object = None
    sp_size: int = 1
    # Bool [E]: experts on this rank's node (locality); None = one node.
    local_experts_E: torch.Tensor | None = None
    multi_node: bool = False  # the layer's experts live on more than one node
    locality_eps: float = 0.1


@dataclass(frozen=True)
class AuxTerm:
    name: str
    coeff_key: str  # the MoEConfig field with its weight
    compute: Callable[[RoutingResult, AuxContext], torch.Tensor]
    applies: Callable[[AuxContext], bool] = lambda ctx: True
    scope: str = "router"  # or "layer": computed by the MoE layer, after the router

    def weight(self, moe_cfg) -> float:
        return getattr(moe_cfg, self.coeff_key)


AUX_TERMS: tuple[AuxTerm, ...] = (
    AuxTerm("load_balancing_loss", "aux_loss_coeff",
            lambda r, c: switch_load_balancing_loss(r.probs_TE, r.selected_TE, c.top_k,
                                                    c.sp_group, c.sp_size)),
    AuxTerm("z_loss", "z_loss_coeff",
            lambda r, c: router_z_loss(r.gate_logits_TE, c.sp_group, c.sp_size)),
    # Only meaningful when the experts span nodes (real, or parallel.ranks_per_node).
    AuxTerm("locality_loss", "locality_loss_coeff",
            lambda r, c: locality_loss(r.probs_TE, c.local_experts_E, c.locality_eps),
            applies=lambda c: c.multi_node, scope="layer"),
)


AUX_NAMES: tuple[str, ...] = tuple(t.name for t in AUX_TERMS)


def active_terms(moe_cfg, provided: tuple[str, ...], ctx: AuxContext,
                 scope: str | None = None) -> tuple[AuxTerm, ...]:
    """The terms computed: provided by the router, weighted, applicable (in ``scope``)."""
    return tuple(t for t in AUX_TERMS
                 if t.name in provided and t.weight(moe_cfg) > 0 and t.applies(ctx)
                 and scope in (None, t.scope))


def compute(terms: tuple[AuxTerm, ...], routing: RoutingResult,
            ctx: AuxContext) -> dict[str, torch.Tensor]:
    return {t.name: t.compute(routing, ctx) for t in terms}
