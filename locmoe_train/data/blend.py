"""Weighted blends of prepared datasets (``data.blend``).

A blend draws each global sample position from one of K prepared
directories. The sources are apportioned by Tijdeman's rule (R. Tijdeman,
"The chairman assignment problem", Discrete Mathematics 32, 1980): with
``d = 1 - 1/(2K - 2)`` and ``n_k`` the samples source k has given before
position ``t`` (1-based), the sources that may take ``t`` are those with
``w_k * t - n_k >= 1 - d``, and among them ``t`` goes to the one whose next
deadline ``(n_k + d) / w_k`` is earliest (ties to the lower index). The
theorem: after every number of samples ``t``, every source's count is within
``d`` of ``w_k * t`` -- 1/2 for two sources, 3/4 for three, below one sample
for any K. The rule runs in exact integer arithmetic on the weights as
stored (normalised floats, renormalised exactly), so float rounding cannot
break the bound or make two machines disagree. It runs step by step from
counters kept in the loader state, so no index over the whole run is built
or cached.

The greedy rule megatron-core's ``BlendedDataset`` uses (the source with the
largest deficit ``w_k * t - n_k``) was used here before; from 5 sources on it
does not keep every source within one sample (weights 1:1:9:26:39 leave the
fourth 1.03 samples behind after 41 samples; random 7-part blends reach 1.2). A
checkpoint written under it resumes with its counts, which are still valid;
the samples after the resume are the new rule's, so they differ from what the
old version would have drawn.

Inside a source the order is the single-dataset loader's: the j-th sample
source k gives is window ``perm_{k,e}[j % N_k]`` with ``e = j // N_k`` and
the permutation seeded by ``(seed, k, e)``. Every rank computes the same
global assignment for a step and takes its contiguous block of positions, as
``StepLoader`` does; the state is global (position and per-source counters),
so a resume may change the data-parallel size or the global batch size.

Why not megatron-core's ``BlendedMegatronDatasetBuilder``: it builds its
``GPTDataset`` sample indices for a fixed number of samples up front and
caches them on disk, with its own windowing over documents. Our guarantees
(order a function of the seed and the global position, a one-counter
resumable state, windows that match ``data.path`` runs exactly) would have
to be rebuilt on top of it, and its greedy blending rule has no bound below one
sample (above).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from locmoe_train.data.dataset import StepLoader, _check_dp, _check_positive_int
from locmoe_train.data.layout import check_batch_layout
from locmoe_train.errors import UserError


# Recorded in the loader state; checkpoints without it used the greedy rule.
BLEND_RULE = "tijdeman"


def source_name(src) -> str:
    return src.name or os.path.basename(os.path.normpath(src.path))


def check_blend_config(blend: Sequence) -> None:
    """Config-time checks of ``data.blend`` (no file access)."""
    if not blend:
        raise UserError("data.blend is empty: list at least one {path: DIR, weight: W}, or "
                        "remove data.blend and set data.path.")
    names = []
    for i, src in enumerate(blend):
        if not src.path:
            raise UserError(f"data.blend[{i}] has no path: give the directory written by "
                            f"`locmoe-train prepare-data`.")
        if not (math.isfinite(src.weight) and src.weight > 0):
            raise UserError(f"data.blend[{i}].weight={src.weight} must be a finite number > 0 "
                            f"(weights are normalised to sum to 1).")
        names.append(source_name(src))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"data.blend has two parts named {dupes[0]!r}: give them distinct "
                        f"names with data.blend[i].name.")


def data_paths(data_cfg) -> List[str]:
    """The prepared directories a run reads: the blend's, or data.path."""
    return [s.path for s in data_cfg.blend] if data_cfg.blend else [data_cfg.path]


def _tokenizer_identity(data_dir: str, meta: dict) -> tuple:
    from locmoe_train.data.prepare import resolve_tokenizer_path

    path = resolve_tokenizer_path(data_dir, meta)
    digest = None
    if os.path.isfile(path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    else:  # a tokenizer directory (hf): its resolved location identifies it
        digest = os.path.realpath(path)
    return (meta["tokenizer"]["kind"], int(meta["vocab_size"]), int(meta["eod_id"]), digest)


def data_meta(data_cfg) -> dict:
    """``meta.json`` of the run's data (validated). For a blend, every part's tokenizer
    must be the same file, with the same vocabulary and EOD id; the first part's meta is
    returned, since these are what the model depends on."""
    from locmoe_train.data.prepare import load_meta

    if not data_cfg.blend:
        return load_meta(data_cfg.path)
    first, first_id = None, None
    for src in data_cfg.blend:
        meta = load_meta(src.path)
        ident = _tokenizer_identity(src.path, meta)
        if first is None:
            first, first_id, first_path = meta, ident, src.path
        elif ident != first_id:
            what = ("tokenizer kind" if ident[0] != first_id[0] else
                    "vocabulary size" if ident[1] != first_id[1] else
                    "EOD id" if ident[2] != first_id[2] else "tokenizer model")
            raise UserError(
                f"data.blend mixes tokenizers: {first_path!r} and {src.path!r} differ in "
                f"{what}; prepare every part with the same tokenizer (prepare-data "
                f"--tokenizer-path {os.path.join(first_path, 'tokenizer.model')} ...).")
    return first


@dataclass
class BlendPart:
    name: str
    path: str
    weight: float  # normalised
    train: Any  # TokenWindows
    valid: Any


def open_blend(data_cfg) -> List[BlendPart]:
    from locmoe_train.data.dataset import TokenWindows

    total = sum(s.weight for s in data_cfg.blend)
    return [BlendPart(source_name(s), s.path, s.weight / total,
                      TokenWindows(os.path.join(s.path, "train"), data_cfg.seq_len),
                      TokenWindows(os.path.join(s.path, "valid"), data_cfg.seq_len))
            for s in data_cfg.blend]


def _integer_weights(weights: np.ndarray) -> List[int]:
    """Integers ``a_k`` with ``a_k / sum(a)`` exactly the float weights renormalised."""
    fracs = [Fraction(float(w)) for w in weights]
    scale = max(f.denominator for f in fracs)  # powers of two: the largest is a multiple
    return [int(f * scale) for f in fracs]


def assign_sources(weights: np.ndarray, counts: np.ndarray, start: int, count: int) -> np.ndarray:
    """Sources of global positions ``[start, start + count)``, given the per-source counts
    ``counts`` of the positions before ``start`` (updated in place); Tijdeman's rule."""
    K = len(weights)
    out = np.zeros(count, dtype=np.int64)
    if K == 1:
        counts[0] += count
        return out
    a = _integer_weights(weights)
    D = sum(a)
    n = [int(c) for c in counts]  # Python ints: the products below overflow int64
    m = 2 * K - 2  # d = (m - 1) / m
    for i in range(count):
        t = start + i + 1
        best, best_num = -1, 0
        for k in range(K):
            # May take t: a_k t / D - n_k >= 1 / m. Deadline (n_k + d) / w_k, compared as
            # (m n_k + m - 1) / a_k by cross-multiplying.
            if m * (a[k] * t - n[k] * D) >= D:
                num = m * n[k] + m - 1
                if best < 0 or num * a[best] < best_num * a[k]:
                    best, best_num = k, num
        # Some source may always take t: the slacks a_k t / D - n_k sum to 1, so the
        # largest is >= 1/K >= 1/m.
        assert best >= 0, (weights, counts, t)
        out[i] = best
        n[best] += 1
    counts[:] = n
    return out


class BlendLoader:
    """``StepLoader``'s interface over a weighted blend of training splits."""

    def __init__(self, parts: List[BlendPart], global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True) -> None:
        _check_positive_int("train.global_batch_size", global_batch_size)
        _check_positive_int("train.micro_batch_size", micro_batch_size)
        _check_dp(dp_rank, dp_size)
        check_batch_layout(global_batch_size, micro_batch_size, dp_size)
        self.parts = parts
        self.names = [p.name for p in parts]
        self.weights = np.array([p.weight for p in parts], dtype=np.float64)
        # One single-dataset loader per source: its permutations, seeded by (seed, k).
        self._orders = [StepLoader(p.train, global_batch_size, micro_batch_size, 0, 1,
                                   seed * 1_000_003 + k, shuffle) for k, p in enumerate(parts)]
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.consumed_samples = 0
        self.consumed_per_source = np.zeros(len(parts), dtype=np.int64)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def next_step(self) -> List[torch.Tensor]:
        G = self.global_batch_size
        before = self.consumed_per_source.copy()
        counts = before.copy()
        sources = assign_sources(self.weights, counts, self.consumed_samples, G)
        # The j-th sample of source k in the whole stream: its counter plus its rank
        # among this step's samples of k.
        within = np.empty(G, dtype=np.int64)
        for k in range(len(self.parts)):
            mask = sources == k
            within[mask] = before[k] + np.arange(int(mask.sum()))
        per_rank = G // self.dp_size
        lo = self.dp_rank * per_rank
        rows = []
        for k, j in zip(sources[lo:lo + per_rank], within[lo:lo + per_rank]):
            (index,) = self._orders[k].global_indices(int(j), 1)
            rows.append(self.parts[k].train[int(index)])
        self.consumed_samples += G
        self.consumed_per_source = counts
        mbs = self.micro_batch_size
        return [torch.from_numpy(np.stack(rows[i:i + mbs])) for i in range(0, per_rank, mbs)]

    def samples_per_source(self) -> Dict[str, int]:
        return {n: int(c) for n, c in zip(self.names, self.consumed_per_source)}

    def log_record(self, acc, n_steps: int) -> dict:
        """Training record field: samples drawn from each source so far (all ranks)."""
        return {"data_samples": self.samples_per_source()}

    def state_dict(self) -> Dict[str, Any]:
        return {"consumed_samples": int(self.consumed_samples), "seed": self.seed,
                "global_batch_size": self.global_batch_size,
                "blend": {"names": list(self.names), "rule": BLEND_RULE,
                          "weights": [float(w) for w in self.weights],
                          "consumed": [int(c) for c in self.consumed_per_source]}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        blend = state.get("blend") if isinstance(state, dict) else None
        if blend is None:
            raise UserError(
                "the checkpoint was trained on one dataset (data.path) but this run sets "
                "data.blend; resume with the same data.path, or start a fresh run for the blend.")
        names, weights = list(blend["names"]), [float(w) for w in blend["weights"]]
        if names != self.names or not np.allclose(weights, self.weights, rtol=0, atol=1e-12):
            saved = ", ".join(f"{n}={w:.4g}" for n, w in zip(names, weights))
            now = ", ".join(f"{n}={w:.4g}" for n, w in zip(self.names, self.weights))
            raise UserError(
                f"the checkpoint's data.blend is [{saved}] but this run's is [{now}]; resume "
                f"with the same blend (names and weights), or start a fresh run.")
        if int(state["seed"]) != self.seed:
            raise UserError(
                f"the checkpoint's data seed is {state['seed']} but train.seed is {self.seed}; "
                f"resume with train.seed={state['seed']} (a different seed changes the sample "
                "order) or start a fresh run")
        consumed = np.array([int(c) for c in blend["consumed"]], dtype=np.int64)
        if int(consumed.sum()) != int(state["consumed_samples"]):
            raise UserError("the checkpoint's data-loader state is inconsistent (per-source "
                            "counts do not add up); the checkpoint is damaged")
        if blend.get("rule") != BLEND_RULE and self.dp_rank == 0:
            print(f"note: the checkpoint's blend was drawn by the greedy rule of earlier "
                  f"versions; its {int(consumed.sum())} samples so far stand, and from here on "
                  f"Tijdeman's rule picks the sources (see locmoe_train/data/blend.py), so the "
                  f"samples that follow differ from those the earlier version would draw.",
                  file=sys.stderr, flush=True)
        self.consumed_samples = int(state["consumed_samples"])
        self.consumed_per_source = consumed
