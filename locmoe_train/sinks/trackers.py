"""Optional metric sinks: TensorBoard and Weights & Biases.

Owns how a finished record (see ``Trainer._log_train``/``_log_eval``) becomes
named scalars and per-layer tokens-per-expert histograms for the two
experiment trackers, and how those trackers are kept from hurting training.
It does not reduce anything or decide when to log (the trainer does), and
it imports ``torch.utils.tensorboard``/``wandb`` only when a sink is built,
so neither package is needed unless its ``logging.*`` key is on.

Names: top-level numbers go to ``train/*``, ``val/*`` and ``moe/*``
(``moe/imbalance``, ``moe/capacity``); each MoE layer's numbers go to
``moe/layer_{i}/{name}`` and its token counts to the histogram
``moe/layer_{i}/tokens_per_expert`` (expert index as value, count as weight).

wandb can hang on the network or fail in its service process, so
``WandbSink`` does every wandb call on one background thread fed by a
bounded queue: ``write`` never blocks and never raises, a full queue drops
the record (reported once), a failing ``wandb.init`` turns the sink off, a
failing ``log`` skips that record (the first error is reported), and
``close`` waits a bounded time for ``finish``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import queue
import sys
import threading
import time
import uuid

from locmoe_train.errors import UserError

# Top-level record keys with a name of their own; other numbers go by prefix
# (``val_x`` -> ``val/x``, ``moe_x`` -> ``moe/x``, else ``train/x``).
TOP_LEVEL_NAMES = {
    "val_loss": "val/loss", "val_ppl": "val/ppl",
    "moe_imbalance": "moe/imbalance", "moe_capacity": "moe/capacity",
    "bytes_cross_node": "moe/bytes_cross_node", "bytes_intra_node": "moe/bytes_intra_node",
}
HISTOGRAM_KEY = "tokens_per_expert"


def _is_number(v) -> bool:
    # bool is an int subclass but not a metric; NaN/inf would poison plots.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _top_level_name(key: str) -> str:
    if key in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[key]
    for prefix in ("val", "moe"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


def scalars(record: dict) -> dict[str, float]:
    """Every finite number of a record under its tracker name (``step`` excluded)."""
    out = {}
    for key, value in record.items():
        if key != "step" and _is_number(value):
            out[_top_level_name(key)] = value
    for layer, entry in (record.get("moe") or {}).items():
        for key, value in entry.items():
            if _is_number(value):
                out[f"moe/{layer}/{key}"] = value
    # data.blend: per-dataset validation loss and samples drawn per source.
    for name, entry in (record.get("val_by_dataset") or {}).items():
        out[f"val/{name}/loss"] = entry["loss"]
    for name, count in (record.get("data_samples") or {}).items():
        out[f"data/{name}/samples"] = count
    return out


def expert_counts(record: dict) -> dict[str, list[int]]:
    """``moe/layer_{i}/tokens_per_expert`` -> that layer's token count per expert."""
    return {f"moe/{layer}/{HISTOGRAM_KEY}": entry[HISTOGRAM_KEY]
            for layer, entry in (record.get("moe") or {}).items()
            if entry.get(HISTOGRAM_KEY)}


def _missing(key: str) -> UserError:
    return UserError(f"logging.{key}=true needs the '{key}' package, which is not installed: "
                     f"pip install 'locmoe-train[{key}]' (or set logging.{key}=false).")


def check_installed(logging_cfg) -> None:
    """UserError when an enabled tracker's package is missing. Called by config
    validation, so every rank (and ``--check``) fails the same way before training."""
    for key in ("tensorboard", "wandb"):
        if getattr(logging_cfg, key) and importlib.util.find_spec(key) is None:
            raise _missing(key)


class TensorBoardSink:
    """Event files in ``log_dir`` (``<run_dir>/tensorboard``)."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        # purge_step: a resumed run redoes the steps after its checkpoint, and
        # TensorBoard hides the earlier run's events from that step on.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def write(self, record: dict) -> None:
        step = record["step"]
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step)
        for name, counts in expert_counts(record).items():
            used = [i for i, c in enumerate(counts) if c]
            self.writer.add_histogram_raw(
                name, min=used[0] if used else 0, max=used[-1] if used else 0,
                num=sum(counts), sum=sum(i * c for i, c in enumerate(counts)),
                sum_squares=sum(i * i * c for i, c in enumerate(counts)),
                # bucket i holds expert i: right edges at i + 0.5
                bucket_limits=[i + 0.5 for i in range(len(counts))], bucket_counts=counts,
                global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """A wandb run in ``<run_dir>/wandb``, fed from a background thread.

    The run id is kept in ``<run_dir>/wandb/run_id``; a resumed training run
    (``resuming=True``) reuses it with ``resume="allow"`` so the tracker shows
    one run, a fresh run in the same directory starts a new id.
    """

    def __init__(self, run_dir: str, *, project: str, entity: str | None, name: str | None,
                 mode: str, config: dict, resuming: bool = False, queue_size: int = 1000,
                 finish_timeout_s: float = 60.0):
        # Before wandb reads its environment: no banners, no login prompt text.
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb  # noqa: F401  (fail here, in the main thread, with a clear message)
        except ImportError:
            raise _missing("wandb") from None
        self.dir = os.path.join(run_dir, "wandb")
        os.makedirs(self.dir, exist_ok=True)
        self.run_id = self._run_id(resuming)
        self.finish_timeout_s = finish_timeout_s
        self._init_args = dict(
            project=project, entity=entity, mode=mode, id=self.run_id, resume="allow",
            name=name or os.path.basename(os.path.normpath(run_dir)),
            dir=run_dir, config=config)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._failed = threading.Event()
        self._dropped = 0
        self._closed = False
        self._reported = False
        self._thread = threading.Thread(target=self._work, name="wandb-sink", daemon=True)
        self._thread.start()

    def _run_id(self, resuming: bool) -> str:
        path = os.path.join(self.dir, "run_id")
        if resuming and os.path.exists(path):
            with open(path) as f:
                run_id = f.read().strip()
            if run_id:
                return run_id
        run_id = uuid.uuid4().hex[:12]
        with open(path, "w") as f:
            f.write(run_id + "\n")
        return run_id

    # ---- main thread -------------------------------------------------------
    def write(self, record: dict) -> None:
        if self._failed.is_set() or self._closed:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            if self._dropped == 0:
                _warn(f"wandb is not keeping up; dropping records from step {record['step']} "
                      f"on (training continues; other sinks still get them).")
            self._dropped += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.finish_timeout_s
        # The end marker may wait for room in the queue, but only while the
        # worker is alive to make room and only until the deadline.
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            _warn(f"wandb did not finish within {self.finish_timeout_s:.0f}s; the run in "
                  f"{self.dir} may miss its last records.")
        if self._dropped:
            _warn(f"wandb dropped {self._dropped} record(s) because its queue was full.")

    # ---- background thread -------------------------------------------------
    def _work(self) -> None:
        try:
            import wandb

            if self._init_args["mode"] == "online":
                _require_credentials(wandb)
            run = wandb.init(**self._init_args,
                             settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # noqa: BLE001 - no wandb failure may reach training
            self._failed.set()
            _warn(f"wandb could not start ({type(e).__name__}: {e}); wandb logging is off for "
                  f"this run, training and the other sinks continue.")
            return
        while (record := self._queue.get()) is not None:
            try:
                run.log(self._payload(wandb, record), step=record["step"])
            except Exception as e:  # noqa: BLE001
                self._report(e, f"logging step {record['step']}")
        try:
            run.finish()
            # finish() returns once the run's exit is acknowledged, but the
            # wandb service may still hold the tail of the transaction log
            # (<run>/*.wandb) in its buffers. Tearing the service down waits
            # for it to close the file, so the run on disk is complete when
            # close() returns (``wandb sync`` right after, or a job killed
            # just after training, finds every record).
            wandb.teardown()
        except Exception as e:  # noqa: BLE001
            self._report(e, "finishing the run")

    def _report(self, error: Exception, what: str) -> None:
        if not self._reported:
            self._reported = True
            _warn(f"wandb failed {what} ({type(error).__name__}: {error}); training and the "
                  f"other sinks continue (further wandb errors are not shown).")

    @staticmethod
    def _payload(wandb, record: dict) -> dict:
        import numpy as np

        data: dict = dict(scalars(record))
        for name, counts in expert_counts(record).items():
            edges = np.arange(len(counts) + 1, dtype=np.float64) - 0.5
            data[name] = wandb.Histogram(np_histogram=(np.asarray(counts), edges))
        return data


def build_tracker_sinks(cfg, resuming: bool, start_step: int) -> list:
    """The TensorBoard/wandb sinks ``cfg.logging`` asks for (rank 0 only)."""
    lg, sinks = cfg.logging, []
    if lg.tensorboard:
        sinks.append(TensorBoardSink(os.path.join(lg.run_dir, "tensorboard"),
                                     purge_step=start_step + 1 if resuming else None))
    if lg.wandb:
        sinks.append(WandbSink(lg.run_dir, project=lg.wandb_project, entity=lg.wandb_entity,
                               name=lg.wandb_name, mode=lg.wandb_mode, config=cfg.to_dict(),
                               resuming=resuming))
    return sinks


def tracker_outputs(logging_cfg) -> list[str]:
    """Output folders of the enabled trackers, for the startup summary."""
    out = []
    if logging_cfg.tensorboard:
        out.append(f"tensorboard/ (tensorboard --logdir {logging_cfg.run_dir}/tensorboard)")
    if logging_cfg.wandb:
        out.append(f"wandb/ ({logging_cfg.wandb_mode}, project {logging_cfg.wandb_project})")
    return out


def _require_credentials(wandb) -> None:
    """Online mode without an API key must fail, never wait at a login prompt."""
    try:
        ok = wandb.login(prompt=False)
    except TypeError:  # wandb without the ``prompt`` argument: init fails non-interactively
        return
    if not ok:
        raise RuntimeError("no W&B credentials: set WANDB_API_KEY or run `wandb login`, or use "
                           "logging.wandb_mode=offline and `wandb sync` later")


def _warn(message: str) -> None:
    # Printed rather than warnings.warn: the CLI silences UserWarning (megatron noise).
    print(f"warning: {message}", file=sys.stderr, flush=True)
