"""Ada-K's dynamic k under EP=2 (gloo) equals one rank: outputs, chosen k and gradients.

Both the forced k pattern (1..E over the tokens) and k sampled from the
allocator with per-shard seeded generators; see adak_worker.py.
"""

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_script

WORKER = os.path.join(os.path.dirname(__file__), "adak_worker.py")
SCENARIOS = ["forced", "sampled"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    par, ref = tmp_path_factory.mktemp("par"), tmp_path_factory.mktemp("ref")
    r = run_script(WORKER, 2, [str(par), ",".join(SCENARIOS)])
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, SHARDS="2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, WORKER, str(ref), ",".join(SCENARIOS)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return par, ref


@pytest.mark.parametrize("name", SCENARIOS)
def test_adak_ep2_matches_single_rank(results, name):
    par, ref = (torch.load(os.path.join(d, f"{name}.pt")) for d in results)
    for a, b in zip(par["k"], ref["k"]):
        assert torch.equal(a, b)
    k = torch.cat(ref["k"])
    assert set(k.tolist()) == {1, 2, 3, 4}  # every count from 1 to E occurs
    for a, b in zip(par["out"], ref["out"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(par["dx"], ref["dx"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("alloc", "router", "w13", "w2"):
        torch.testing.assert_close(par[key], ref[key], rtol=1e-5, atol=1e-6)
    assert par["alloc"].abs().sum() > 0
    # Dropless: the experts together took exactly sum(k) tokens.
    assert torch.equal(par["counts"], ref["counts"]) and int(ref["counts"].sum()) == int(k.sum())
