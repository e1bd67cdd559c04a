"""Parallel state at 2 ranks: megatron groups, our context, real and simulated nodes."""

from megatron.core import parallel_state as ps

from harness import run_ranks
from locmoe_train.config import load_config
from locmoe_train.parallel.state import destroy_parallel, init_parallel


def _layouts(rank):
    out = {}
    for name, overrides in [("ep2", ["parallel.ep=2"]), ("tp2", ["parallel.tp=2"]),
                            ("ep2_sim_nodes", ["parallel.ep=2", "parallel.ranks_per_node=1"])]:
        cfg = load_config(None, overrides)
        p = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", 1)
        out[name] = dict(rank=p.rank, tp=p.tp, ep=p.ep, dp=p.dp, edp=p.edp, tp_rank=p.tp_rank,
                         ep_rank=p.ep_rank, dp_rank=p.dp_rank, num_nodes=p.num_nodes,
                         node=p.node, simulated=p.simulated_nodes,
                         mc_ep=ps.get_expert_model_parallel_world_size(),
                         mc_tp=ps.get_tensor_model_parallel_world_size(),
                         mc_dp=ps.get_data_parallel_world_size())
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


def test_parallel_state_two_ranks():
    # backend=None: init_parallel starts the process group from the environment, as under torchrun.
    ranks = run_ranks(_layouts, 2, backend=None)
    for i, out in enumerate(ranks):
        ep2, tp2, sim = out["ep2"], out["tp2"], out["ep2_sim_nodes"]
        assert ep2["rank"] == i
        # EP=2 on 2 ranks: experts split, dense weights data-parallel over both.
        assert (ep2["ep"], ep2["dp"], ep2["edp"], ep2["ep_rank"], ep2["dp_rank"]) == (2, 2, 1, i, i)
        assert (ep2["mc_ep"], ep2["mc_dp"]) == (2, 2)
        # TP=2: one data-parallel replica; both ranks read the same data.
        assert (tp2["tp"], tp2["dp"], tp2["tp_rank"], tp2["dp_rank"], tp2["mc_tp"]) == (2, 1, i, 0, 2)
        # Real topology: LOCAL_WORLD_SIZE=2 (as torchrun sets it) -> one node.
        assert (ep2["num_nodes"], ep2["node"], ep2["simulated"]) == (1, 0, False)
        # Simulated: one rank per node -> two nodes.
        assert (sim["num_nodes"], sim["node"], sim["simulated"]) == (2, i, True)
