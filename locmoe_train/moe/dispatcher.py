"""Token dispatch over the expert-parallel group: permute, all-to-all, regroup, and back.

Legend: T tokens on this rank, D hidden, E experts, P expert-parallel ranks,
L = E / P local experts, S routed slots (kept (token, expert) pairs).

``dispatch(x_TD, routing)`` returns ``(x_ND, tokens_per_local_expert_L, meta)``
where the N rows are grouped by local expert; ``combine(y_ND, meta)`` returns
``y_TD = sum over a token's experts of gate * expert output``. Gates never
travel: they are applied on the token's own rank after the return trip.

Two layouts:
* dropless (variable): slots sorted by expert, then token. Split sizes come
  from the routing, so one small count exchange and one host sync per layer.
* padded (``moe.pad_to_capacity``): every expert gets exactly C slots
  (empty ones point at a zero row), so every shape is static and no host
  sync is needed. A routing without a capacity (LocMoE+ at evaluation,
  where tokens choose) falls back to the dropless layout.

The dispatchers ``moe.dispatcher`` names are registered here
(``@register_dispatcher``, ``DISPATCHERS``, ``dispatcher_class``); each
builds itself from the layer's ``MoEParallel`` (``build``), so the layer
never branches on a dispatcher name.

Edge cases that must work: experts that receive no token, ranks that send
or receive nothing, tokens routed to no expert (dropped: output 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from locmoe_train.errors import UserError
from locmoe_train.model.recompute import recomputing
from locmoe_train.moe.routing import RoutingResult


@dataclass
class DispatchMeta:
    num_tokens: int
    token_idx_S: torch.Tensor  # source token of each slot (num_tokens = padding row)
    gate_S: torch.Tensor  # gate value of each slot
    in_splits: Optional[list[int]] = None  # rows sent to each EP rank
    out_splits: Optional[list[int]] = None  # rows received from each EP rank
    regroup_N: Optional[torch.Tensor] = None  # received (rank-major) -> expert-major order


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _all_to_all(group, x: torch.Tensor, out_splits: list[int], in_splits: list[int]):
    from megatron.core.tensor_parallel.mappings import all_to_all

    return all_to_all(group, x, out_splits, in_splits)


DISPATCHERS: dict[str, type] = {}


def register_dispatcher(name: str):
    def wrap(cls):
        cls.name = name
        DISPATCHERS[name] = cls
        return cls
    return wrap


def dispatcher_class(name: str):
    """The dispatcher class ``moe.dispatcher`` names (the registry fills on import)."""
    import locmoe_train.moe.hierarchical  # noqa: F401  (registers itself)

    if name not in DISPATCHERS:
        raise UserError(f"moe.dispatcher={name!r} is not one of "
                        f"{', '.join(repr(n) for n in DISPATCHERS)} for moe.impl=native.")
    return DISPATCHERS[name]


@register_dispatcher("alltoall")
class AllToAllDispatcher:
    @classmethod
    def build(cls, num_experts: int, mp, pad_to_capacity: bool) -> "AllToAllDispatcher":
        """From the layer's ``MoEParallel``."""
        return cls(num_experts, mp.ep_group, mp.ep_size, pad_to_capacity, mp.node_of_ep,
                   mp.ep_rank)

    def __init__(self, num_experts: int, ep_group=None, ep_size: int = 1,
                 pad_to_capacity: bool = False, node_of_ep: list[int] | None = None,
                 my_ep_rank: int = 0):
        self.num_experts = num_experts
        self.ep_group, self.ep_size = ep_group, ep_size
        self.num_local = num_experts // ep_size
        self.pad = pad_to_capacity
        self.node_of_ep = node_of_ep or [0] * ep_size
        self.me = my_ep_rank
        self.traffic = {"bytes_intra_node": 0, "bytes_cross_node": 0, "messages_cross_node": 0}

    def _count(self, splits: list[int], members: list[int], row_bytes: int) -> None:
        """Account one send: ``splits[j]`` rows to the EP rank ``members[j]`` (not again
        when activation recompute repeats the forward's all-to-all)."""
        if recomputing():
            return
        mine = self.node_of_ep[self.me]
        for rows, peer in zip(splits, members):
            if rows == 0 or peer == self.me:
                continue
            if self.node_of_ep[peer] == mine:
                self.traffic["bytes_intra_node"] += rows * row_bytes
            else:
                self.traffic["bytes_cross_node"] += rows * row_bytes
                self.traffic["messages_cross_node"] += 1

    def pop_traffic(self) -> dict[str, int]:
        out = dict(self.traffic)
        for k in self.traffic:
            self.traffic[k] = 0
        return out

    def _padded(self, routing: RoutingResult) -> bool:
        return self.pad and routing.capacity is not None

    # ---- local permutation ----------------------------------------------------
    def _permute(self, routing: RoutingResult):
        map_TE = routing.routing_map_TE
        T, E = map_TE.shape
        if self._padded(routing):
            C = routing.capacity
            dev = map_TE.device
            pos_TE = torch.cumsum(map_TE.to(torch.int64), dim=0) - 1
            # Routed pairs go to their slot, the others to one extra slot at E*C
            # that is cut off: a scatter of fixed size, so no data-dependent
            # shape and no host sync (boolean-mask indexing would need both).
            slot_TE = torch.where(map_TE, torch.arange(E, device=dev) * C + pos_TE, E * C)
            token_TE = torch.arange(T, device=dev)[:, None].expand(T, E)
            token_idx_S = torch.full((E * C + 1,), T, dtype=torch.int64, device=dev)
            token_idx_S.scatter_(0, slot_TE.reshape(-1), token_TE.reshape(-1))
            token_idx_S = token_idx_S[:E * C]
            expert_S = torch.arange(E, device=dev).repeat_interleave(C)
            counts_E = torch.full((E,), C, dtype=torch.int64, device=dev)
        else:
            expert_S, token_idx_S = map_TE.t().nonzero(as_tuple=True)
            counts_E = map_TE.sum(0)
        gates_pad = torch.cat([routing.gates_TE, routing.gates_TE.new_zeros(1, E)])
        gate_S = gates_pad[token_idx_S, expert_S]
        return token_idx_S, gate_S, counts_E

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult):
        T = x_TD.shape[0]
        token_idx_S, gate_S, counts_E = self._permute(routing)
        padded = self._padded(routing)
        x_pad = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])]) if padded else x_TD
        x_SD = x_pad[token_idx_S]
        meta = DispatchMeta(T, token_idx_S, gate_S)
        if self.ep_size == 1:
            return x_SD, counts_E, meta

        P, L = self.ep_size, self.num_local
        send_PL = counts_E.view(P, L)
        if padded:
            recv_PL = send_PL  # every rank sends C rows per expert
        else:
            recv_PL = torch.empty_like(send_PL)
            dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=self.ep_group)
        meta.in_splits = send_PL.sum(1).tolist()
        meta.out_splits = recv_PL.sum(1).tolist()
        x_ND = _all_to_all(self.ep_group, x_SD, meta.out_splits, meta.in_splits)
        self._count(meta.in_splits, list(range(P)), x_SD.shape[1] * x_SD.element_size())
        # Received rows are ordered (source rank, local expert); experts want
        # them grouped by local expert: chunk (p, l) moves to position (l, p).
        lens = recv_PL.reshape(-1)
        starts = _exclusive_cumsum(lens)
        order = torch.arange(P * L, device=lens.device).view(P, L).t().reshape(-1)
        chunk_lens, chunk_starts = lens[order], starts[order]
        within = torch.arange(int(chunk_lens.sum()), device=lens.device) - torch.repeat_interleave(
            _exclusive_cumsum(chunk_lens), chunk_lens)
        meta.regroup_N = torch.repeat_interleave(chunk_starts, chunk_lens) + within
        return x_ND[meta.regroup_N], recv_PL.sum(0), meta

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        if self.ep_size > 1:
            y_recv = torch.empty_like(y_ND).index_copy(0, meta.regroup_N, y_ND)
            y_SD = _all_to_all(self.ep_group, y_recv, meta.in_splits, meta.out_splits)
            self._count(meta.out_splits, list(range(self.ep_size)),
                        y_ND.shape[1] * y_ND.element_size())
        else:
            y_SD = y_ND
        return self._weighted_sum(y_SD, meta)

    @staticmethod
    def _weighted_sum(y_SD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """``y_TD[t] = sum over t's slots of gate * expert output``, accumulated in fp32."""
        weighted = y_SD.float() * meta.gate_S[:, None]
        out = torch.zeros(meta.num_tokens + 1, y_SD.shape[1], dtype=torch.float32,
                          device=y_SD.device)
        out.index_add_(0, meta.token_idx_S, weighted)
        return out[:meta.num_tokens].to(y_SD.dtype)
