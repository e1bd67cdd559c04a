"""Helpers for tests that run the CLI, in subprocesses or in this process (importable as
`helpers`)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A free TCP port for a rendezvous, picked below the kernel's ephemeral range. Ports
    the kernel hands out (``bind`` to port 0, and the local end of every outgoing
    connection, gloo's included) come from that range, so with test files running in
    parallel a port found free there can be taken by another test's connection before
    torchrun binds it; a random one below the range cannot be."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pick = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = pick.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: let the kernel pick
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


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    """Run the trainer CLI's ``main(args)`` in this process, from the repository root as
    ``run_cli`` does: its exit status and what it printed, as ``run_cli`` returns them.

    For tests of what the CLI decides (a refusal with status 2 and its message, a
    ``--check``), which would otherwise spend most of their time starting Python and
    torch again. Tests of the process itself (signals, torchrun, a lock held by a live
    process, exit codes set by the interpreter) keep ``run_cli``.
    """
    import torch

    from locmoe_train import train

    out, err = io.StringIO(), io.StringIO()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)
    torch.set_num_threads(1)  # as run_cli's OMP_NUM_THREADS=1: the same sums, bit for bit
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main(list(args))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["locmoe-train", *args], code, out.getvalue(),
                                       err.getvalue())


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



# Records written on another machine (tests/fixtures) are compared with a tolerance on
# floats. The same code on another x86-64 CPU does not give the same bits: kernels
# pick other SIMD widths (AVX2, AVX-512) and FMA, which change the order and rounding
# of every sum in a matmul or reduction. fp32 has eps = 1.2e-7, and sums over a few
# thousand terms end a few ulps apart: seen 7.5e-8 relative on grad_norm (0.7931400537
# against 0.7931401134), and c_min, delta0 in the 9th digit. 1e-6 relative (about 8
# ulps) takes that noise; a real change (lost optimizer state moves the loss by ~2%, a
# different routing changes the counts) is far larger. The absolute 1e-9 is for
# values that are 0 up to rounding. Integers (steps, tokens per expert, C, counts),
# strings, booleans and null compare exactly. Two runs inside one test compare with ==.
CROSS_MACHINE_RTOL = 1e-6
CROSS_MACHINE_ATOL = 1e-9


def record_differences(got, want, path: str = "") -> list[str]:
    """Where ``got`` differs from ``want`` (JSON-like values), under the rules above."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path or '.'}: {got!r} is not an object like {want!r}"]
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: not expected ({got[k]!r})" for k in got if k not in want]
        for k in want:
            if k in got:
                out += record_differences(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path or '.'}: {got!r} is not a list of {len(want)} like {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want))
                for d in record_differences(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(got, want, rel_tol=CROSS_MACHINE_RTOL, abs_tol=CROSS_MACHINE_ATOL) or (
                math.isnan(got) and math.isnan(want)):
            return []
        return [f"{path}: {got!r} != {want!r} (beyond rel {CROSS_MACHINE_RTOL:g})"]
    if type(got) is not type(want) or got != want:
        return [f"{path}: {got!r} != {want!r} (exact)"]
    return []


def assert_records_match(got, want) -> None:
    """``got`` equals records recorded on another machine (``record_differences``)."""
    diffs = record_differences(got, want)
    assert not diffs, "records differ:\n  " + "\n  ".join(diffs)


def adam_states(optimizer) -> dict:
    """``{param: {"step", "exp_avg", "exp_avg_sq"}}`` with full tensors, on every rank: a
    plain AdamW's state as it is, a ``DistributedAdamW``'s slices all-gathered over each
    bucket's group (collective: every rank calls it). For comparing optimizers in tests;
    the optimizer itself never gathers its state."""
    import torch
    import torch.distributed as dist

    from locmoe_train.optim.distributed import ADAM_KEYS, DistributedAdamW

    if not isinstance(optimizer, DistributedAdamW):
        return optimizer.state
    out = {}
    for b in optimizer.buckets:
        state = optimizer._own_state(b)
        full = {}
        for key in ADAM_KEYS:
            pieces = [torch.empty_like(state[key]) for _ in range(b.size)]
            if b.size > 1:
                dist.all_gather(pieces, state[key], group=b.group)
            else:
                pieces = [state[key]]
            full[key] = torch.cat(pieces)
        for p, off in zip(b.params, b.offsets):
            out[p] = {"step": state["step"].clone(),
                      **{k: full[k][off:off + p.numel()].view_as(p).clone() for k in ADAM_KEYS}}
    return out


def checkpoint_tensors(path: str) -> dict:
    """Every tensor of the checkpoint at ``path`` (model and optimizer state), whole, by
    its layout-free key: comparable across layouts and formats."""
    from locmoe_train.checkpoint import read_full_tensors

    return read_full_tensors(path, prefix="")[1]
