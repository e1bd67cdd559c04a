"""The capacity statistics on synthetic features: the evidence table of docs/locmoe_plus.md.

Legend: T tokens, D hidden size, E experts, K experts per token, s = seq_len.

For each tightness of the clusters (``moe/synthetic_features.py``; 0 is
isotropic) and each ``moe.capacity.statistic``, the capacity target
C_tgt = clip(ceil(estimate), floor, C0) that one re-estimation at C = C0 asks
for, averaged over seeds. Also the literal score budget (the smallest C
keeping rho of the candidates' own positive mass), which is not selectable:
it cuts on isotropic features and cuts less as clusters tighten.

    python scripts/capacity_statistics.py                  # the doc's tables
    python scripts/capacity_statistics.py --experts 16 --hidden 256 --top-k 1
    python scripts/capacity_statistics.py --isotropic      # false cuts on isotropic features
"""

from __future__ import annotations

import argparse
import math

import torch

from locmoe_train.moe.capacity_stats import STATISTICS, measure
from locmoe_train.moe.routers.locmoe_plus import grap_affinity
from locmoe_train.moe.synthetic_features import clustered_features

TIGHTNESS = [0, 1, 2, 2.5, 3, 3.5, 4, 6, 8, 16, 32]
ORDER = ["best_insider_q", "tail_quantile", "score_budget", "outsider_q"]


def literal_score_budget(aff_TE: torch.Tensor, top_TK: torch.Tensor, rho: float,
                         seq_len: int) -> float:
    """Smallest C keeping rho of each expert's candidates' own positive affinity mass."""
    T, E = aff_TE.shape
    cand_TE = torch.zeros_like(aff_TE, dtype=torch.bool).scatter_(1, top_TK, True)
    need = 0
    for i in range(E):
        mass = aff_TE[cand_TE[:, i], i].clamp(min=0).sort(descending=True).values
        if mass.numel():
            need = max(need, int((mass.cumsum(0) < rho * mass.sum()).sum()) + 1)
    return need * seq_len / T


def table(E: int, D: int, K: int, seq_len: int, tokens: int, seeds: int, rho: float,
          factor0: float = 1.1, min_fraction: float = 0.4) -> str:
    c0 = math.ceil(factor0 * seq_len * K / E)
    floor = math.ceil(min_fraction * c0)
    local = math.ceil(c0 * tokens / seq_len)
    names = ORDER + ["score_budget (literal)"]
    assert set(ORDER) == set(STATISTICS)
    lines = [f"E={E}, D={D}, top_k={K}, seq_len={seq_len}, {tokens} tokens, C0={c0}, "
             f"floor={floor}, rho={rho}, mean of {seeds} seeds", "",
             "| tightness | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for tight in TIGHTNESS:
        sums = [0.0] * len(names)
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            aff_TE = grap_affinity(clustered_features(g, tokens, E, D, tight), E)
            top_TK = aff_TE.topk(K, dim=1).indices
            est = [measure(n, aff_TE, top_TK, local_capacity=local, seq_len=seq_len,
                           rho=rho).estimate for n in ORDER]
            est.append(literal_score_budget(aff_TE, top_TK, 0.9, seq_len))
            for j, e in enumerate(est):
                sums[j] += c0 if math.isinf(e) else min(c0, max(floor, math.ceil(e)))
        lines.append(f"| {tight:g} | " + " | ".join(f"{s / seeds:.1f}" for s in sums) + " |")
    return "\n".join(lines)


def isotropic_table(seeds: int, rho: float, seq_len: int) -> str:
    """How many of ``seeds`` isotropic micro-batches each statistic would cut, per (E, K, T)."""
    lines = [f"Isotropic micro-batches with C_tgt < C0, of {seeds} (seq_len={seq_len}, D=16E, "
             f"rho={rho})", "", "| E | top_k | tokens | " + " | ".join(ORDER) + " |",
             "|---" * (len(ORDER) + 3) + "|"]
    for E, K in [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (16, 1), (32, 2)]:
        c0 = math.ceil(1.1 * seq_len * K / E)
        for T in (256, 2048):
            cuts = [0] * len(ORDER)
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                aff_TE = grap_affinity(clustered_features(g, T, E, 16 * E, 0.0), E)
                top_TK = aff_TE.topk(K, dim=1).indices
                for j, n in enumerate(ORDER):
                    est = measure(n, aff_TE, top_TK, local_capacity=math.ceil(c0 * T / seq_len),
                                  seq_len=seq_len, rho=rho).estimate
                    cuts[j] += not math.isinf(est) and math.ceil(est) < c0
            lines.append(f"| {E} | {K} | {T} | " + " | ".join(map(str, cuts)) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--isotropic", action="store_true", help="the false-cut table instead")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.isotropic:
        print(isotropic_table(a.seeds * 5, a.rho, a.seq_len))
        return
    if a.experts is None:
        configs = [(8, 64, 1), (8, 64, 2), (16, 256, 1), (8, 512, 1)]
    else:
        configs = [(a.experts, a.hidden or 8 * a.experts, a.top_k or 1)]
    for E, D, K in configs:
        print(table(E, D, K, a.seq_len, a.tokens, a.seeds, a.rho), end="\n\n")


if __name__ == "__main__":
    main()
