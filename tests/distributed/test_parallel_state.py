"""Parallel state at 2 ranks: megatron groups, our context, real and simulated nodes."""

import json

from helpers import run_script

WORKER = '''
import json, os, warnings
warnings.filterwarnings("ignore")
from locmoe_train.config import load_config
from locmoe_train.parallel.state import init_parallel, destroy_parallel
from megatron.core import parallel_state as ps
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
with open(os.environ["OUT_DIR"] + f"/rank{out['ep2']['rank']}.json", "w") as f:
    json.dump(out, f)
'''


def test_parallel_state_two_ranks(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setenv("OUT_DIR", str(tmp_path))
    r = run_script(str(script), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i, out in enumerate(ranks):
        ep2, tp2, sim = out["ep2"], out["tp2"], out["ep2_sim_nodes"]
        # EP=2 on 2 ranks: experts split, dense weights data-parallel over both.
        assert (ep2["ep"], ep2["dp"], ep2["edp"], ep2["ep_rank"], ep2["dp_rank"]) == (2, 2, 1, i, i)
        assert (ep2["mc_ep"], ep2["mc_dp"]) == (2, 2)
        # TP=2: one data-parallel replica; both ranks read the same data.
        assert (tp2["tp"], tp2["dp"], tp2["tp_rank"], tp2["dp_rank"], tp2["mc_tp"]) == (2, 1, i, 0, 2)
        # Real topology: torchrun's LOCAL_WORLD_SIZE=2 -> one node.
        assert (ep2["num_nodes"], ep2["node"], ep2["simulated"]) == (1, 0, False)
        # Simulated: one rank per node -> two nodes.
        assert (sim["num_nodes"], sim["node"], sim["simulated"]) == (2, i, True)
