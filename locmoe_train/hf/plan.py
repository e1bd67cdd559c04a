"""What an export will be: the architecture for a config, and what differs from the run.

``plan_export`` asks the router class (``Router.hf_export``) whether and how
its checkpoints export, adds what the model config decides (Mixtral needs an
MoE layer in every layer), and collects warnings and notes for the user.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from locmoe_train.errors import UserError

ARCHITECTURES = ("auto", "mixtral", "locmoe")


@dataclass
class Plan:
    architecture: str  # "mixtral" or "locmoe"
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- architecture
def mixtral_mismatches(cfg) -> list[str]:
    """The settings of ``cfg`` that Mixtral cannot express (empty: it fits)."""
    from locmoe_train.moe.routers import router_class

    out = []
    support = router_class(cfg.moe.router).hf_export(cfg.moe)
    if support.architecture != "mixtral":
        out.append(support.mixtral_mismatch or f"moe.router={cfg.moe.router}")
    if cfg.model.moe_every != 1:
        out.append(f"model.moe_every={cfg.model.moe_every} (every Mixtral layer is an MoE "
                   f"layer: model.moe_every=1)")
    return out


def plan_export(cfg, requested: str = "auto") -> Plan:
    """Pick the architecture for ``cfg`` (UserError if it cannot be exported) and collect
    what the user must know about the differences from the training run."""
    from locmoe_train.moe.routers import ROUTERS, router_class
    from locmoe_train.moe.routers.base import node_bias_active

    if requested not in ARCHITECTURES:
        raise UserError(f"--architecture {requested!r} is not one of {', '.join(ARCHITECTURES)}.")
    moe = cfg.moe
    support = router_class(moe.router).hf_export(moe)
    if support.architecture is None:
        kinds = {n: cls.hf_export(_with_renormalize(moe, n)).architecture
                 for n, cls in ROUTERS.items()}
        mixtral = [n for n, a in kinds.items() if a == "mixtral"]
        custom = [n for n, a in kinds.items() if a == "custom"]
        raise UserError(
            f"moe.router={moe.router} cannot be exported to transformers: {support.reason}. "
            f"Exportable routers: {', '.join(mixtral)} (as Mixtral, or as the custom locmoe "
            f"model), {' and '.join(custom)} (custom locmoe model).")
    mismatches = mixtral_mismatches(cfg)
    if requested == "mixtral" and mismatches:
        raise UserError(
            "--architecture mixtral cannot express this checkpoint: " + "; ".join(mismatches)
            + ". Use --architecture auto (or locmoe) to export the custom locmoe model, "
              "loaded with trust_remote_code=True.")
    arch = requested if requested != "auto" else ("locmoe" if mismatches else "mixtral")
    plan = Plan(arch, warnings=list(support.warnings), notes=list(support.notes))
    if moe.max_nodes_per_token is not None:
        plan.warnings.append(
            f"moe.max_nodes_per_token={moe.max_nodes_per_token}: node-limited routing depends "
            f"on the training cluster's expert placement; the exported model chooses among "
            f"all experts.")
    # Whether a multi-node run of this config trained the bias (the same rule as the router).
    if router_class(moe.router).supports_node_bias and node_bias_active(moe, num_nodes=2):
        plan.warnings.append(
            "moe.locality_node_bias: training added a learned per-node bias to the routing "
            "scores (if the experts spanned nodes); it depends on the rank's node, so the "
            "exported model routes without it.")
    return plan


def _with_renormalize(moe, router: str):
    """``moe`` as the best case of ``router`` for export (renormalised top-k is Mixtral)."""
    return dataclasses.replace(moe, router=router, renormalize=True, capacity_factor=None)
