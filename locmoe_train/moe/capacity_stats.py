"""The statistics the LocMoE+ capacity controller re-estimates C from (docs/locmoe_plus.md).

Legend: T tokens on this rank, E experts, K experts per token (top_k), s = seq_len.

Owns ``measure(name, ...)``: from one micro-batch's affinities and token
choices, an estimate of the capacity per sequence of ``s`` tokens that the
statistic ``moe.capacity.statistic`` asks for (``inf``: no cut), reduced over a
process group so that every rank gets the same number; also the diagnostics
(q, delta_0, LocMoE's C_min bound) and the isotropic references the
statistics are calibrated against. Candidates of expert i are the tokens whose
token choice (top-K) includes i, as token choice then expert choice defines
them; its insiders are the tokens whose first choice is i (METHOD's ins_i). A
token's *runner-up* score is its best affinity among the experts it did not
choose: the score it brings to an expert it does not belong to.

* ``outsider_q``: METHOD.md's q (outsiders of i at or above the median
  top-1 insider), C = 2 s max q. Kept for comparison: it cuts on isotropic features.
* ``best_insider_q``: the theorem's C = 2 s q, with q = the fraction of runner-up
  scores at or above expert i's best insiders (their upper quartile),
  normalised by its isotropic value so that isotropic features give q = 1/2;
  the count is taken at its upper confidence bound, so a cut needs evidence.
* ``tail_quantile``: the same, against the 10% tail of the insiders expert
  choice keeps at the current C (a lower threshold: more counts, later cuts).
* ``score_budget``: the smallest C whose best candidates hold a fraction of the
  positive affinity mass all tokens put on the expert; that fraction sits
  ``rho`` of the way from its isotropic value to 1.

Does not own C, its rounding or its schedule (``capacity.py``), nor when a
re-estimation happens. Quantiles do not all-reduce: as for METHOD's median,
the group agrees on the count-weighted mean of the per-rank quantiles, then
counts exactly against it (exact on one rank, or when the ranks' quantiles agree).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Fraction of the top-1 affinities below delta_0 (METHOD: the 5th percentile).
DELTA0_QUANTILE = 0.05
# best_insider_q: an expert's best insiders start at this quantile of its insiders.
BEST_INSIDER_QUANTILE = 0.75
# tail_quantile: the threshold is this quantile of the kept set (its weak tail).
TAIL_QUANTILE = 0.1
# A cut needs evidence: counts enter the q statistics as this upper bound (about the
# one-sided 95% Poisson bound: 3 for 0, 9.5 for 4, 36 for 25), so that few tokens cannot
# fake a small q.
def count_upper_bound(k: float) -> float:
    return (math.sqrt(k + 1) + 1) ** 2 - 1


# c_min_lower_bound's ceiling (past delta_0 ~ 0.1 at d = 4096 the bound overflows).
C_MIN_CAP = 1e12


@dataclass
class Measurement:
    """One re-estimation's result, identical on every rank of the group."""
    estimate: float  # capacity per sequence the statistic asks for; inf: no cut
    q: float  # the statistic's q (max over experts); NaN for score_budget
    delta0: float


def c_min_lower_bound(delta0: float, hidden_size: int, num_experts: int) -> float:
    """LocMoE's capacity bound ``C_min >= 1 / (n p)``, a diagnostic, never used as C.

    ``p`` is the fraction of the unit sphere in ``d`` dimensions with
    ``|cos| >= delta0`` to a fixed direction, approximated by
    ``erfc(sqrt(delta0^2 d / (2 - delta0^2)))``. ``delta0 <= 0`` gives ``p = 1``
    (``1/n``); the result is capped at ``C_MIN_CAP`` (1e12), which it reaches
    around ``delta0 = 0.11`` at d = 4096, n = 8.
    """
    if delta0 <= 0:
        p = 1.0
    else:
        d2 = min(delta0, 1.0) ** 2  # a cosine; the clamp keeps 2 - d2 >= 1
        p = math.erfc(math.sqrt(d2 * hidden_size / (2.0 - d2)))
    if p <= 1.0 / (num_experts * C_MIN_CAP):
        return C_MIN_CAP
    return 1.0 / (num_experts * p)


# ---- isotropic references -------------------------------------------------------------
# On isotropic features a token's E affinities are (nearly) i.i.d. centred Gaussians of one
# scale; every statistic below is scale-free, so its isotropic value depends on (E, K) only.


def _order_cdf(x: float, r: int, E: int) -> float:
    """P(the r-th largest of E i.i.d. N(0, 1) is <= x): fewer than r of them exceed x."""
    p = 0.5 * math.erfc(x / math.sqrt(2.0))
    return sum(math.comb(E, j) * p ** j * (1 - p) ** (E - j) for j in range(r))


def _top1_quantile(u: float, E: int) -> float:
    """Quantile u of an insider's score: the largest of E."""
    lo, hi = -12.0, 12.0
    for _ in range(80):  # bisection to ~1e-23: the CDF is monotone
        mid = 0.5 * (lo + hi)
        if _order_cdf(mid, 1, E) < u:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=4096)
def isotropic_q(u: float, K: int, E: int) -> float:
    """Isotropic fraction of runner-up scores (the (K+1)-th largest of E) at or above
    quantile u of the insiders' scores (the largest of E)."""
    if K >= E:
        return 0.0  # no expert is left out: there is no runner-up
    return 1.0 - _order_cdf(_top1_quantile(u, E), K + 1, E)


@functools.lru_cache(maxsize=64)
def isotropic_share(K: int, E: int, n: int = 4000, top: float = 12.0) -> float:
    """Isotropic share of an expert's positive affinity mass held by its candidates.

    ``sum_r E[max(Z_(r), 0)] / (E * E[max(Z, 0)])``, with ``E[max(Z_(r), 0)]`` the
    integral of the survival function over [0, top] (midpoint rule).
    """
    dx = top / n
    held = sum((1.0 - _order_cdf((k + 0.5) * dx, r, E)) * dx
               for r in range(1, min(K, E) + 1) for k in range(n))
    return held / (E / math.sqrt(2.0 * math.pi))


# ---- reductions -----------------------------------------------------------------------


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _sum(buf: torch.Tensor, group) -> torch.Tensor:
    if _distributed(group):
        dist.all_reduce(buf, group=group)
    return buf


def _sorted_quantile(sorted_x: torch.Tensor, n: torch.Tensor, frac) -> torch.Tensor:
    """Quantile ``frac`` (a float or one per column) of each column's first ``n`` sorted entries.

    ``sorted_x`` is [T, E] sorted along dim 0 with the wanted values first (linear
    interpolation); columns with ``n = 0`` give 0. ``frac = 0.5`` is the usual median.
    """
    if sorted_x.shape[0] == 0:
        return torch.zeros(sorted_x.shape[1:], dtype=sorted_x.dtype, device=sorted_x.device)
    pos = (n.clamp(min=1) - 1).to(torch.float64) * frac
    lo = pos.floor().long()
    hi = pos.ceil().long()
    w = pos - lo
    x_lo = sorted_x.gather(0, lo[None]).squeeze(0)
    x_hi = sorted_x.gather(0, hi[None]).squeeze(0)
    out = x_lo + (x_hi - x_lo) * w
    return torch.where(n > 0, out, torch.zeros_like(out))


def _agreed(local_E: torch.Tensor, n_E: torch.Tensor, extra: torch.Tensor, group):
    """Count-weighted mean over the group of per-rank values, with ``extra`` summed alongside."""
    n_E = n_E.to(torch.float64)
    E = n_E.numel()
    buf = _sum(torch.cat([n_E * local_E, n_E, extra]), group)
    n_all = buf[E:2 * E]
    mean = torch.where(n_all > 0, buf[:E] / n_all.clamp(min=1), torch.zeros_like(n_all))
    return mean, n_all, buf[2 * E:]


def delta0(affinity_TE: torch.Tensor, top1_T: torch.Tensor, group=None) -> float:
    """The 5th percentile of the top-1 affinities (count-weighted mean over the group)."""
    T = affinity_TE.shape[0]
    dev = affinity_TE.device
    if T:
        top1_T1 = affinity_TE.gather(1, top1_T.long()[:, None]).sort(dim=0).values
        local = _sorted_quantile(top1_T1, torch.tensor([T], device=dev), DELTA0_QUANTILE)
    else:
        local = torch.zeros(1, dtype=torch.float64, device=dev)
    mean, _, _ = _agreed(local, torch.tensor([T], device=dev), local[:0], group)
    return float(mean[0])


def _as_TK(choice: torch.Tensor) -> torch.Tensor:
    """Top-1 ids [T] or top-K ids [T, K] (best first) as [T, K] int64."""
    return (choice if choice.dim() == 2 else choice[:, None]).long()


def candidates(choice: torch.Tensor, E: int) -> torch.Tensor:
    """[T, E] token-choice map from top-1 ids [T] or top-K ids [T, K] (best first)."""
    choice_TK = _as_TK(choice)
    out_TE = torch.zeros(choice_TK.shape[0], E, dtype=torch.bool, device=choice.device)
    return out_TE.scatter_(1, choice_TK, True)


# ---- the statistics -------------------------------------------------------------------


def estimate_q(affinity_TE: torch.Tensor, top1_T: torch.Tensor, group=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """METHOD.md's out-ranking rate per expert, ``(q_E, m_E)`` in float64 (``outsider_q``).

    ``ins_i`` = tokens whose top-1 expert is i, ``m_i`` = median of
    ``affinity[t, i]`` over ``ins_i``, ``q_i`` = fraction of the tokens outside
    ``ins_i`` with ``affinity[t, i] >= m_i``. Over several ranks ``m_i`` is the mean
    of the per-rank medians weighted by their ins counts, and ``q_i`` is exact for
    it. Experts with no ins token anywhere (or no outsider) get ``q_i = 0``.
    """
    aff_TE = affinity_TE.detach().to(torch.float64)
    T, E = aff_TE.shape
    ins_TE = candidates(top1_T.to(aff_TE.device), E)
    n_ins_E = ins_TE.sum(0)
    # Non-members sort to the end, so each column's first n_ins entries are its ins values.
    sorted_TE = aff_TE.masked_fill(~ins_TE, math.inf).sort(dim=0).values
    m_E = _sorted_quantile(sorted_TE, n_ins_E, 0.5)
    m_E, n_ins_E, _ = _agreed(m_E, n_ins_E, m_E[:0], group)
    ge_E = ((aff_TE >= m_E[None, :]) & ~ins_TE).sum(0).to(torch.float64)
    buf = _sum(torch.cat([ge_E, (T - ins_TE.sum(0)).to(torch.float64)]), group)
    ge_E, out_E = buf[:E], buf[E:]
    q_E = torch.where((n_ins_E > 0) & (out_E > 0), ge_E / out_E.clamp(min=1),
                      torch.zeros_like(ge_E))
    return q_E, m_E


def _outsider_q(aff_TE, cand_TE, choice, local_capacity, seq_len, rho, group) -> tuple:
    q_E, _ = estimate_q(aff_TE, _as_TK(choice)[:, 0], group)
    q = float(q_E.max()) if q_E.numel() else 0.0
    return 2 * seq_len * q, q


def _runner_up_q(aff_TE, cand_TE, ins_TE, u_E, K: int, seq_len: int, group) -> tuple:
    """C = 2 s q, q = 1/2 (runner-ups at or above quantile u_E of i's insiders) / isotropic."""
    T, E = aff_TE.shape
    n_E = ins_TE.sum(0)
    sorted_TE = aff_TE.masked_fill(~ins_TE, math.inf).sort(dim=0).values
    h_E = _sorted_quantile(sorted_TE, n_E, u_E)
    h_E, n_all, _ = _agreed(h_E, n_E, h_E[:0], group)
    runner_T = aff_TE.masked_fill(cand_TE, -math.inf).max(dim=1).values if T else aff_TE[:, 0]
    ge_E = (runner_T[:, None] >= h_E[None, :]).sum(0).to(torch.float64)
    buf = _sum(torch.cat([ge_E, torch.tensor([float(T)], dtype=torch.float64,
                                                 device=aff_TE.device)]), group)
    counts, present, us = buf.tolist(), (n_all > 0).tolist(), u_E.tolist()  # one sync each
    refs = [isotropic_q(u, K, E) for u in us]
    ratios = [count_upper_bound(counts[i]) / counts[E] / refs[i]
              for i in range(E) if present[i] and refs[i] > 0]
    if not ratios:
        return math.inf, math.nan  # nothing measured: no reason to cut
    q = 0.5 * max(ratios)
    return 2 * seq_len * q, q


def _insiders(choice: torch.Tensor, E: int) -> torch.Tensor:
    return candidates(_as_TK(choice)[:, 0], E)


def _best_insider_q(aff_TE, cand_TE, choice, local_capacity, seq_len, rho, group) -> tuple:
    u_E = torch.full((aff_TE.shape[1],), BEST_INSIDER_QUANTILE, dtype=torch.float64,
                     device=aff_TE.device)
    ins_TE = _insiders(choice, aff_TE.shape[1])
    return _runner_up_q(aff_TE, cand_TE, ins_TE, u_E, _k_of(choice), seq_len, group)


def _tail_quantile(aff_TE, cand_TE, choice, local_capacity, seq_len, rho, group) -> tuple:
    # Insiders outrank an expert's other candidates, so expert choice keeps the best
    # min(n_i, C) of its n_i insiders first: quantile TAIL of those is quantile
    # 1 - f (1 - TAIL) of the insiders, f = kept / n agreed over the group.
    ins_TE = _insiders(choice, aff_TE.shape[1])
    n_E = ins_TE.sum(0).to(torch.float64)
    kept_E = n_E.clamp(max=local_capacity)
    buf = _sum(torch.cat([kept_E, n_E]), group)
    E = n_E.numel()
    f_E = torch.where(buf[E:] > 0, buf[:E] / buf[E:].clamp(min=1), torch.ones_like(n_E))
    u_E = 1 - f_E * (1 - TAIL_QUANTILE)
    return _runner_up_q(aff_TE, cand_TE, ins_TE, u_E, _k_of(choice), seq_len, group)


def _score_budget(aff_TE, cand_TE, choice, local_capacity, seq_len, rho, group) -> tuple:
    """Smallest C whose best candidates hold ``budget`` of all tokens' positive mass on i."""
    T, E = aff_TE.shape
    budget = isotropic_share(_k_of(choice), E)
    budget += rho * (1 - budget)
    mass_TE = aff_TE.clamp(min=0)
    total_E = mass_TE.sum(0)
    # Candidates best first; the threshold is the score where their running mass reaches
    # this rank's own budget (all of them when it cannot).
    cmass_TE = mass_TE.masked_fill(~cand_TE, 0.0)
    order_TE = aff_TE.masked_fill(~cand_TE, -math.inf).sort(dim=0, descending=True)
    run_TE = cmass_TE.gather(0, order_TE.indices).cumsum(0)
    n_E = cand_TE.sum(0)
    reach_E = (run_TE < budget * total_E[None, :]).sum(0).clamp(max=(n_E - 1).clamp(min=0))
    theta_E = order_TE.values.gather(0, reach_E[None]).squeeze(0) if T else total_E
    theta_E = torch.where(n_E > 0, theta_E, torch.zeros_like(theta_E))  # not -inf * 0
    theta_E, n_all, sums = _agreed(theta_E, n_E, torch.cat([total_E, cmass_TE.sum(0)]), group)
    total_E, held_E = sums[:E], sums[E:]
    kept_E = ((aff_TE >= theta_E[None, :]) & cand_TE).sum(0).to(torch.float64)
    buf = _sum(torch.cat([kept_E, torch.tensor([float(T)], dtype=torch.float64,
                                                   device=aff_TE.device)]), group)
    kept, present = buf.tolist(), (n_all > 0).tolist()
    short = (held_E < budget * total_E).tolist()
    valid = [i for i in range(E) if present[i]]
    if not valid or any(short[i] for i in valid):
        return math.inf, math.nan  # some expert's candidates cannot hold its budget: no cut
    return max(kept[i] for i in valid) * seq_len / kept[E], math.nan


def _k_of(choice: torch.Tensor) -> int:
    return _as_TK(choice).shape[1]


STATISTICS = {"outsider_q": _outsider_q, "best_insider_q": _best_insider_q,
              "tail_quantile": _tail_quantile, "score_budget": _score_budget}


@torch.no_grad()
def measure(name: str, affinity_TE: torch.Tensor, choice: torch.Tensor, *,
            local_capacity: int, seq_len: int, rho: float, group=None) -> Measurement:
    """Statistic ``name`` on one micro-batch: ``affinity_TE`` and the token choices
    ``choice`` (top-1 ids [T] or top-K ids [T, K], best first); ``local_capacity`` is
    the C expert choice applied to these T tokens. Collective over ``group``."""
    aff_TE = affinity_TE.detach().to(torch.float64)
    choice = choice.detach().to(aff_TE.device)
    cand_TE = candidates(choice, aff_TE.shape[1])
    estimate, q = STATISTICS[name](aff_TE, cand_TE, choice, local_capacity, seq_len, rho, group)
    top1_T = _as_TK(choice)[:, 0]
    return Measurement(estimate, q, delta0(aff_TE, top1_T, group))
