"""Our MoE layer (``moe.impl: native``): router -> dispatcher -> experts -> combine.

Legend: s sequence (this rank's shard under sequence parallelism), b batch,
D hidden, T = s*b tokens, E experts.

Plugs into megatron-core's ``TransformerLayer`` through the layer spec:
``forward(hidden_sbD)`` returns ``(output_sbD, None)``. The router and the
dispatcher are looked up in their registries by ``moe.router`` and
``moe.dispatcher``; the parallel layout comes in as a ``MoEParallel``
(``parallel/state.py``), so the layer reads no global parallel state.

Per training forward it keeps its weighted aux loss (with grad) for the train
step (``pop_aux_loss``, summed over layers by the runtime) and accumulates on
device, without host syncs, the counters of ``moe/runtime.py``. A forward
that activation recompute runs again (``model/recompute.py``) builds the same
graph but keeps and counts nothing: the first forward did.

Routers that hash token ids get them from ``token_ids_scope``: the train step
runs the model inside it, and the ids are gone when the scope ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch
from torch import nn

from locmoe_train.model.recompute import recomputing
from locmoe_train.moe.aux import AuxContext, active_terms, compute
from locmoe_train.moe.config import MoEConfig
from locmoe_train.moe.dispatcher import dispatcher_class
from locmoe_train.moe.experts import SwiGLUExperts
from locmoe_train.moe.routers import RouterSetup, router_class
from locmoe_train.moe.runtime import LayerStats

# Token ids of the current micro-batch ([b, s]) inside a token_ids_scope.
_TOKEN_IDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "locmoe_token_ids", default=None)


@contextlib.contextmanager
def token_ids_scope(ids_bs: torch.Tensor | None):
    """Make ``ids_bs`` ([b, s]) the token ids MoE layers see until the block ends."""
    token = _TOKEN_IDS.set(ids_bs)
    try:
        yield
    finally:
        _TOKEN_IDS.reset(token)


class MoELayer(nn.Module):
    def __init__(self, config, moe_cfg: MoEConfig, ffn_hidden_size: int, parallel=None,
                 setup: RouterSetup | None = None, submodules=None,
                 layer_number: int | None = None, **kwargs):
        from locmoe_train.parallel.state import MoEParallel

        super().__init__()
        mp = parallel if parallel is not None else MoEParallel.single()
        self.config, self.moe_cfg, self.parallel = config, moe_cfg, mp
        self.layer_number = layer_number
        E = moe_cfg.num_experts
        expert_node = mp.expert_node(E)
        base = setup or RouterSetup()
        me = mp.node_of_rank[mp.rank]
        local_E = torch.tensor([n == me for n in expert_node])
        self.router = router_class(moe_cfg.router)(moe_cfg, config.hidden_size, RouterSetup(
            sequence_parallel=mp.sequence_parallel, sp_group=mp.sp_group, sp_size=mp.sp_size,
            expert_node_E=torch.tensor(expert_node, dtype=torch.int64),
            vocab_size=base.vocab_size, seed=base.seed, seq_len=base.seq_len,
            max_steps=base.max_steps, local_experts_E=local_E))
        self.experts = SwiGLUExperts(E // mp.ep_size, config.hidden_size, ffn_hidden_size,
                                     moe_cfg.experts)
        self.dispatcher = dispatcher_class(moe_cfg.dispatcher).build(E, mp,
                                                                     moe_cfg.pad_to_capacity)
        self.register_buffer("local_experts", local_E, persistent=False)
        self.aux_context = AuxContext(top_k=moe_cfg.top_k, sp_group=mp.sp_group,
                                      sp_size=mp.sp_size, multi_node=len(set(expert_node)) > 1,
                                      locality_eps=moe_cfg.locality_eps)
        # All terms this layer adds to the loss; the router computes its own scope.
        self.aux_terms = active_terms(moe_cfg, self.router.aux_terms, self.aux_context)
        self.layer_aux_terms = tuple(t for t in self.aux_terms if t.scope == "layer")
        self.stats = LayerStats(E, tuple(t.name for t in self.aux_terms))
        self._aux_loss: torch.Tensor | None = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _token_ids(self, s: int) -> torch.Tensor | None:
        if not self.router.needs_token_ids:  # (and no ContextVar read: torch.compile can't)
            return None
        ids_bs = _TOKEN_IDS.get()
        if ids_bs is None:
            return None
        ids_sb = ids_bs.t()
        if self.parallel.sequence_parallel:  # this rank holds sequence rows [r*s, (r+1)*s)
            r = self.parallel.sp_rank
            ids_sb = ids_sb[r * s:(r + 1) * s]
        return ids_sb.reshape(-1).to(torch.int64)

    def forward(self, hidden_sbD: torch.Tensor, *args, **kwargs):
        s, b, D = hidden_sbD.shape
        x_TD = hidden_sbD.reshape(s * b, D)
        routing = self.router(x_TD, self._token_ids(s))
        x_ND, tokens_per_local_expert, meta = self.dispatcher.dispatch(x_TD, routing)
        y_ND = self.experts(x_ND, tokens_per_local_expert)
        y_TD = self.dispatcher.combine(y_ND, meta)
        if self.training:
            self._record(routing)
        return y_TD.view(s, b, D), None

    def _record(self, routing) -> None:
        ctx = dataclasses.replace(self.aux_context, local_experts_E=self.local_experts)
        values = {**routing.aux, **compute(self.layer_aux_terms, routing, ctx)}
        aux = None
        for term in self.aux_terms:  # schema order
            weighted = term.weight(self.moe_cfg) * values[term.name]
            aux = weighted if aux is None else aux + weighted
        if recomputing():  # activation recompute: the first forward counted these tokens
            return
        self._aux_loss = aux
        self.stats.record(routing, values, self.local_experts)

    def pop_aux_loss(self) -> torch.Tensor | None:
        aux, self._aux_loss = self._aux_loss, None
        return aux
