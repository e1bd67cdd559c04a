"""Process groups, built in one place.

Owns: starting torch.distributed (from torchrun's environment, or a
single-process group without torchrun), megatron-core's ``parallel_state``
with tensor (TP), expert (EP), expert-tensor (ETP) and data (DP) parallel
sizes, the checks that need the world size, and the node topology (real nodes
from ``LOCAL_WORLD_SIZE``, or simulated with ``parallel.ranks_per_node``).
It builds ``MoEParallel``, what MoE layers need of the layout (their groups,
ranks and the expert-to-node map), once. Nothing else in the package calls
``initialize_model_parallel`` or reads megatron's ``parallel_state``; the
launcher's variables before start-up are read only through
``parallel/launch.py``. Modules receive the ``ParallelContext`` (or its
``moe`` part) instead.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from locmoe_train.config import ParallelConfig
from locmoe_train.errors import UserError
from locmoe_train.parallel import compat
from locmoe_train.parallel.launch import env_int as _env_int


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    ep: int
    etp: int
    dp: int
    edp: int  # expert data parallel: replicas of each expert shard
    tp_rank: int
    ep_rank: int
    etp_rank: int
    dp_rank: int
    edp_rank: int
    # Node topology: node_of_rank[r] is the node index of global rank r.
    ranks_per_node: int
    num_nodes: int
    node_of_rank: list[int] = field(default_factory=list)
    simulated_nodes: bool = False
    tp_group: object = None
    dp_group: object = None
    ep_group: object = None
    edp_group: object = None
    ep_topology: "EPTopology | None" = None
    # What MoE layers need of the layout (built once here, handed to the layers).
    moe: "MoEParallel | None" = None

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        nodes = f"{self.num_nodes} node(s) x {self.ranks_per_node} rank(s)"
        if self.simulated_nodes:
            nodes += " (simulated)"
        return (f"world={self.world_size} tp={self.tp} ep={self.ep} etp={self.etp} "
                f"dp={self.dp} edp={self.edp}; {nodes}; device={self.device}")


@dataclass
class EPTopology:
    """Where the ranks of this rank's expert-parallel group live, and the groups
    the locality-aware dispatcher exchanges over (``None`` when not hierarchical)."""
    ep_ranks: list[int]  # global rank of each EP index
    node_of_ep: list[int]  # node of each EP index
    nodes: list[int]  # distinct nodes of the group, sorted
    local_index: list[int]  # index of each EP rank among the group's ranks on its node
    ranks_per_node: int  # EP ranks per node (0 when nodes hold different numbers)
    intra_group: object = None  # this rank's node's EP ranks
    peer_group: object = None  # EP ranks with this rank's local index, one per node

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)


@dataclass
class MoEParallel:
    """The parallel layout as an MoE layer sees it: its expert-parallel and
    sequence-parallel groups, where every rank and expert lives, and the
    locality topology. Built once by ``init_parallel``; ``single()`` is one
    process."""
    rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: object = None  # None when ep_size == 1
    ep_ranks: list[int] = field(default_factory=lambda: [0])  # global rank of each EP index
    # Sequence parallelism (TP > 1 with MoE): routers see this rank's slice of
    # the sequence and reduce their loss counts over the TP group.
    sequence_parallel: bool = False
    sp_size: int = 1
    sp_rank: int = 0
    sp_group: object = None
    node_of_rank: list[int] = field(default_factory=lambda: [0])
    topology: "EPTopology | None" = None

    @classmethod
    def single(cls) -> "MoEParallel":
        return cls(topology=EPTopology([0], [0], [0], [0], 1))

    @property
    def node_of_ep(self) -> list[int]:
        return [self.node_of_rank[r] for r in self.ep_ranks]

    def expert_node(self, num_experts: int) -> list[int]:
        """Node of each expert: expert e lives on EP index e // (E / ep)."""
        per_rank = num_experts // self.ep_size
        return [self.node_of_rank[self.ep_ranks[e // per_rank]] for e in range(num_experts)]


def _partition(ep_ranks: list[int], node_of_rank: list[int]):
    node_of_ep = [node_of_rank[r] for r in ep_ranks]
    nodes = sorted(set(node_of_ep))
    members = {n: [i for i, m in enumerate(node_of_ep) if m == n] for n in nodes}
    local_index = [members[n].index(i) for i, n in enumerate(node_of_ep)]
    sizes = {len(v) for v in members.values()}
    return node_of_ep, nodes, members, local_index, (sizes.pop() if len(sizes) == 1 else 0)


def build_ep_topology(pctx: "ParallelContext") -> EPTopology:
    """This rank's EP group over the nodes, plus intra-node and peer groups for every
    EP group (``new_group`` is collective: every rank creates every group, in order)."""
    from megatron.core import parallel_state as ps

    group = ps.get_expert_model_parallel_group()
    ep_ranks = dist.get_process_group_ranks(group) if pctx.ep > 1 else [pctx.rank]
    node_of_ep, nodes, _, local_index, per_node = _partition(ep_ranks, pctx.node_of_rank)
    topo = EPTopology(ep_ranks, node_of_ep, nodes, local_index, per_node)
    if pctx.ep == 1 or pctx.world_size == 1:
        return topo
    mine = torch.tensor(ep_ranks, dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(pctx.world_size)]
    dist.all_gather(everyone, mine)
    for ranks in sorted({tuple(t.tolist()) for t in everyone}):
        _, g_nodes, members, _, g_per_node = _partition(list(ranks), pctx.node_of_rank)
        if len(g_nodes) < 2 or not g_per_node:
            continue  # flat is the only sensible exchange for this group
        for n in g_nodes:
            g = dist.new_group([ranks[i] for i in members[n]])
            if pctx.rank in [ranks[i] for i in members[n]]:
                topo.intra_group = g
        for j in range(g_per_node):
            peers = [ranks[members[n][j]] for n in g_nodes]
            g = dist.new_group(peers)
            if pctx.rank in peers:
                topo.peer_group = g
    return topo


def check_layout(cfg: ParallelConfig, world_size: int, etp: int) -> tuple[int, int, int]:
    """Validate parallel sizes against the world size; return (etp, dp, edp).

    ``etp`` is the resolved expert tensor-parallel size (``TrainConfig.expert_tp``).
    """
    if world_size % cfg.tp:
        raise UserError(
            f"parallel.tp={cfg.tp} does not divide the world size {world_size}: launch a "
            f"multiple of {cfg.tp} processes (torchrun --nproc_per_node) or lower parallel.tp.")
    if world_size % (etp * cfg.ep):
        raise UserError(
            f"parallel.ep={cfg.ep} x expert tensor parallel {etp} = {cfg.ep * etp} does not "
            f"divide the world size {world_size}: launch a multiple of {cfg.ep * etp} "
            f"processes or lower parallel.ep / parallel.etp.")
    if cfg.ranks_per_node is not None and world_size % cfg.ranks_per_node:
        raise UserError(
            f"parallel.ranks_per_node={cfg.ranks_per_node} does not divide the world size "
            f"{world_size}: simulated nodes must all have the same number of ranks.")
    return etp, world_size // cfg.tp, world_size // (cfg.ep * etp)


def _init_process_group(cfg: ParallelConfig, backend: str, rank: int, world_size: int,
                        device_id) -> tuple[int, int]:
    """Start torch.distributed; returns (rank, world size) as the rendezvous gave them."""
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    if "MASTER_ADDR" not in os.environ and world_size == 1:
        # Plain `python -m` / console script / in-process use: an in-memory
        # store, so no port is taken and no launcher variable leaks into
        # the environment of processes started later.
        store = dist.HashStore()
    else:
        # After a torchrun restart (--max-restarts) the agent's store still
        # holds the previous attempt's keys (gloo would connect to dead
        # ranks' ports): give every attempt its own key space.
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size,
                                                       timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"locmoe/attempt_{attempt}/", store)
    dist.init_process_group(
        backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
        device_id=device_id)
    return rank, world_size


def init_parallel(cfg: ParallelConfig, etp: int = 1, device: str = "auto",
                  seed: int = 1234) -> ParallelContext:
    """Start torch.distributed and megatron-core's parallel state.

    ``etp``: the resolved expert tensor-parallel size (``TrainConfig.expert_tp``).
    """
    from megatron.core import parallel_state, tensor_parallel

    compat.apply()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    etp, dp, edp = check_layout(cfg, world_size, etp)

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device=cuda but CUDA is not available here: use "
                        "--train.device=cpu or auto.")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise UserError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU.")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    if not dist.is_initialized():
        rank, world_size = _init_process_group(cfg, backend, rank, world_size,
                                               dev if use_cuda else None)

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=cfg.timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    if cfg.ranks_per_node is not None:
        per_node, simulated = cfg.ranks_per_node, True
    else:
        per_node, simulated = local_world, False
        if world_size % per_node:
            raise UserError(f"LOCAL_WORLD_SIZE={per_node} does not divide the world size "
                            f"{world_size}: every node must run the same number of ranks.")

    ps = parallel_state
    pctx = ParallelContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
        tp=cfg.tp, ep=cfg.ep, etp=etp, dp=dp, edp=edp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        ranks_per_node=per_node, num_nodes=world_size // per_node,
        node_of_rank=[r // per_node for r in range(world_size)],
        simulated_nodes=simulated,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group(),
    )
    pctx.ep_topology = build_ep_topology(pctx)
    sp = cfg.tp > 1  # megatron-core needs sequence parallelism for MoE with TP
    pctx.moe = MoEParallel(
        rank=rank, ep_size=cfg.ep, ep_rank=pctx.ep_rank,
        ep_group=pctx.ep_group if cfg.ep > 1 else None,
        ep_ranks=pctx.ep_topology.ep_ranks, sequence_parallel=sp,
        sp_size=cfg.tp if sp else 1, sp_rank=pctx.tp_rank if sp else 0,
        sp_group=pctx.tp_group if sp else None, node_of_rank=pctx.node_of_rank,
        topology=pctx.ep_topology)
    return pctx


def destroy_parallel() -> None:
    """Tear down megatron-core state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    # The MoE loss tracker is process-global and sized by the first model built.
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    if dist.is_initialized():
        dist.destroy_process_group()
