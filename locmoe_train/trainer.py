"""The training loop: steps, periodic logging and validation, checkpoints, graceful stop.

Owns the order of events around a step object (``TrainStep`` for
pre-training, ``AdaKStep`` for the Ada-K stage): fetch a step's
micro-batches, run the step, every ``Cadence.log_interval`` steps reduce the
accumulated metrics across ranks (the only host sync in the loop) and write
one record, every ``eval_interval`` steps and at the end write the step's
evaluation record, every ``checkpoint_interval`` steps save.

The step object makes the records (``log_record``, ``eval_record``); the
*parts* (the MoE runtime, for one) add fields of their own to each training
record (``log_record(acc, n_steps)``). The trainer knows nothing about what
is being trained. *Hooks* (``hooks.py``) get ``step_end(step)`` after each
step: tests install one to kill a rank at a given step.

SIGINT/SIGTERM set a flag; ranks agree on it at the end of each step (one
tiny all-reduce), so every rank stops after the same step and nobody is left
waiting in a collective. A second Ctrl-C aborts at once. The non-finite
guard's stop flag (``nonfinite.py``) rides in the same all-reduce; a run it
stops ends with "nonfinite", saving no checkpoint. Alone on a GPU there is no
all-reduce, and reading the flag would cost a host sync per step, so it is read
at log steps and before every save only; the flag is sticky, so a streak that
ended in between still stops the run, and no checkpoint is written after it.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from locmoe_train.hooks import call as call_hooks
from locmoe_train.parallel.state import ParallelContext


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates, saves and stops (0 intervals: only at the end)."""
    max_steps: int
    log_interval: int
    eval_interval: int = 0
    checkpoint_interval: int = 0
    exit_at_step: int | None = None
    # Steps that always end a log window (Ada-K: the last warm-start step).
    log_at: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg) -> "Cadence":
        # Step 1 is always logged in pre-training: the starting loss and routing.
        return cls(cfg.train.max_steps, cfg.logging.log_interval, cfg.train.eval_interval,
                   cfg.checkpoint.interval, cfg.train.exit_at_step, log_at=(1,))


class StopRequested:
    """Flag set by signal handlers; the loop stops after the current step."""

    def __init__(self):
        self.signum: int | None = None
        self.failed = False  # the non-finite guard stopped the run
        self.writing = False  # some rank's background checkpoint write is still going
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum


def agree_to_stop(stop: StopRequested, pctx: ParallelContext, guard=None,
                  poll: bool = True, writing: bool = False) -> bool:
    """True on every rank if any rank was signalled (then ``stop.signum`` is set everywhere)
    or ``guard`` (a ``NonFiniteGuard``) tripped (then ``stop.failed``). On several ranks the
    guard's flag rides in the signal flag's all-reduce. Alone, it is read on the host only
    when ``poll`` is true or a signal came (a signal stop saves a checkpoint, which must
    not hold a tripped run's state). ``writing``: this rank's background checkpoint write
    is still going; ``stop.writing`` is then true on every rank while any rank's is (it
    rides in the same all-reduce: a pending save adds no collective to a step)."""
    if pctx.world_size == 1:  # nobody to agree with: no device tensor, no host sync
        stop.writing = writing
        if guard is not None and (poll or stop.signum is not None):
            stop.failed = bool(guard.tripped())
        return stop.failed or stop.signum is not None
    flag = torch.tensor([1 if stop.signum is not None else 0, 1 if writing else 0],
                        dtype=torch.int32, device=pctx.device)
    if guard is not None:
        flag = torch.cat([flag, guard.tripped()])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    signalled, writing_anywhere, *tripped = flag.tolist()
    values = [signalled, *tripped]
    stop.writing = writing_anywhere > 0
    stop.failed = len(values) > 1 and values[1] > 0
    stopping = max(values) > 0
    if stopping and stop.signum is None and not stop.failed:
        stop.signum = signal.SIGTERM  # another rank was signalled
    return stopping


class Trainer:
    def __init__(self, cadence: Cadence, pctx: ParallelContext, step_fn, loader, sink=None,
                 start_step: int = 0, save=None, parts=(), hooks=(), console: bool = True,
                 guard=None, poll_guard_every_step: bool | None = None, saver=None):
        self.cadence, self.pctx, self.step_fn, self.loader = cadence, pctx, step_fn, loader
        self.sink, self.parts, self.hooks, self.console = sink, list(parts), list(hooks), console
        self.step = start_step
        self.stop = StopRequested()
        self.last_eval: dict | None = None
        # save(step) writes a checkpoint and returns its path (None: checkpointing off, or
        # written in the background). ``saver``, if given, publishes background saves:
        # ``writing()`` says whether this rank's write is still going (agreed in the stop
        # all-reduce); ``wait()`` publishes, returning the path (None if none pending).
        self.save, self.saver = save, saver
        self.last_saved = start_step
        self.last_checkpoint: str | None = None  # the path this run saved last
        self.guard = guard  # a NonFiniteGuard, or None
        # Read the guard's flag after every step, or only at log and checkpoint steps.
        # Default: every step on CPU (a read costs nothing) and on several ranks (it is
        # in the stop all-reduce anyway); not alone on a GPU, where it is a host sync.
        if poll_guard_every_step is None:
            poll_guard_every_step = pctx.world_size > 1 or pctx.device.type != "cuda"
        self.poll_guard_every_step = poll_guard_every_step

    # ---- loop -------------------------------------------------------------
    def fit(self) -> str:
        """Train to ``max_steps``; returns "completed", "exit_at_step", "nonfinite" or the
        signal's name. A save still in the background is published before it returns."""
        self.stop.install()
        try:
            outcome = self._loop()
            self._saved(self.saver.wait() if self.saver is not None else None)
            return outcome
        finally:
            self.stop.uninstall()

    def _loop(self) -> str:
        c = self.cadence
        acc: dict[str, torch.Tensor] = {}
        steps_in_window, t0 = 0, time.perf_counter()
        while self.step < c.max_steps:
            micro_batches = self.loader.next_step()
            self.step += 1
            metrics = self.step_fn(micro_batches, self.step)
            call_hooks(self.hooks, "step_end", self.step)
            for k, v in metrics.items():
                acc[k] = acc[k] + v if k in acc else v.clone()
            steps_in_window += 1
            last = self.step == c.max_steps
            log_step = self.step % c.log_interval == 0 or last or self.step in c.log_at
            exiting = self.step == c.exit_at_step
            saving = bool(c.checkpoint_interval and self.step % c.checkpoint_interval == 0
                          or exiting or last)
            # Polled before any save: a tripped guard's state is never checkpointed.
            writing = self.saver is not None and self.saver.writing()
            stopping = agree_to_stop(self.stop, self.pctx, self.guard,
                                     poll=self.poll_guard_every_step or log_step or saving,
                                     writing=writing)
            if self.saver is not None and not self.stop.writing:
                # Every rank's background write is done: publish it (no-op if none pending).
                self._saved(self.saver.wait())
            if log_step or stopping:
                if self.pctx.device.type == "cuda":
                    torch.cuda.synchronize()
                self._log_train(acc, steps_in_window, time.perf_counter() - t0)
                acc, steps_in_window, t0 = {}, 0, time.perf_counter()
            if self.stop.failed:
                return "nonfinite"  # no checkpoint of this state: the last one stays
            if (c.eval_interval and self.step % c.eval_interval == 0) or last:
                self._log_eval()
                t0 = time.perf_counter()  # validation time is not training throughput
            if saving or stopping:
                self._checkpoint()
                t0 = time.perf_counter()
            if stopping:
                return signal.Signals(self.stop.signum).name
            if exiting:
                return "exit_at_step"
        self._checkpoint()
        return "completed"

    def _checkpoint(self) -> None:
        if self.save is not None and self.last_saved != self.step:
            self.last_saved = self.step
            self._saved(self.save(self.step))

    def _saved(self, path: str | None) -> None:
        """A checkpoint was published (a background save is published later)."""
        if path is None:
            return
        self.last_checkpoint = path
        if self.pctx.is_main and self.console:
            print(f"saved checkpoint {path}", flush=True)

    # ---- records ------------------------------------------------------------
    def _emit(self, record: dict) -> None:
        if self.pctx.is_main and self.sink is not None:
            self.sink.write(record)

    def _log_train(self, acc, n_steps: int, elapsed: float) -> None:
        record = {"step": self.step, **self.step_fn.log_record(acc, n_steps, elapsed)}
        for part in self.parts:
            record.update(part.log_record(acc, n_steps))
        self._emit(record)

    def _log_eval(self) -> None:
        self.last_eval = {"step": self.step, **self.step_fn.eval_record()}
        self._emit(self.last_eval)
