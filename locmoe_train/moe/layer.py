"""Our MoE layer: router -> dispatcher -> experts -> combine, as a megatron-core MLP.

Legend: s sequence (this rank's shard under sequence parallelism), b batch,
D hidden, T = s*b tokens, E experts.

Plugs into megatron-core's ``TransformerLayer`` through the layer spec
(``moe.impl: locmoe``): ``forward(hidden_sbD)`` returns ``(output_sbD, None)``.
The layer owns no parallel logic of its own beyond handing the EP group to
the dispatcher and the sequence-parallel group to the router's losses.

Per forward it keeps its auxiliary loss (weighted, with grad) for the train
step to add to the LM loss (``pop_aux_loss``), and accumulates on device,
without host syncs, the statistics the trainer logs: tokens per expert,
tokens seen, requested and kept slots, tokens routed to no expert, and the
unweighted aux terms.
"""

from __future__ import annotations

import torch
from torch import nn

from locmoe_train.config import MoEConfig
from locmoe_train.moe.dispatcher import AllToAllDispatcher
from locmoe_train.moe.experts import SwiGLUExperts
from locmoe_train.moe.hierarchical import HierarchicalDispatcher
from locmoe_train.moe.locmoe_plus import LocMoEPlusRouter
from locmoe_train.moe.losses import locality_loss
from locmoe_train.moe.routers import ROUTERS as _BASE_ROUTERS

# moe.router -> router class (LocMoE+ lives in its own module, which builds on routers.py).
ROUTERS = {**_BASE_ROUTERS, "locmoe_plus": LocMoEPlusRouter}

# Token ids of the current micro-batch ([b, s]), for routers that hash them.
_TOKEN_IDS: dict[str, torch.Tensor | None] = {"ids": None}


def set_token_ids(ids_bs: torch.Tensor | None) -> None:
    _TOKEN_IDS["ids"] = ids_bs


class LocMoELayer(nn.Module):
    def __init__(self, config, moe_cfg: MoEConfig, ffn_hidden_size: int, vocab_size: int = 1,
                 seed: int = 0, seq_len: int = 1, max_steps: int = 1,
                 node_of_rank: list[int] | None = None, ep_topology=None, submodules=None,
                 layer_number: int | None = None, **kwargs):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        super().__init__()
        self.config, self.moe_cfg = config, moe_cfg
        self.layer_number = layer_number
        ep_size = ps.get_expert_model_parallel_world_size()
        self.sp = bool(config.sequence_parallel)
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        sp_group = ps.get_tensor_model_parallel_group() if self.sp else None
        router_cls = ROUTERS[moe_cfg.router]
        context = {"vocab_size": vocab_size, "seed": seed, "seq_len": seq_len,
                   "max_steps": max_steps}
        self.router = router_cls(moe_cfg, config.hidden_size, self.sp, sp_group,
                                 self.tp_size if self.sp else 1,
                                 **{k: context[k] for k in router_cls.init_kwargs})
        ep_group = ps.get_expert_model_parallel_group() if ep_size > 1 else None
        ep_rank = ps.get_expert_model_parallel_rank()
        self.experts = SwiGLUExperts(moe_cfg.num_experts // ep_size, config.hidden_size,
                                     ffn_hidden_size, moe_cfg.experts)
        E = moe_cfg.num_experts
        # Which experts live on this rank's node: expert e is on EP rank e // (E / ep).
        ep_ranks = (dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
                    if ep_size > 1 else [dist.get_rank() if dist.is_initialized() else 0])
        nodes = node_of_rank or [0] * (max(ep_ranks) + 1)
        expert_node = [nodes[ep_ranks[e // (E // ep_size)]] for e in range(E)]
        me = nodes[dist.get_rank() if dist.is_initialized() else 0]
        if moe_cfg.dispatcher == "hierarchical" and ep_topology is not None:
            self.dispatcher = HierarchicalDispatcher(E, ep_topology, ep_rank,
                                                     moe_cfg.pad_to_capacity, ep_group)
        else:
            self.dispatcher = AllToAllDispatcher(
                E, ep_group, ep_size, moe_cfg.pad_to_capacity,
                [nodes[r] for r in ep_ranks], ep_rank)
        self.register_buffer("local_experts", torch.tensor([n == me for n in expert_node]),
                             persistent=False)
        self.router.expert_node_E = torch.tensor(expert_node, dtype=torch.int64)
        if moe_cfg.max_nodes_per_token is not None:
            self.router._node_layout(torch.device("cpu"))  # UserError now, not at step 1
        # The locality loss only means something when the experts span nodes.
        self.locality_active = moe_cfg.locality_loss_coeff > 0 and len(set(expert_node)) > 1
        self._aux_loss: torch.Tensor | None = None
        for name, shape in [("tokens_per_expert", (E,)), ("step_tokens_per_expert", (E,)),
                            ("tokens_seen", ()), ("requested_slots", ()), ("unrouted", ()),
                            ("same_node", ()), ("load_balancing_loss", ()), ("z_loss", ()),
                            ("locality_loss", ())]:
            self.register_buffer(f"stat_{name}", torch.zeros(shape), persistent=False)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _token_ids(self, s: int, b: int) -> torch.Tensor | None:
        ids_bs = _TOKEN_IDS["ids"]
        if ids_bs is None or not self.router.needs_token_ids:
            return None
        ids_sb = ids_bs.t()
        if self.sp:  # this rank holds sequence rows [r*s, (r+1)*s)
            ids_sb = ids_sb[self.tp_rank * s:(self.tp_rank + 1) * s]
        return ids_sb.reshape(-1).to(torch.int64)

    def forward(self, hidden_sbD: torch.Tensor, *args, **kwargs):
        s, b, D = hidden_sbD.shape
        x_TD = hidden_sbD.reshape(s * b, D)
        routing = self.router(x_TD, self._token_ids(s, b))
        x_ND, tokens_per_local_expert, meta = self.dispatcher.dispatch(x_TD, routing)
        y_ND = self.experts(x_ND, tokens_per_local_expert)
        y_TD = self.dispatcher.combine(y_ND, meta)
        if self.training:
            self._record(routing)
        return y_TD.view(s, b, D), None

    def _record(self, routing) -> None:
        cfg = self.moe_cfg
        weights = {"load_balancing_loss": cfg.aux_loss_coeff, "z_loss": cfg.z_loss_coeff,
                   "locality_loss": cfg.locality_loss_coeff}
        terms = dict(routing.aux)
        if self.locality_active and routing.probs_TE is not None:
            terms["locality_loss"] = locality_loss(routing.probs_TE, self.local_experts,
                                                   cfg.locality_eps)
        aux = None
        for name, value in terms.items():
            term = weights[name] * value
            aux = term if aux is None else aux + term
            getattr(self, f"stat_{name}").add_(value.detach())
        self._aux_loss = aux
        with torch.no_grad():
            map_TE = routing.routing_map_TE
            counts = map_TE.sum(0).float()
            self.stat_tokens_per_expert += counts
            self.stat_step_tokens_per_expert += counts
            self.stat_tokens_seen += map_TE.shape[0]
            self.stat_requested_slots += routing.requested_slots
            self.stat_unrouted += (~map_TE.any(-1)).sum()
            self.stat_same_node += (map_TE & self.local_experts).sum()

    def pop_aux_loss(self) -> torch.Tensor | None:
        aux, self._aux_loss = self._aux_loss, None
        return aux
