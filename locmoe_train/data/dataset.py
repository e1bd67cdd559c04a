"""Training samples: fixed-length token windows and the deterministic step loader.

This module owns how prepared token data becomes micro-batches:

* ``TokenWindows`` -- a split (``prefix.bin``/``prefix.idx``) seen as one token
  stream, documents back to back separated by EOD; sample ``i`` is the
  ``seq_len + 1`` tokens starting at ``i * seq_len`` (inputs ``[:-1]``,
  labels ``[1:]``), so consecutive windows share one boundary token and no
  token is wasted on padding.
* ``StepLoader`` -- which samples each data-parallel rank trains on at each
  optimizer step. The order is a function of (seed, global sample position)
  only, so it is identical across restarts, data-parallel sizes and
  gradient-accumulation settings; its state is one global counter.
* ``eval_micro_batches`` -- the fixed evaluation subset, split across ranks
  the same way.

Sample layout of one step with ``G`` global samples starting at global
position ``c``: positions ``c .. c+G-1``; position ``p`` is dataset index
``perm_e[p % N]`` with ``e = p // N`` and ``perm_e`` a permutation seeded by
``(seed, e)``. Rank ``r`` of ``D`` takes the contiguous block
``[c + r*G/D, c + (r+1)*G/D)`` and cuts it into micro-batches in order. Hence
a 1-rank run with accumulation sees, micro-batch by micro-batch, exactly the
samples the D ranks see, in rank order -- which is what distributed
equivalence tests compare against.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List

import numpy as np
import torch

from locmoe_train.data.layout import check_batch_layout
from locmoe_train.errors import UserError


def indexed_dataset_module():
    """megatron-core's indexed_dataset module, imported without irrelevant warnings."""
    # The megatron.core package import warns about optional GPU kernels
    # (Transformer Engine / Apex) that reading or writing token files never uses.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class TokenWindows:
    """Overlapping-by-one ``seq_len + 1`` windows over a split's token stream."""

    def __init__(self, prefix: str, seq_len: int) -> None:
        self.prefix = prefix
        self.split_name = os.path.basename(prefix)
        if not isinstance(seq_len, int) or seq_len < 1:
            raise UserError(f"data.seq_len must be a positive integer, got {seq_len!r}")
        self.seq_len = seq_len
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise UserError(
                    f"token file {prefix + ext!r} does not exist; run `locmoe-train "
                    f"prepare-data --output {os.path.dirname(prefix) or '.'}` first"
                )
        # megatron-core parses and checks the index; the documents are stored
        # contiguously in the .bin, so the stream itself is a plain memmap.
        indexed = indexed_dataset_module().IndexedDataset(prefix, mmap=True)
        # Copy out of the index: its arrays are views of a memory map that
        # megatron-core closes when ``indexed`` is garbage-collected.
        lengths = np.array(indexed.sequence_lengths, dtype=np.int64, copy=True)
        self.num_documents = int(len(indexed.document_indices) - 1)
        self.dtype = np.dtype(indexed.index.dtype)
        del indexed
        self.num_tokens = int(lengths.sum())
        expected_bytes = self.num_tokens * self.dtype.itemsize
        actual_bytes = os.path.getsize(prefix + ".bin")
        if actual_bytes != expected_bytes:
            raise UserError(
                f"{prefix + '.bin'!r} has {actual_bytes} bytes but its index describes "
                f"{expected_bytes}; the dataset is damaged -- rerun prepare-data with --force"
            )
        if self.num_tokens < seq_len + 1:
            raise UserError(
                f"the {self.split_name!r} split ({prefix}) has {self.num_tokens} tokens, fewer "
                f"than one window of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or "
                "prepare more text"
            )
        self.tokens = np.memmap(prefix + ".bin", dtype=self.dtype, mode="r",
                                shape=(self.num_tokens,))
        # The last window needs one token past its end for the final label.
        self._len = (self.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        """Window ``index`` as int64 of length ``seq_len + 1``."""
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows")
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """Stack windows into a LongTensor ``[len(indices), seq_len + 1]``."""
        return torch.from_numpy(np.stack([self[i] for i in indices]))


def _stack(dataset, indices: np.ndarray) -> torch.Tensor:
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    return torch.from_numpy(np.stack([np.asarray(dataset[int(i)], dtype=np.int64)
                                      for i in indices]))


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _check_dp(dp_rank: int, dp_size: int) -> None:
    _check_positive_int("data-parallel size", dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")


class StepLoader:
    """Deterministic, data-parallel-aware supplier of per-step micro-batches."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True) -> None:
        _check_positive_int("train.global_batch_size", global_batch_size)
        _check_positive_int("train.micro_batch_size", micro_batch_size)
        _check_dp(dp_rank, dp_size)
        check_batch_layout(global_batch_size, micro_batch_size, dp_size)
        if len(dataset) < 1:
            raise UserError("the training split has no samples; prepare more text")
        self.dataset = dataset
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.consumed_samples = 0
        self._perms: Dict[int, np.ndarray] = {}

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank per step (the gradient-accumulation count)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be consumed."""
        return self.consumed_samples // len(self.dataset)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            n = len(self.dataset)
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
            # A step spans at most two epochs unless G > N; keep a small cache.
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices of global sample positions ``[start, start + count)``."""
        n = len(self.dataset)
        positions = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        epochs = positions // n
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % n]
        return out

    def next_step(self) -> List[torch.Tensor]:
        """This rank's micro-batches for the next optimizer step (each ``[mbs, seq_len+1]``)."""
        per_rank = self.global_batch_size // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        indices = self.global_indices(start, per_rank)
        self.consumed_samples += self.global_batch_size
        mbs = self.micro_batch_size
        return [_stack(self.dataset, indices[i:i + mbs]) for i in range(0, per_rank, mbs)]

    def state_dict(self) -> Dict[str, int]:
        return {
            "consumed_samples": int(self.consumed_samples),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume at the saved global position.

        The state is global (not per rank), so the data-parallel size and even
        the global batch size may differ from the run that saved it. A
        different seed would silently change the data order, so it is refused.
        """
        if isinstance(state, dict) and state.get("blend") is not None:
            raise UserError(
                "the checkpoint was trained on a blend (data.blend) but this run reads one "
                "dataset (data.path); resume with the checkpoint's data.blend, or start a fresh "
                "run.")
        try:
            consumed, seed = int(state["consumed_samples"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"data-loader state {state!r} lacks consumed_samples/seed; the checkpoint is "
                "damaged or from another program"
            ) from exc
        if consumed < 0:
            raise UserError(f"data-loader state has negative consumed_samples {consumed}")
        if seed != self.seed:
            raise UserError(
                f"the checkpoint's data seed is {seed} but train.seed is {self.seed}; resume "
                f"with train.seed={seed} (a different seed changes the sample order) or start "
                "a fresh run"
            )
        self.consumed_samples = consumed


def eval_micro_batches(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                       max_samples: int) -> List[torch.Tensor]:
    """This rank's share of the first ``max_samples`` samples, as micro-batches.

    The sample count is rounded down to a multiple of
    ``micro_batch_size * dp_size`` so every rank runs the same number of
    micro-batches; rank ``r`` takes the ``r``-th contiguous block, in order.
    """
    _check_positive_int("train.micro_batch_size", micro_batch_size)
    _check_positive_int("train.eval_samples", max_samples)
    _check_dp(dp_rank, dp_size)
    per_round = micro_batch_size * dp_size
    total = min(int(max_samples), len(dataset)) // per_round * per_round
    if total == 0:
        name = getattr(dataset, "split_name", "validation")
        seq_len = getattr(dataset, "seq_len", "?")
        raise UserError(
            f"evaluation needs at least train.micro_batch_size ({micro_batch_size}) x "
            f"data-parallel size ({dp_size}) = {per_round} samples, but the {name!r} split has "
            f"{len(dataset)} windows of data.seq_len {seq_len} and train.eval_samples is "
            f"{max_samples}; raise train.eval_samples, lower train.micro_batch_size or "
            "data.seq_len, or prepare more validation text"
        )
    per_rank = total // dp_size
    start = dp_rank * per_rank
    return [_stack(dataset, np.arange(s, s + micro_batch_size))
            for s in range(start, start + per_rank, micro_batch_size)]
