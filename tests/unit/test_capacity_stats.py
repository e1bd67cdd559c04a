"""The capacity statistics (moe/capacity_stats.py): synthetic features, references, hand cases.

Legend: T tokens, D hidden size, E experts, K experts per token, s = seq_len.

Features come from ``moe/synthetic_features.py`` through the router's own
``grap_affinity``: tightness 0 is isotropic, larger values tighten E clusters
around the experts' channel blocks (the same tokens at every tightness).
``target`` is what one re-estimation at C = C0 asks for: clip(ceil(estimate),
floor, C0). The table in docs/locmoe_plus.md comes from scripts/capacity_statistics.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from locmoe_train.moe import capacity_stats as stats
from locmoe_train.moe.capacity_stats import (count_upper_bound, estimate_q, isotropic_q,
                                             isotropic_share, measure)
from locmoe_train.moe.routers.locmoe_plus import grap_affinity
from locmoe_train.moe.synthetic_features import clustered_features

S, E, D = 256, 8, 64
NEW = ["best_insider_q", "tail_quantile", "score_budget"]
GRID = [0, 1, 2, 2.5, 3, 3.5, 4, 6, 8, 16, 32, 64]


def c0_floor(K: int) -> tuple[int, int]:
    c0 = math.ceil(1.1 * S * K / E)
    return c0, math.ceil(0.4 * c0)


def affinities(tightness: float, seed: int, T: int, K: int):
    g = torch.Generator().manual_seed(seed)
    aff_TE = grap_affinity(clustered_features(g, T, E, D, tightness), E)
    return aff_TE, aff_TE.topk(K, dim=1).indices


def target(statistic: str, tightness: float, seed: int, K: int = 1, T: int = 4096,
           rho: float = 0.5) -> int:
    c0, floor = c0_floor(K)
    aff_TE, top_TK = affinities(tightness, seed, T, K)
    m = measure(statistic, aff_TE, top_TK, local_capacity=math.ceil(c0 * T / S), seq_len=S,
                rho=rho)
    return c0 if math.isinf(m.estimate) else min(c0, max(floor, math.ceil(m.estimate)))


# ---- isotropic references -------------------------------------------------------------


@pytest.mark.parametrize("K,E_", [(1, 8), (2, 8), (1, 4), (1, 16)])
def test_isotropic_references_match_monte_carlo(K, E_):
    z_TE = torch.randn(200_000, E_, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    top = z_TE.topk(K + 1, dim=1).values
    for u in (0.1, 0.5, 0.75):
        h = top[:, 0].quantile(u)
        assert isotropic_q(u, K, E_) == pytest.approx(float((top[:, K] >= h).double().mean()),
                                                      abs=2e-3)
    share = top[:, :K].clamp(min=0).sum() / z_TE.clamp(min=0).sum()
    assert isotropic_share(K, E_) == pytest.approx(float(share), abs=2e-3)


def test_count_upper_bound():
    # About the one-sided 95% Poisson upper limit (exact: 3.00, 9.15, 34.5).
    assert count_upper_bound(0) == 3.0
    assert 9 < count_upper_bound(4) < 10 and 34 < count_upper_bound(25) < 37


# ---- synthetic features -----------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("statistic", NEW)
def test_isotropic_features_are_not_cut(statistic, K):
    c0, _ = c0_floor(K)
    for seed in range(6):
        for T in (512, 4096):
            assert target(statistic, 0.0, seed, K, T) == c0, (seed, T)


@pytest.mark.parametrize("statistic", NEW)
def test_a_shared_mean_direction_alone_is_not_cut(statistic):
    # Real hidden states share a mean direction that projects unevenly on the experts'
    # blocks: skewed loads and columns of different levels, but nothing clustered.
    c0, _ = c0_floor(1)
    for offset in (1.0, 3.0):
        for T in (512, 4096):
            g = torch.Generator().manual_seed(1)
            mean_D = offset * torch.randn(D, generator=g) / math.sqrt(D)
            aff_TE = grap_affinity(clustered_features(g, T, E, D, 0.0) + mean_D, E)
            m = measure(statistic, aff_TE, aff_TE.argmax(1), seq_len=S, rho=0.5,
                        local_capacity=math.ceil(c0 * T / S))
            assert math.isinf(m.estimate) or m.estimate >= c0, (offset, T, m)


def test_outsider_q_cuts_isotropic_features():
    # METHOD's first statistic, kept selectable for comparison: its insiders are maxima
    # of E scores and its outsiders are not, so isotropic features already look separated.
    c0, floor = c0_floor(1)
    assert all(target("outsider_q", 0.0, seed) <= 0.5 * c0 for seed in range(4))


# (statistic, K, tokens, tightness from which the target is the floor); None: never.
CUTS = [("best_insider_q", 1, 4096, 3.5), ("best_insider_q", 2, 16384, 3.5),
        ("tail_quantile", 1, 512, 6), ("tail_quantile", 1, 4096, 4),
        ("tail_quantile", 2, 4096, 4), ("score_budget", 1, 4096, None),
        ("score_budget", 2, 4096, None)]


@pytest.mark.parametrize("statistic,K,T,floor_from", CUTS)
def test_clustered_features_are_cut_more_as_clusters_tighten(statistic, K, T, floor_from):
    c0, floor = c0_floor(K)
    for seed in range(2):
        caps = [target(statistic, t, seed, K, T) for t in GRID]
        assert all(b <= a for a, b in zip(caps, caps[1:])), caps  # monotone in tightness
        assert caps[0] == c0 and caps[-1] < c0 and min(caps) >= floor, caps
        if floor_from is not None:
            assert caps[GRID.index(floor_from)] == floor, caps
        else:  # the score budget cuts late and shallow: see docs/locmoe_plus.md
            assert caps[GRID.index(6)] == c0 and caps[-1] <= 0.85 * c0, caps


def test_a_cut_needs_enough_tokens():
    # best_insider_q's isotropic count at the upper quartile is small (3% of tokens at
    # E = 8), so a micro-batch of 512 tokens cannot show q small enough for a cut.
    assert target("best_insider_q", 64, seed=0, T=512) == c0_floor(1)[0]
    assert target("best_insider_q", 64, seed=0, T=4096) == c0_floor(1)[1]


# ---- against plain per-definition code on one process ------------------------------------


def _reference(statistic, aff_TE, top_TK, local_capacity, rho):
    aff_TE = aff_TE.double()
    T, n_exp = aff_TE.shape
    K = top_TK.shape[1]
    chosen = [set(row.tolist()) for row in top_TK]
    runner = [max(float(aff_TE[t, j]) for j in range(n_exp) if j not in chosen[t])
              for t in range(T)]
    if statistic == "score_budget":
        share = isotropic_share(K, n_exp)
        budget, needs = share + rho * (1 - share), []
        for i in range(n_exp):
            cand = sorted((float(aff_TE[t, i]) for t in range(T) if i in chosen[t]), reverse=True)
            total = sum(max(float(a), 0.0) for a in aff_TE[:, i])
            if not cand:
                continue
            run, k = 0.0, None
            for j, a in enumerate(cand):
                run += max(a, 0.0)
                if run >= budget * total:
                    k = j + 1
                    break
            needs.append(math.inf if k is None else k * S / T)
        return max(needs)
    ratios = []
    for i in range(n_exp):
        ins = torch.tensor([float(aff_TE[t, i]) for t in range(T) if int(top_TK[t, 0]) == i],
                           dtype=torch.float64)
        if not len(ins):
            continue
        if statistic == "best_insider_q":
            u = stats.BEST_INSIDER_QUANTILE
        else:
            u = 1 - min(len(ins), local_capacity) / len(ins) * (1 - stats.TAIL_QUANTILE)
        h = float(ins.quantile(u))
        count = sum(r >= h for r in runner)
        ratios.append(count_upper_bound(count) / T / isotropic_q(u, K, n_exp))
    return S * max(ratios)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("statistic", NEW)
def test_statistics_match_plain_definitions(statistic, K):
    for tightness, local_capacity in [(3.0, 9), (8.0, 4), (0.0, 40)]:
        aff_TE, top_TK = affinities(tightness, seed=5, T=96, K=K)
        got = measure(statistic, aff_TE, top_TK, local_capacity=local_capacity, seq_len=S,
                      rho=0.3).estimate
        want = _reference(statistic, aff_TE, top_TK, local_capacity, rho=0.3)
        assert got == pytest.approx(want, rel=1e-9) or got == want == math.inf


# ---- METHOD's q and delta_0 by hand ---------------------------------------------------


def test_estimate_q_hand_case():
    # Expert 0 is chosen by tokens 0-3, expert 1 by tokens 4-6, expert 2 by nobody.
    a_TE = torch.tensor([[0.875, 0.5, -0.5], [0.5, 0.25, -0.5], [0.75, 0.125, -0.5],
                         [0.625, 0.0, -0.5], [0.6875, 0.75, -0.5], [0.25, 0.375, -0.5],
                         [0.125, 0.5, -0.5]])
    top1_T = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    q_E, m_E = estimate_q(a_TE, top1_T)
    assert q_E.dtype == torch.float64 and m_E.dtype == torch.float64
    # Expert 0: median of {0.5, 0.625, 0.75, 0.875} = 0.6875; outsiders 0.6875 (a tie
    # counts), 0.25, 0.125 -> 1/3. Expert 1: median of {0.75, 0.375, 0.5} = 0.5;
    # outsiders 0.5 (tie), 0.25, 0.125, 0.0 -> 1/4. Expert 2: no ins tokens -> 0.
    assert m_E.tolist() == [0.6875, 0.5, 0.0]
    assert q_E.tolist() == [1 / 3, 1 / 4, 0.0]
    m = measure("outsider_q", a_TE, top1_T, local_capacity=4, seq_len=10, rho=0.5)
    assert m.q == 1 / 3 and m.estimate == pytest.approx(2 * 10 / 3)


def test_estimate_q_degenerate_cases():
    a_TE = torch.rand(5, 3)
    q_E, m_E = estimate_q(a_TE, torch.zeros(5, dtype=torch.long))  # everyone chose expert 0
    assert q_E.tolist() == [0.0, 0.0, 0.0]  # no outsiders / no ins tokens
    assert m_E[0] == a_TE[:, 0].double().median()
    q_E, m_E = estimate_q(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert q_E.tolist() == [0.0] * 3 and m_E.tolist() == [0.0] * 3
    for statistic in NEW:  # no tokens: nothing measured, no cut
        m = measure(statistic, torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long),
                    local_capacity=1, seq_len=8, rho=0.5)
        assert math.isinf(m.estimate)


def test_delta0_is_the_5th_percentile_of_top1_affinity():
    # Top-1 affinities 0, 0.05, ..., 1.0 (21 tokens): the 5th percentile is 0.05.
    a_TE = torch.stack([torch.arange(21) / 20, torch.full((21,), -1.0)], dim=1).double()
    assert stats.delta0(a_TE, torch.zeros(21, dtype=torch.long)) == pytest.approx(0.05)
