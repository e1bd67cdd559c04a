"""Flat vs hierarchical MoE dispatch: cross-node bytes, messages and time, measured and projected.

    python scripts/bench_dispatch.py                                   # 2 nodes x 2 ranks (gloo, CPU)
    python scripts/bench_dispatch.py --nodes 2 --ranks-per-node 2 --tokens 2048 --hidden 128 \\
        --experts 8 --top-k 2 --local-bias 2.0 --max-nodes 1 --out bench_dispatch.json

Measured part: spawns ``nodes * ranks_per_node`` gloo processes, simulated as
nodes with ``parallel.ranks_per_node``, EP over all of them. Each rank routes
``--tokens`` random tokens with a top-k softmax router, then times
dispatch + combine, with identity experts, for both dispatchers. Three
routings are measured: ``uniform`` (random router weights);
``local_bias`` (+b on the logits of the rank's own node's experts, standing
in for what a locality loss teaches); and ``node_limited`` (``--max-nodes``,
DeepSeek-V3 style). Per routing and dispatcher, summed over ranks, it records
cross-node bytes (in all, and split into dispatch and combine), intra-node
bytes, cross-node messages, the share of slots served on their own node, and
the wall time per dispatch + combine (max over ranks). The hierarchical
dispatch sends a token's row once per remote node plus ``META_BYTES`` per
slot, so its dispatch bytes also give ``rows_per_remote_slot``: the rows it
sent across per slot that lives on another node (1.0 without deduplication).

Projected part (analytic, the formulas are in ``project``): per MoE layer and
step, for clusters of ``--gpus-per-node`` ranks per node and 2..64 nodes.
Each rank routes ``S = tokens * top_k`` slots of ``B = hidden * 2`` bytes
(bf16). The measured same-node share is turned into a "locality lift"
``L = share * nodes_measured``, and a cluster of N nodes keeps ``min(1, L/N)``
of the slots on their node; ``K = S * (1 - min(1, L/N))`` slots live on other
nodes. Time is ``cross_bytes / inter_bw + intra_bytes / intra_bw + messages *
latency``. Flat: ``2 K B`` cross-node bytes, ``(N-1)*G`` messages per rank
and direction. Hierarchical: ``K (r B + m)`` on dispatch (``r`` the measured
``rows_per_remote_slot``, ``m`` the metadata per slot) and ``K B`` on
combine, ``ceil((N-1)/G)`` messages per rank and direction, and extra
intra-node bytes for the relay hops (the rows of hop 1, one row and ``m`` per
slot in hop 3, one row per slot in each combine hop; times ``(G-1)/G``, the
share of hops that leave the rank). ``r`` is held at its measured value: that
is exact for ``node_limited`` with ``--max-nodes 1`` (all of a token's experts
share one node at any N, so ``r = 1/top_k``), and overstates the saving of
``uniform`` and ``local_bias`` on more nodes, where fewer of a token's
experts share a node.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args, port: int, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    world = args.nodes * args.ranks_per_node
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from locmoe_train.config import load_config
    from locmoe_train.moe.dispatcher import AllToAllDispatcher
    from locmoe_train.moe.hierarchical import HierarchicalDispatcher
    from locmoe_train.moe.routers import RouterSetup, TopKRouter
    from locmoe_train.parallel.state import destroy_parallel, init_parallel

    results = {}
    try:
        for routing_name in ("uniform", "local_bias", "node_limited"):
            overrides = [f"moe.num_experts={args.experts}", f"moe.top_k={args.top_k}",
                         f"parallel.ep={world}", f"parallel.ranks_per_node={args.ranks_per_node}",
                         "moe.dispatcher=hierarchical", f"model.hidden_size={args.hidden}",
                         "model.num_attention_heads=1"]
            if routing_name == "node_limited":
                overrides.append(f"moe.max_nodes_per_token={args.max_nodes}")
            cfg = load_config(None, overrides)
            pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 1)
            topo = pctx.ep_topology
            router = TopKRouter(cfg.moe, args.hidden, RouterSetup(
                expert_node_E=torch.tensor(pctx.moe.expert_node(args.experts))))
            torch.manual_seed(1234)  # same router on every rank
            torch.nn.init.normal_(router.weight, std=1.0 / math.sqrt(args.hidden))
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(args.tokens, args.hidden, generator=gen)
            if routing_name == "local_bias":
                local = router.expert_node_E == topo.node_of_ep[pctx.ep_rank]
                # Shift tokens along the local experts' router rows: their logits
                # rise by about local_bias (the rows are near-orthogonal, norm ~1).
                x = x + args.local_bias * router.weight[local].sum(0)
            with torch.no_grad():
                routing = router(x)
            map_TE = routing.routing_map_TE
            same = int((map_TE & (router.expert_node_E == topo.node_of_ep[pctx.ep_rank])).sum())
            flat = AllToAllDispatcher.build(args.experts, pctx.moe, False)
            hier = HierarchicalDispatcher.build(args.experts, pctx.moe, False)
            for name, disp in (("flat", flat), ("hierarchical", hier)):
                results[(routing_name, name)] = _measure(disp, x, routing, same, args)
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    finally:
        destroy_parallel()
    if rank == 0:
        queue.put(results)


def _measure(disp, x, routing, same: int, args) -> dict:
    """One dispatcher on one routing: traffic and time per dispatch + combine, all ranks."""
    from locmoe_train.moe.hierarchical import META_BYTES

    keys = ("bytes_cross_node", "bytes_intra_node", "messages_cross_node")
    total = dict.fromkeys(keys, 0) | {"dispatch": 0, "combine": 0}
    times = []
    for it in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            y, _, meta = disp.dispatch(x, routing)
            sent = disp.pop_traffic()
            disp.combine(y, meta)
        times.append(time.perf_counter() - t0)
        back = disp.pop_traffic()
        if it < args.warmup:
            continue
        total["dispatch"] += sent["bytes_cross_node"]
        total["combine"] += back["bytes_cross_node"]
        for key in keys:
            total[key] += sent[key] + back[key]
    slots = int(routing.routing_map_TE.sum())
    stats = torch.tensor([total["bytes_cross_node"], total["dispatch"], total["combine"],
                          total["bytes_intra_node"], total["messages_cross_node"], same,
                          slots, sum(times[args.warmup:]) / args.iters], dtype=torch.float64)
    summed = stats.clone()
    dist.all_reduce(summed)
    slowest = stats.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    per_iter = summed / args.iters
    remote_slots = (summed[6] - summed[5]).item()  # one direction, per call
    meta_bytes = META_BYTES if disp.name == "hierarchical" else 0
    dispatch_rows = (per_iter[1].item() - meta_bytes * remote_slots) / (
        x.shape[1] * x.element_size())
    return {"bytes_cross_node": per_iter[0].item(),
            "bytes_cross_node_dispatch": per_iter[1].item(),
            "bytes_cross_node_combine": per_iter[2].item(),
            "bytes_intra_node": per_iter[3].item(),
            "messages_cross_node": per_iter[4].item(),
            "same_node_share": summed[5].item() / summed[6].item(),
            "remote_slots": remote_slots,
            "rows_per_remote_slot": dispatch_rows / max(remote_slots, 1),
            "meta_bytes_per_slot": meta_bytes,
            "time_s": slowest[7].item()}


def project(measured: dict, args) -> list[dict]:
    """Per MoE layer and step (dispatch + combine), per rank, for N-node clusters."""
    G, rows = args.gpus_per_node, []
    B = args.proj_hidden * 2  # bf16 row
    S = args.proj_tokens * args.top_k
    leave = (G - 1) / G  # share of intra-node hops that go to another rank
    for routing_name in ("uniform", "local_bias", "node_limited"):
        share = measured[(routing_name, "flat")]["same_node_share"]
        hier = measured[(routing_name, "hierarchical")]
        r, m = hier["rows_per_remote_slot"], hier["meta_bytes_per_slot"]
        lift = share * args.nodes
        for N in (2, 4, 8, 16, 32, 64):
            local = min(1.0, lift / N)
            K = S * (1 - local)  # slots on other nodes, per direction
            for name in ("flat", "hierarchical"):
                if name == "flat":
                    msgs = 2 * (N - 1) * G
                    cross_b, intra_b = 2 * K * B, 2 * S * local * B * leave
                else:
                    msgs = 2 * math.ceil((N - 1) / G)
                    cross_b = K * (r * B + m) + K * B
                    relay_b = K * (r * B + m) + K * (B + m) + 2 * K * B
                    intra_b = (S * local * (2 * B + m) + relay_b) * leave
                t = (cross_b / (args.inter_gbps * 1e9) + intra_b / (args.intra_gbps * 1e9)
                     + msgs * args.latency_us * 1e-6)
                rows.append({"routing": routing_name, "nodes": N, "dispatcher": name,
                             "cross_node_MB": cross_b / 1e6, "cross_messages": msgs,
                             "comm_ms": t * 1e3})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-nodes", type=int, default=1, help="node limit for node_limited")
    ap.add_argument("--local-bias", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--intra-gbps", type=float, default=450.0)
    ap.add_argument("--inter-gbps", type=float, default=50.0)
    ap.add_argument("--latency-us", type=float, default=10.0, help="per cross-node message")
    ap.add_argument("--proj-tokens", type=int, default=8192, help="tokens per GPU, projection")
    ap.add_argument("--proj-hidden", type=int, default=4096, help="hidden size, projection")
    ap.add_argument("--out", default="bench_dispatch.json")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args, _free_port(), queue),
                       nprocs=args.nodes * args.ranks_per_node, start_method="spawn")
    measured = queue.get()
    lines = [f"measured: {args.nodes} nodes x {args.ranks_per_node} ranks (gloo, CPU), "
             f"{args.tokens} tokens/rank, hidden {args.hidden}, {args.experts} experts, "
             f"top-{args.top_k}; per dispatch+combine, all ranks",
             "| routing | dispatcher | cross-node bytes | of which dispatch | of which combine "
             "| rows per remote slot | cross-node messages | intra-node bytes | same-node share "
             "| time (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (routing_name, name), m in measured.items():
        lines.append(f"| {routing_name} | {name} | {m['bytes_cross_node']:.0f} | "
                     f"{m['bytes_cross_node_dispatch']:.0f} | {m['bytes_cross_node_combine']:.0f} "
                     f"| {m['rows_per_remote_slot']:.3f} | {m['messages_cross_node']:.0f} | "
                     f"{m['bytes_intra_node']:.0f} | {m['same_node_share']:.3f} | "
                     f"{m['time_s'] * 1e3:.2f} |")
    proj = project(measured, args)
    lines += ["", f"projected per MoE layer and step, per GPU: {args.gpus_per_node} GPUs/node, "
              f"{args.intra_gbps:g} GB/s intra, {args.inter_gbps:g} GB/s inter, "
              f"{args.latency_us:g} us/message, {args.proj_tokens} tokens/GPU, hidden "
              f"{args.proj_hidden}, bf16", "| routing | nodes | flat ms | hierarchical ms "
              "| flat cross-node MB | hier cross-node MB | flat msgs | hier msgs |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(0, len(proj), 2):
        f_, h_ = proj[i], proj[i + 1]
        lines.append(f"| {f_['routing']} | {f_['nodes']} | {f_['comm_ms']:.3f} | "
                     f"{h_['comm_ms']:.3f} | {f_['cross_node_MB']:.1f} | {h_['cross_node_MB']:.1f} "
                     f"| {f_['cross_messages']} | {h_['cross_messages']} |")
    print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump({"args": vars(args),
                   "measured": [{"routing": r, "dispatcher": d, **m}
                                for (r, d), m in measured.items()],
                   "projected": proj}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
