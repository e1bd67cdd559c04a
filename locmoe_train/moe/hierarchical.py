"""Locality-aware (hierarchical) dispatch: a token crosses to each node at most once.

Legend: D hidden, P ranks in the expert-parallel (EP) group, R EP ranks per
node, L local experts per rank, S routed slots on this rank, N rows its
experts receive, K slots a rank holds during a hop, U rows it holds (a row
can serve several slots), V rows it sends in a hop, G ranks in the hop's
group, B bytes of one row (or of one slot's metadata).

Owns ``moe.dispatcher: hierarchical``: the three-hop exchange, its byte
accounting, and the per-slot return path. Not the permutation, the padded
layout or the gate-weighted sum, which it inherits from the flat
``AllToAllDispatcher``. The flat all-to-all sends every (token, expert) slot
straight to its expert's owner, so a token with k experts on one remote node
crosses the boundary k times, and each pair of nodes exchanges up to R*R
messages. Here ``dispatch`` uses three hops:

1. **intra-node**: a slot bound for another node goes to this node's relay for
   that node (local index ``pos(node) % R``); a slot for this node goes
   straight to its owner;
2. **inter-node**: each relay sends what it gathered for a node to its peer on
   that node (same local index): one message per (source node, destination
   node) pair;
3. **intra-node**: the receiving relay scatters the slots to their owners.

**Deduplication.** A hop sends a row once to every group rank that one of its
slots needs: once per (token, relay) in hop 1, per (token, node) in hop 2,
per (token, owner) in hop 3. The slots travel as metadata in the same
message, ``META_BYTES`` per slot: the key of the flat order
(expert, source rank, source slot), and which row of the message it reads.
The owner copies each row to its slots and sorts them by the key, so the
experts see exactly the flat dispatcher's inputs, in its order.

**The way back is per slot, to stay bit for bit.** ``combine`` returns one
row per slot through the hops in reverse, and the flat ``_weighted_sum`` adds
them on the source rank. Summing per (token, node) at the destination first
would change the fp32 order of a token's sum once it has three or more
slots, would need the gates at the destination (and their gradient back),
and in bf16 the exact partial sum (fp32) is as large as two bf16 slot rows,
so top-2 would save nothing. For the same reason the backward of dispatch
sends one gradient row per slot (``_DedupDispatch``), so that dx is summed
over a token's slots in the flat order, not per node first. ``self.traffic``
counts the forward only (as the flat dispatcher does), from split sizes on
the host: rows and slot metadata; not the split-size exchanges (a few int64
per peer and hop), which both dispatchers leave out. Measurements and the
reasoning at length: docs/locality.md.

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
                                         _exclusive_cumsum, register_dispatcher)
from locmoe_train.parallel.state import EPTopology

SLOT_BITS = 40  # key = (expert * P + source rank) << SLOT_BITS | source slot
META_BYTES = 16  # per slot and hop: key and row index, two int64


@dataclass
class _Hop:
    """One exchange, as the way back needs it: slots in per-slot rows."""
    group: object
    members: list[int]  # EP rank of each group rank
    order_K: torch.Tensor  # slots sorted by destination before sending
    in_splits: list[int]  # slots sent to each group rank
    out_splits: list[int]  # slots received from each group rank

    def reverse(self, y_KD: torch.Tensor) -> torch.Tensor:
        """Rows of the slots received, back to the sender in its slot order (autograd-aware)."""
        y_sent = _all_to_all(self.group, y_KD, self.in_splits, self.out_splits)
        return torch.empty_like(y_sent).index_copy(0, self.order_K, y_sent)


@dataclass
class HierarchicalMeta(DispatchMeta):
    stages: list[_Hop] = field(default_factory=list)
    final_order: torch.Tensor | None = None  # slots received -> expert-major order


class _DedupDispatch(torch.autograd.Function):
    """The three hops on ``x_SD``: forward sends deduplicated rows; backward returns
    one gradient row per slot, so autograd sums dx exactly as the flat path does."""

    @staticmethod
    def forward(ctx, x_SD, disp, key_S, meta: HierarchicalMeta):
        x_ND, tokens_per_local_expert_L = disp._send(x_SD, key_S, meta)
        ctx.meta = meta
        ctx.mark_non_differentiable(tokens_per_local_expert_L)
        return x_ND, tokens_per_local_expert_L

    @staticmethod
    def backward(ctx, grad_ND, _grad_counts):
        meta = ctx.meta
        grad = torch.empty_like(grad_ND).index_copy(0, meta.final_order, grad_ND)
        for hop in reversed(meta.stages):
            grad = hop.reverse(grad)
        return grad, None, None, None


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
        assert num_experts * self.ep_size < 1 << (63 - SLOT_BITS), "slot key would overflow"
        self.topo, self.R = topo, topo.ranks_per_node
        pos = {n: i for i, n in enumerate(topo.nodes)}
        self.ep_node_pos = torch.tensor([pos[n] for n in topo.node_of_ep])
        self.ep_local = torch.tensor(topo.local_index)
        me_pos, me_local = self.ep_node_pos[my_ep_rank], self.ep_local[my_ep_rank]
        self.intra_members = [i for i in range(self.ep_size) if self.ep_node_pos[i] == me_pos]
        self.peer_members = [i for i in range(self.ep_size) if self.ep_local[i] == me_local]

    def _owner(self, key_K: torch.Tensor) -> torch.Tensor:
        expert_K = torch.div(key_K >> SLOT_BITS, self.ep_size, rounding_mode="floor")
        return torch.div(expert_K, self.num_local, rounding_mode="floor")

    def _hop(self, x_UD, row_K, key_K, dest_K, group, members: list[int]):
        """Send each row once to every group rank in ``dest_K`` of the slots reading it.

        Slot k reads row ``row_K[k]`` and goes to group rank ``dest_K[k]``. One
        message per group rank carries its rows, then its slots' (key, row in
        the message). Returns the rows, slot rows and keys received, and the hop.
        """
        G, U, D = len(members), x_UD.shape[0], x_UD.shape[1]
        dev = x_UD.device
        # Sorted unique (destination, row) pairs: the rows to send, grouped by destination.
        pair_V, msg_row_K = torch.unique(dest_K * U + row_K, return_inverse=True)
        dest_V = torch.div(pair_V, max(U, 1), rounding_mode="floor")
        rows_G, slots_G = torch.bincount(dest_V, minlength=G), torch.bincount(dest_K, minlength=G)
        order_K = torch.sort(dest_K, stable=True).indices
        row_in_msg_K = msg_row_K - _exclusive_cumsum(rows_G)[dest_K]
        meta_K2 = torch.stack([key_K, row_in_msg_K], dim=1)[order_K]
        recv_G2 = torch.empty(G, 2, dtype=torch.int64, device=dev)
        dist.all_to_all_single(recv_G2, torch.stack([rows_G, slots_G], dim=1), group=group)
        rows_in, slots_in = rows_G.tolist(), slots_G.tolist()
        rows_out, slots_out = recv_G2[:, 0].tolist(), recv_G2[:, 1].tolist()

        row_bytes = D * x_UD.element_size()
        x_bytes_VB = x_UD[pair_V - dest_V * U].contiguous().view(torch.uint8)
        meta_bytes_KB = meta_K2.contiguous().view(torch.uint8)
        parts = [p.reshape(-1) for pair in zip(x_bytes_VB.split(rows_in),
                                               meta_bytes_KB.split(slots_in)) for p in pair]
        in_bytes = [r * row_bytes + s * META_BYTES for r, s in zip(rows_in, slots_in)]
        out_bytes = [r * row_bytes + s * META_BYTES for r, s in zip(rows_out, slots_out)]
        recv = _all_to_all(group, torch.cat(parts), out_bytes, in_bytes)
        self._count(in_bytes, members, 1)

        chunks = recv.split(out_bytes)
        x_recv = torch.cat([c[:r * row_bytes] for c, r in zip(chunks, rows_out)])
        meta_recv = torch.cat([c[r * row_bytes:] for c, r in zip(chunks, rows_out)])
        x_recv_UD = x_recv.view(x_UD.dtype).view(-1, D)
        meta_recv_K2 = meta_recv.view(torch.int64).view(-1, 2)
        # A slot's row index counts within its sender's rows: offset it by the rows before.
        sender_K = torch.repeat_interleave(torch.arange(G, device=dev), recv_G2[:, 1])
        row_recv_K = meta_recv_K2[:, 1] + _exclusive_cumsum(recv_G2[:, 0])[sender_K]
        hop = _Hop(group, members, order_K, slots_in, slots_out)
        return x_recv_UD, row_recv_K, meta_recv_K2[:, 0].contiguous(), hop

    def _send(self, x_SD, key_S, meta: HierarchicalMeta):
        """The three hops, without autograd; fills ``meta`` for the way back."""
        dev = x_SD.device
        node_pos, local = self.ep_node_pos.to(dev), self.ep_local.to(dev)
        # Every slot of a token reads the row of the token's first slot.
        S = x_SD.shape[0]
        first_T = torch.full((meta.num_tokens + 1,), S, dtype=torch.int64, device=dev)
        first_T.scatter_reduce_(0, meta.token_idx_S, torch.arange(S, device=dev), "amin")
        x_UD, row_K, key_K = x_SD, first_T[meta.token_idx_S], key_S

        owner_K = self._owner(key_K)
        node_K = node_pos[owner_K]
        relay_K = torch.where(node_K == node_pos[self.me], local[owner_K], node_K % self.R)
        x_UD, row_K, key_K, hop1 = self._hop(x_UD, row_K, key_K, relay_K,
                                             self.topo.intra_group, self.intra_members)
        x_UD, row_K, key_K, hop2 = self._hop(x_UD, row_K, key_K, node_pos[self._owner(key_K)],
                                             self.topo.peer_group, self.peer_members)
        x_UD, row_K, key_K, hop3 = self._hop(x_UD, row_K, key_K, local[self._owner(key_K)],
                                             self.topo.intra_group, self.intra_members)
        # The key sorts into the flat order: local expert, then source rank, then source slot.
        meta.final_order = torch.argsort(key_K)
        meta.stages = [hop1, hop2, hop3]
        local_expert_K = torch.div(key_K >> SLOT_BITS, self.ep_size,
                                   rounding_mode="floor") - self.me * self.num_local
        counts_L = torch.bincount(local_expert_K, minlength=self.num_local)
        return x_UD[row_K[meta.final_order]], counts_L

    def dispatch(self, x_TD: torch.Tensor, routing):
        if not self.active:
            return super().dispatch(x_TD, routing)
        token_idx_S, gate_S, counts_E = self._permute(routing)
        x_pad = (torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])]) if self._padded(routing)
                 else x_TD)
        x_SD = x_pad[token_idx_S]  # as in the flat path, so autograd sums dx the same way
        dev = x_TD.device
        expert_S = torch.repeat_interleave(torch.arange(self.num_experts, device=dev), counts_E)
        key_S = ((expert_S * self.ep_size + self.me) << SLOT_BITS) + torch.arange(
            len(expert_S), device=dev)
        meta = HierarchicalMeta(x_TD.shape[0], token_idx_S, gate_S)
        x_ND, tokens_per_local_expert = _DedupDispatch.apply(x_SD, self, key_S, meta)
        return x_ND, tokens_per_local_expert.to(counts_E.device), meta

    def combine(self, y_ND: torch.Tensor, meta) -> torch.Tensor:
        if not isinstance(meta, HierarchicalMeta):
            return super().combine(y_ND, meta)
        y = torch.empty_like(y_ND).index_copy(0, meta.final_order, y_ND)
        for hop in reversed(meta.stages):
            self._count(hop.out_splits, hop.members, y.shape[1] * y.element_size())
            y = hop.reverse(y)
        return self._weighted_sum(y, meta)
