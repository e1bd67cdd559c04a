"""The non-finite guard: skip an optimizer step whose loss or gradient norm is NaN/inf.

Owns the verdict on each step (``step_code``, a device tensor: 0 = finite, else
an index into ``CAUSES``), the device counters behind it (streak of skipped
steps, where it started, total) and what the loop reads from them: the flag
that stops the run (``tripped``), the record fields and the final error line.

The verdict costs no host sync: the loss's NaN/inf flags travel in the
all-reduce that already sums the squared gradient norm (``GradSync.checked_norm``),
so every rank gets the same verdict, and the optimizer skips on device
(``step_optimizer``: fused AdamW's ``found_inf``). The stop flag is sticky, so
the loop may read it only where it reads the device anyway (``Trainer.fit``: alone
on a GPU, at log and checkpoint steps) and still stop after a streak that ended
in between. The counters are checkpointed (``state_dict``), so a resume keeps
the streak. What is skipped on a bad step, and by whom: the weights and Adam
state (here), the aux-free router bias, the LocMoE+ capacity controller and
locality share (``moe/runtime.py`` passes the verdict on). Does not own the
decision to exit (``train.py``: status 3, its ``EXIT_CODES``).
"""

from __future__ import annotations

import torch

CAUSES = ("", "loss is NaN", "loss is inf", "grad norm is NaN", "grad norm is inf")


def step_code(norm: torch.Tensor, loss_flags: torch.Tensor) -> torch.Tensor:
    """The step's cause code from the global grad norm and [ranks with a NaN loss,
    ranks with an inf loss] (both already reduced over the world)."""
    code = torch.zeros((), dtype=torch.int64, device=norm.device)
    for value, bad in [(4, torch.isinf(norm)), (3, torch.isnan(norm)),
                       (2, loss_flags[1] > 0), (1, loss_flags[0] > 0)]:
        code = torch.where(bad, value, code)  # the last match (a loss cause) wins
    return code


def step_optimizer(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``ok`` (a 0-dim bool tensor) is false."""
    inner = getattr(optimizer, "inner", optimizer)  # optim.distributed steps a torch AdamW
    if inner.defaults.get("fused"):
        # Fused AdamW reads the flag in its kernel: nothing moves, the step count
        # included, and the host never waits for the verdict. (The distributed
        # optimizer then all-gathers the unchanged pieces.)
        inner.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):  # non-fused: our CPU path, where reading the flag is free
        optimizer.step()


class NonFiniteGuard:
    """Per run: ``train.nonfinite`` (skip | stop) and ``train.nonfinite_patience``.

    The verdict is sticky: once ``patience`` steps in a row were skipped, the
    ``latched`` flag stays set, and the streak that set it (first and last step,
    cause) is kept beside the running counters. The loop may read the flag at any
    later step (alone on a GPU: only at log and checkpoint steps) and still stops,
    and says which streak it was, even if later steps were finite again.

    A stateful part of the checkpoint (``state_dict``: plain ints), so a resume
    continues the streak and the total instead of starting them over."""

    # The device counters, by their state_dict names.
    FIELDS = ("streak", "start", "last_bad", "total", "cause",
              "latched", "trip_streak", "trip_start", "trip_last", "trip_cause")

    def __init__(self, mode: str, patience: int, device: torch.device):
        self.mode = mode
        self.patience = 1 if mode == "stop" else patience
        self.device = device
        for name in self.FIELDS:
            setattr(self, name, torch.zeros((), dtype=torch.int64, device=device))

    def update(self, code: torch.Tensor, step: int) -> None:
        """Count the step's verdict (device ops only)."""
        bad = code != 0
        self.streak = torch.where(bad, self.streak + 1, 0)
        self.start = torch.where(bad & (self.streak == 1), step, self.start)
        self.last_bad = torch.where(bad, step, self.last_bad)
        self.cause = torch.where(bad, code, self.cause)
        self.total = self.total + bad.long()
        # Latch the first streak that reaches patience; later steps change nothing here.
        trips = (self.streak >= self.patience) & (self.latched == 0)
        for name in ("streak", "start", "last_bad", "cause"):
            kept = f"trip_{'last' if name == 'last_bad' else name}"
            setattr(self, kept, torch.where(trips, getattr(self, name), getattr(self, kept)))
        self.latched = torch.maximum(self.latched, trips.long())

    def tripped(self) -> torch.Tensor:
        """Int32 [1] device flag: 1 once ``patience`` steps in a row were skipped; it stays
        1 after that (sticky), whatever the later steps."""
        return self.latched.int().reshape(1)

    # ---- checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict:
        """The counters as plain ints (a host read: called only when saving)."""
        return {name: int(getattr(self, name)) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            if name in state:  # a field added later is missing from an older checkpoint
                setattr(self, name, torch.tensor(int(state[name]), dtype=torch.int64,
                                                 device=self.device))

    # ---- on the host, at a log step or at the end -------------------------------
    def log_record(self, acc: dict[str, torch.Tensor], n_steps: int) -> dict:
        skipped = int(acc["skipped"]) if "skipped" in acc else 0
        record = {"skipped_steps": skipped, "skipped_total": int(self.total)}
        if skipped:
            record["nonfinite"] = {"step": int(self.last_bad), "cause": CAUSES[int(self.cause)]}
        return record

    def message(self, last_checkpoint: str | None) -> str:
        """The one line printed when the guard stops the run (without ``error: ``): the
        streak that tripped it, not the counters' values now."""
        streak, start, step = int(self.trip_streak), int(self.trip_start), int(self.trip_last)
        what = ("train.nonfinite=stop" if self.mode == "stop" else
                f"{streak} steps in a row ({start}-{step}) were skipped, "
                f"train.nonfinite_patience={self.patience}")
        cause = CAUSES[int(self.trip_cause)]
        tries = "a lower optim.lr, more optim.warmup_steps, optim.grad_clip=1.0 or train.precision=fp32"
        if last_checkpoint:
            return (f"{cause} at step {step} ({what}); kept the last checkpoint, "
                    f"{last_checkpoint}. Try {tries}, then resume from it with "
                    f"--checkpoint.resume=auto.")
        return (f"{cause} at step {step} ({what}); no checkpoint was saved. "
                f"Try {tries} and start again.")
