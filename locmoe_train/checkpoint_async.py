"""Writing one rank's checkpoint files, now (a synchronous save) or in the background
(``checkpoint.async: true``).

A save has three stages (``checkpoint.Checkpointer`` runs them):
1. *plan* (every rank, at the save step): which pieces this rank writes
   (``checkpoint_plan.py``), its RNG state, and on rank 0 the trainer state;
2. *write* (``RankFiles.write``): this rank's shard file, its RNG file and, on
   rank 0, ``trainer.pt``; no collective, so it can run in a thread;
3. *publish* (every rank): the ranks agree that every file was written, rank 0
   writes meta.json, renames ``step_N.tmp`` and points ``latest`` at it
   (``checkpoint_dirs.StepWrite``).

Asynchronously, stage 1 also copies the pieces to host memory (pinned when they
are on a GPU): the training step that follows changes the parameters and the
optimizer state in place. The host buffers are kept for the next save, so a
background save holds a copy of the rank's share of the state between saves.
Stage 2 runs in a ``BackgroundWrite`` thread while training goes on, and its
start needs no barrier (``UnsyncedStepWrite``). Stage 3 needs collectives, so
it runs in the training loop: after every step the ranks learn whether any
write is still going from a flag in the all-reduce they make anyway to agree
on stopping (``trainer.agree_to_stop``), and the first step at which none is
publishes it. The next save, and the end of the run, wait for the pending
one. Until it is published ``latest`` names the previous checkpoint, so a crash
during the background write loses only the save in flight; a write that fails
(a full disk, say) is agreed on at the publish and stops the run with
``SaveFailed`` on every rank, as a synchronous save would.

Not owned: the format (``checkpoint.py``, ``checkpoint_pieces.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from typing import Callable, Optional

import torch

from locmoe_train.checkpoint_dirs import StepWrite
from locmoe_train.checkpoint_pieces import write_pieces
from locmoe_train.hooks import call as call_hooks


def host_copy(t: torch.Tensor, buffers: Optional[dict] = None,
              name: str = "") -> torch.Tensor:
    """A copy of ``t`` in host memory, in ``buffers[name]`` when that buffer fits (else a new
    one, kept there for the next save): the next save waits for this one, so by then the
    buffer is free, and copying into memory already mapped is 2-3 times faster than into
    fresh pages (measured here: 47 MiB in 7 ms against 19 ms). From a GPU the buffer is
    pinned and the copy a DMA that does not wait for the device; the caller synchronizes
    the device before the copy is read."""
    on_gpu = t.device.type == "cuda"
    out = buffers.get(name) if buffers is not None else None
    if out is None or out.shape != t.shape or out.dtype != t.dtype:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=on_gpu)
        if buffers is not None:
            buffers[name] = out
    out.copy_(t.detach(), non_blocking=on_gpu)
    return out


class UnsyncedStepWrite(StepWrite):
    """A ``StepWrite`` whose start needs no barrier: every rank creates ``step_N.tmp``
    itself (``exist_ok``) instead of waiting for rank 0 to. Safe only where no
    ``step_N.tmp`` of an earlier attempt can be there, i.e. after
    ``remove_unfinished`` at start-up: rank 0 would otherwise remove that one while the
    others write into it. Used by background saves, whose start blocks training: on a
    busy machine the barrier was most of that time."""

    def _start(self) -> None:
        if self.pctx.is_main:
            self.attempt(self.dir, self._note_free)
        self.attempt(self.tmp, os.makedirs, self.tmp, 0o777, True)

    def _note_free(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self.free = shutil.disk_usage(self.dir).free


def remove_unfinished(ckpt_dir: str) -> list[str]:
    """Remove every ``step_N.tmp`` in ``ckpt_dir`` (saves a crash interrupted; never
    published, never resumed from) and return their names. Rank 0, at start-up, under
    the run lock: no save of this run has begun."""
    if not os.path.isdir(ckpt_dir):
        return []
    gone = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+\.tmp", n))
    for name in gone:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return gone


class RankFiles:
    """The files one rank writes for one checkpoint, and their checksums once written."""

    def __init__(self, write, pieces: list, rng: dict, trainer: Optional[dict],
                 save_synced: Callable, hooks=(), snapshot: bool = False,
                 staging: Optional[dict] = None):
        self.write, self.rng, self.trainer, self.save_synced = write, rng, trainer, save_synced
        self.hooks, self.step = list(hooks), write.step
        rank = write.pctx.rank
        self.shard_file = f"shards_rank{rank:05d}.safetensors"
        self.rng_file = f"rng_rank{rank:05d}.pt"
        self.index = [(p.key, p.index(self.shard_file)) for p in pieces]
        self.named = [(p.name, host_copy(p.tensor, staging, p.name) if snapshot else p.tensor)
                      for p in pieces]
        if snapshot and any(p.tensor.device.type == "cuda" for p in pieces):
            torch.cuda.synchronize()
        self.nbytes = sum(t.numel() * t.element_size() for _, t in self.named)
        self.sums: dict[str, Optional[str]] = {}

    def write_all(self) -> None:
        """Write this rank's files (an OSError is kept in ``write.error``, not raised)."""
        w = self.write
        self.sums[self.shard_file] = w.attempt(self.shard_file, write_pieces,
                                               os.path.join(w.tmp, self.shard_file), self.named)
        self.named = []
        call_hooks(self.hooks, "after_shards", self.step)
        self.sums[self.rng_file] = w.attempt(self.rng_file, self.save_synced, self.rng,
                                             os.path.join(w.tmp, self.rng_file))
        if self.trainer is not None:
            self.sums["trainer.pt"] = w.attempt("trainer.pt", self.save_synced, self.trainer,
                                                os.path.join(w.tmp, "trainer.pt"))


class BackgroundWrite:
    """``RankFiles.write_all`` in a daemon thread. Whatever it raises becomes the save's
    error, so that every rank learns of it at the publish (never silently lost)."""

    def __init__(self, files: RankFiles):
        self.files = files
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.files.write_all()
        except BaseException as e:  # noqa: BLE001 - reported at the publish, on every rank
            if self.files.write.error is None:
                self.files.write.error = f"background writer: {type(e).__name__}: {e}"

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self) -> None:
        self.thread.join()
