"""Locality-aware (hierarchical) dispatch: cross each node boundary once per node pair.

Legend: D hidden, P ranks in the expert-parallel (EP) group, N nodes, R EP ranks
per node, L local experts per rank, S routed slots on this rank.

``moe.dispatcher: hierarchical``. The flat all-to-all sends every slot straight
to the rank that owns its expert, so each pair of nodes exchanges up to R*R
messages over the slow inter-node network. This dispatcher uses three
exchanges instead:

1. **intra-node**: a slot bound for another node goes to this node's relay for
   that node (local index ``pos(node) % R``); a slot for this node goes
   straight to its owner;
2. **inter-node**: each relay sends what it gathered for a node to its peer on
   that node (same local index), so each (source node, destination node)
   pair is crossed by exactly one message;
3. **intra-node**: the receiving relay scatters the slots to their owners.

Every slot carries ``(source EP rank, source slot, expert)``; the owner sorts
what it received into exactly the order the flat dispatcher produces
(expert, then source rank, then source slot), so experts see identical
inputs, and ``combine`` (the stages in reverse) returns every slot to its
source slot: outputs and gradients equal the flat path bit for bit.

Group ranks follow global rank order (torch sorts ``new_group`` ranks): in
the intra-node group that is the local index, in the peer group the node
position, given node numbers that grow with the rank (true for torchrun and
for ``parallel.ranks_per_node``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from locmoe_train.errors import UserError
from locmoe_train.moe.dispatcher import (AllToAllDispatcher, DispatchMeta, _all_to_all,
                                         register_dispatcher)
from locmoe_train.parallel.state import EPTopology


@dataclass
class _Stage:
    group: object
    members: list[int]  # EP rank of each group rank
    order: torch.Tensor  # rows sorted by destination before sending
    in_splits: list[int]
    out_splits: list[int]


@dataclass
class HierarchicalMeta(DispatchMeta):
    stages: list[_Stage] = field(default_factory=list)
    final_order: torch.Tensor | None = None  # received rows -> expert-major order


@register_dispatcher("hierarchical")
class HierarchicalDispatcher(AllToAllDispatcher):
    @classmethod
    def build(cls, num_experts: int, mp, pad_to_capacity: bool) -> "HierarchicalDispatcher":
        return cls(num_experts, mp.topology, mp.ep_rank, pad_to_capacity, mp.ep_group)

    def __init__(self, num_experts: int, topo: EPTopology, my_ep_rank: int,
                 pad_to_capacity: bool = False, ep_group=None):
        super().__init__(num_experts, ep_group, len(topo.ep_ranks), pad_to_capacity,
                         topo.node_of_ep, my_ep_rank)
        self.active = topo.num_nodes > 1 and self.ep_size > 1
        if self.active and (not topo.ranks_per_node or topo.intra_group is None):
            raise UserError(
                "moe.dispatcher=hierarchical needs the same number of expert-parallel ranks on "
                "every node; check parallel.ranks_per_node (or the launch) against parallel.ep.")
        self.topo, self.R = topo, topo.ranks_per_node
        pos = {n: i for i, n in enumerate(topo.nodes)}
        self.ep_node_pos = torch.tensor([pos[n] for n in topo.node_of_ep])
        self.ep_local = torch.tensor(topo.local_index)
        me_pos, me_local = self.ep_node_pos[my_ep_rank], self.ep_local[my_ep_rank]
        self.intra_members = [i for i in range(self.ep_size) if self.ep_node_pos[i] == me_pos]
        self.peer_members = [i for i in range(self.ep_size) if self.ep_local[i] == me_local]

    def _owner(self, meta_S3: torch.Tensor) -> torch.Tensor:
        return torch.div(meta_S3[:, 2], self.num_local, rounding_mode="floor")

    def _exchange(self, x, meta_S3, dest, group, members: list[int]):
        """Send row i to group rank ``dest[i]``; returns the rows and meta received."""
        order = torch.sort(dest, stable=True).indices
        counts = torch.bincount(dest, minlength=len(members))
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        in_splits, out_splits = counts.tolist(), recv_counts.tolist()
        meta_sorted = meta_S3[order]
        x_recv = _all_to_all(group, x[order], out_splits, in_splits)
        meta_recv = meta_sorted.new_empty(sum(out_splits), 3)
        dist.all_to_all_single(meta_recv, meta_sorted, out_splits, in_splits, group=group)
        self._count(in_splits, members, x.shape[1] * x.element_size())
        return x_recv, meta_recv, _Stage(group, members, order, in_splits, out_splits)

    def dispatch(self, x_TD: torch.Tensor, routing):
        if not self.active:
            return super().dispatch(x_TD, routing)
        token_idx_S, gate_S, counts_E = self._permute(routing)
        x_pad = (torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])]) if self._padded(routing)
                 else x_TD)
        x_SD = x_pad[token_idx_S]
        dev = x_TD.device
        node_pos, local = self.ep_node_pos.to(dev), self.ep_local.to(dev)
        expert_S = torch.repeat_interleave(torch.arange(self.num_experts, device=dev), counts_E)
        meta = torch.stack([torch.full_like(expert_S, self.me),
                            torch.arange(len(expert_S), device=dev), expert_S], dim=1)
        my_pos = node_pos[self.me]

        owner = self._owner(meta)
        dest_node = node_pos[owner]
        dest1 = torch.where(dest_node == my_pos, local[owner], dest_node % self.R)
        x1, m1, s1 = self._exchange(x_SD, meta, dest1, self.topo.intra_group, self.intra_members)
        x2, m2, s2 = self._exchange(x1, m1, node_pos[self._owner(m1)],
                                    self.topo.peer_group, self.peer_members)
        x3, m3, s3 = self._exchange(x2, m2, local[self._owner(m2)],
                                    self.topo.intra_group, self.intra_members)
        # The flat dispatcher's order: local expert, then source rank, then source slot.
        local_expert = m3[:, 2] - self.me * self.num_local
        final = torch.argsort((local_expert * self.ep_size + m3[:, 0]) * (1 << 40) + m3[:, 1])
        meta_out = HierarchicalMeta(x_TD.shape[0], token_idx_S, gate_S,
                                    stages=[s1, s2, s3], final_order=final)
        tokens_per_local_expert = torch.bincount(local_expert, minlength=self.num_local)
        return x3[final], tokens_per_local_expert.to(counts_E.device), meta_out

    def combine(self, y_ND: torch.Tensor, meta) -> torch.Tensor:
        if not isinstance(meta, HierarchicalMeta):
            return super().combine(y_ND, meta)
        y = torch.empty_like(y_ND).index_copy(0, meta.final_order, y_ND)
        for stage in reversed(meta.stages):
            self._count(stage.out_splits, stage.members, y.shape[1] * y.element_size())
            y_sent = _all_to_all(stage.group, y, stage.in_splits, stage.out_splits)
            y = torch.empty_like(y_sent).index_copy(0, stage.order, y_sent)
        return self._weighted_sum(y, meta)
