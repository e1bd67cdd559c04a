"""Helpers for tests that run the CLI in subprocesses (importable as `helpers`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], nproc: int = 1, cwd: str | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the trainer CLI in a subprocess (through torchrun when nproc > 1)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "locmoe_train.train", *args]
    else:
        cmd = [sys.executable, "-m", "locmoe_train.train", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def strict_loads(text: str):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``: Python writes
    them by default, but they are not JSON, and jq, JavaScript or Go cannot read them."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON (write null for a non-finite value)")

    return json.loads(text, parse_constant=refuse)


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, each line parsed as strict JSON."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [strict_loads(line) for line in f]

