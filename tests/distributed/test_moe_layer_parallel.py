"""Our MoE layer under EP=2, EP=4 and TP=2 (gloo) equals one rank: outputs and gradients.

Covers token dropping (capacity, with and without padding to capacity, for
top-k and LocMoE+),
expert choice, an expert that receives no token and EP ranks that receive
no token. See moe_layer_worker.py for the layout of the comparison.
"""

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_script

WORKER = os.path.join(os.path.dirname(__file__), "moe_layer_worker.py")
TWO_RANK = ["ep", "ep_capacity", "ep_padded", "ep_empty_expert", "ep_empty_rank",
            "ep_expert_choice", "tp", "tp_locmoe_global", "ep_locmoe",
            "tp_locmoe_global_padded", "ep_locmoe_padded"]
FOUR_RANK = ["ep", "ep_capacity", "ep_empty_rank"]


def _reference(out_dir, shards, names):
    env = dict(os.environ, SHARDS=str(shards), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, WORKER, str(out_dir), ",".join(names)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    dirs = {}
    for world, names in [(2, TWO_RANK), (4, FOUR_RANK)]:
        par, ref = tmp_path_factory.mktemp(f"par{world}"), tmp_path_factory.mktemp(f"ref{world}")
        r = run_script(WORKER, world, [str(par), ",".join(names)])
        assert r.returncode == 0, r.stderr[-3000:]
        _reference(ref, world, names)
        dirs[world] = (par, ref)
    return dirs


def _load(d, name):
    return torch.load(os.path.join(d, f"{name}.pt"))


@pytest.mark.parametrize("world, name", [(2, n) for n in TWO_RANK] + [(4, n) for n in FOUR_RANK])
def test_parallel_layer_matches_single_rank(results, world, name):
    par, ref = (_load(d, name) for d in results[world])
    for a, b in zip(par["out"], ref["out"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(par["dx"], ref["dx"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("router", "w13", "w2"):
        torch.testing.assert_close(par[key], ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(par["aux"], ref["aux"], rtol=1e-5, atol=1e-7)
    assert torch.equal(par["counts"], ref["counts"])
    counts = ref["counts"]
    if name == "ep_empty_expert":
        assert counts[-1] == 0 and (counts[:-1] > 0).all()
        assert par["w13"][-1].abs().sum() == 0  # no token, no gradient
    if name == "ep_empty_rank":
        assert (counts[2:] == 0).all()  # the last EP rank(s) own experts nobody chose
    if name in ("ep_capacity", "ep_padded", "tp_locmoe_global", "ep_locmoe"):
        assert counts.sum() < 2 * sum(o.shape[0] * o.shape[1] for o in ref["out"])  # drops happened
