"""Ada-K objectives as pure functions: advantage, PPO-clip loss with the expected-k penalty,
and the warm start's top-p target counts.

Legend: T tokens, E experts (= the choices k in {1..E}; column j is k = j+1),
L MoE layers, G grid points.

States, rewards and their alignment (METHOD.md section 7): the state ``s_l``
of token position t at MoE layer l is that layer's router input at t (the
pre-MLP-normalised hidden state). The reward of position t is
``R_t = log p(token_{t+1} | tokens_{<=t})`` under the rollout (sampled k),
i.e. minus the LM loss at position t, whose label is the next token; ``R*_t``
is the same under the frozen top-K model. The advantage of the decision at
layer l (1-based, L layers) is ``A_{l,t} = gamma^(L-l) (R_t - R*_t)``. The
allocator at position t influences later positions too (through attention),
but, as in Ada-K, only the reward at t is credited to it.

Nothing here communicates; the stage sums over ranks where needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def advantages(reward_T: torch.Tensor, reward_topk_T: torch.Tensor, num_layers: int,
               gamma: float) -> torch.Tensor:
    """``[L, T]``: ``gamma^(L-l) (R - R*)`` for l = 1..L (the last layer is undiscounted)."""
    diff_T = (reward_T - reward_topk_T).float()
    powers_L = torch.tensor([gamma ** (num_layers - l) for l in range(1, num_layers + 1)],
                            dtype=torch.float32, device=diff_T.device)
    return powers_L[:, None] * diff_T[None, :]


def ppo_loss(logp_TE: torch.Tensor, k_T: torch.Tensor, logp_old_T: torch.Tensor,
             adv_T: torch.Tensor, clip: float, k_penalty: float, normalizer: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate plus ``k_penalty * sum_n n P(n)``, summed over tokens / ``normalizer``.

    ``logp_TE``: the current policy's log-probabilities (with grad); ``k_T``:
    the sampled k (1-based); ``logp_old_T``: their log-probability in the
    rollout. Per token: ``-min(r A, clip(r, 1-c, 1+c) A) + lambda E_pi[k]``
    with ``r = pi(k|s) / pi_old(k|s)``. Returns the loss and detached sums
    (not divided) of the surrogate, the penalty and clipped tokens.
    """
    E = logp_TE.shape[-1]
    logp_T = logp_TE.gather(1, (k_T - 1)[:, None]).squeeze(1)
    ratio_T = torch.exp(logp_T - logp_old_T)
    surrogate_T = torch.minimum(ratio_T * adv_T,
                                torch.clamp(ratio_T, 1.0 - clip, 1.0 + clip) * adv_T)
    n_E = torch.arange(1, E + 1, dtype=logp_TE.dtype, device=logp_TE.device)
    expected_k_T = (logp_TE.exp() * n_E).sum(-1)
    loss = (-surrogate_T + k_penalty * expected_k_T).sum() / normalizer
    stats = {"surrogate": surrogate_T.detach().sum(),
             "expected_k": expected_k_T.detach().sum(),
             "clipped": ((ratio_T.detach() - 1.0).abs() > clip).sum().float()}
    return loss, stats


def _sorted_cdf(probs_TE: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(torch.sort(probs_TE.float(), dim=-1, descending=True).values, dim=-1)


def top_p_counts(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Per token, the smallest n whose n largest probabilities sum to >= p (at most E)."""
    E = probs_TE.shape[-1]
    return ((_sorted_cdf(probs_TE) < p).sum(-1) + 1).clamp_max(E)


def top_p_count_sums(probs_TE: torch.Tensor, p_G: torch.Tensor) -> torch.Tensor:
    """``top_p_counts(probs, p).sum()`` for every threshold of ``p_G`` at once, ``[G]``.

    A token's count is 1 plus the number of its first E-1 cumulative sums below
    p (the cap at E is built in), so the sum over tokens is T plus a rank in the
    sorted cumulative sums: O(T E) memory whatever the grid size.
    """
    T, E = probs_TE.shape
    flat = torch.sort(_sorted_cdf(probs_TE)[:, :E - 1].reshape(-1)).values
    return T + torch.searchsorted(flat, p_G.to(flat.dtype).contiguous(), side="left")


def p_grid(points: int = 1025, device=None) -> torch.Tensor:
    """Candidate thresholds p* in [0, 1] for ``pick_p_star``."""
    return torch.linspace(0.0, 1.0, points, device=device)


def pick_p_star(count_sums_G: torch.Tensor, num_tokens: float, grid_G: torch.Tensor,
                target_mean_k: float) -> float:
    """The grid threshold whose mean top-p count is closest to the target (the smallest
    such p on ties). ``count_sums_G``: ``top_p_count_sums(probs, grid)``, summed over ranks."""
    mean_G = count_sums_G.double() / num_tokens
    best = int(torch.argmin((mean_G - target_mean_k).abs()))  # first index among equals
    return float(grid_G[best])


def warm_start_loss(logp_TE: torch.Tensor, target_k_T: torch.Tensor, normalizer: float
                    ) -> torch.Tensor:
    """Cross-entropy of ``pi(k|s)`` to the target count (1-based), summed / ``normalizer``."""
    return F.nll_loss(logp_TE, target_k_T - 1, reduction="sum") / normalizer
