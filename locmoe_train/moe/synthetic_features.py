"""Synthetic hidden states for checking routing statistics: isotropic, or clustered on the experts.

Legend: T tokens, D hidden size, E experts, B = D / E channels per expert block.

Owns one generator used by the capacity tests and ``scripts/capacity_statistics.py``:
token t belongs to a uniformly drawn expert z_t and is

    x_t = (tightness / sqrt(D)) * c_{z_t} + n_t,    n_t ~ N(0, I_D / D),

with c_i the unit vector spread evenly over expert i's channel block (the
direction of its GrAP gate). ``tightness`` is the cluster's signal-to-noise
ratio along the gate, in units of the noise's standard deviation: 0 is
isotropic, and the GrAP affinity of a token to its own expert is about
tightness / sqrt(D + tightness^2) against noise of about 1 / sqrt(D), so the
statistics see the same picture at any D. The same generator state gives the
same z and n for every tightness: a sweep over tightness changes nothing else.

Does not own the affinity (``moe/routers/locmoe_plus.grap_affinity``) or any statistic.
"""

from __future__ import annotations

import math

import torch


def clustered_features(g: torch.Generator, T: int, E: int, D: int, tightness: float
                       ) -> torch.Tensor:
    """[T, D] float32 tokens clustered around the experts' block directions (0: isotropic)."""
    if D % E:
        raise ValueError(f"D={D} must be divisible by E={E}: one channel block per expert")
    z_T = torch.randint(0, E, (T,), generator=g)
    n_TD = torch.randn(T, D, generator=g) / math.sqrt(D)
    block = D // E
    c_ED = torch.zeros(E, D)
    for i in range(E):
        c_ED[i, i * block:(i + 1) * block] = 1 / math.sqrt(block)
    return (tightness / math.sqrt(D)) * c_ED[z_T] + n_TD
