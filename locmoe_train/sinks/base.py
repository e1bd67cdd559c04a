"""Metric sinks: one interface, console and JSONL implementations.

Owns how a finished record (plain Python numbers, already reduced across
ranks) reaches the user. Only rank 0 builds sinks. The JSONL sink writes one
object per line and flushes each line, so a crash loses at most the record
being written. Its lines are strict JSON (``strict_json``): a NaN or inf
value (a window of skipped steps has no loss, a non-finite gradient norm)
is written as ``null``, not as the bare ``NaN`` that only Python reads back.
Later loggers (TensorBoard, wandb) implement the same ``write``/``close`` pair.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Protocol, TextIO


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def finite_or_null(value):
    """``value`` with every NaN/inf float in it, nested in dicts and lists too, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(obj, **kwargs) -> str:
    """``json.dumps`` that any JSON reader accepts: NaN/inf become ``null``."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4g}"


class ConsoleSink:
    def __init__(self, max_steps: int, stream: TextIO | None = None):
        self.max_steps = max_steps
        self.stream = stream  # None: sys.stdout as it is when a line is written

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def write(self, record: dict) -> None:
        step = f"step {record['step']:>{len(str(self.max_steps))}}/{self.max_steps}"
        if "val_loss" in record:
            line = f"{step} | val_loss {record['val_loss']:.4f} | val_ppl {_fmt(record['val_ppl'])}"
            for name, entry in (record.get("val_by_dataset") or {}).items():
                line += f" | {name} {entry['loss']:.4f}"
        else:
            parts = [step, f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                     f"grad {_fmt(record['grad_norm'])}",
                     f"{record['tokens_per_s'] / 1000:.1f}k tok/s"]
            if "aux_loss" in record:
                parts.append(f"aux {_fmt(record['aux_loss'])}")
            if "moe_imbalance" in record:
                parts.append(f"imb {record['moe_imbalance']:.2f}")
            if "moe_capacity" in record:
                parts.append(f"C {record['moe_capacity']}")
            line = " | ".join(parts)
            if record.get("skipped_steps"):
                nf = record["nonfinite"]
                line += (f"\n    skipped {record['skipped_steps']} optimizer step(s) with a "
                         f"non-finite loss or grad norm (last: {nf['cause']} at step "
                         f"{nf['step']}); {record['skipped_total']} skipped in all")
            for e in record.get("capacity_events", []):
                line += (f"\n    capacity of layer {e['layer']}: {e['old']} -> {e['new']} "
                         f"({e['reason']} at step {e['step']})")
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=self._out(), flush=True)

    def close(self) -> None:
        pass


def _rotate(path: str) -> None:
    """Keep an earlier run's file instead of overwriting it: metrics.jsonl -> metrics.1.jsonl, ..."""
    if not os.path.exists(path):
        return
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.replace(path, f"{stem}.{n}{ext}")


def truncate_after(path: str, step: int) -> None:
    """Drop records of steps after ``step`` (work a resumed run is about to redo)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlSink:
    def __init__(self, path: str, append: bool = False):
        if not append:
            _rotate(path)
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        self.f.write(strict_json(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class MultiSink:
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def write(self, record: dict) -> None:
        for s in self.sinks:
            s.write(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
