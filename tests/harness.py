"""One helper for multi-process tests (importable as `harness`): run a function on N ranks.

Owns: starting ``world`` Python processes with the environment torchrun gives
its workers, calling a module-level function on each, returning each rank's
result to the test in rank order, and turning a raising, crashing or hanging
rank into an ``AssertionError`` that names the rank and holds its traceback.
It starts the default process group (unless told not to) but builds no
parallel state: functions call ``init_parallel`` as the trainer does; it reads
the same environment variables and reuses the group.

Like torchrun's agent, the parent hosts the rendezvous store on a port the OS
picks: no port is guessed free and then lost to another test, and a rank that
finishes first cannot take the store down with it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

import torch.distributed as dist

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
GRACE_S = 5  # how long the other ranks may take to fail on their own once one has failed


def run_ranks(fn: Callable[..., Any], world: int, *args, backend: str | None = "gloo",
              timeout: float = 300, env: dict | None = None, **kwargs) -> list[Any]:
    """Run ``fn(rank, *args, **kwargs)`` on ``world`` processes; return the results in rank order.

    ``fn`` must be defined at module level: it is pickled by name and imported
    again in each process, as are ``args``, ``kwargs`` and the results. Each
    process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (one node),
    MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1 and ``env`` on top, and starts
    the default process group with ``backend`` before calling ``fn``
    (``backend=None``: ``fn`` starts it, e.g. through ``init_parallel``).
    After ``timeout`` seconds every rank still running is killed.
    """
    if "<" in fn.__qualname__ or fn.__module__ == "__main__":
        raise ValueError(f"run_ranks needs a module-level function, got {fn!r}: define it at "
                         "the top level of the test module so each process can import it.")
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    fn_dir = os.path.dirname(os.path.abspath(sys.modules[fn.__module__].__file__))
    path = [TESTS, fn_dir, *sys.path]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="run_ranks_") as tmp:
        try:
            for rank in range(world):
                procs.append(_start(tmp, rank, world, store.port, path,
                                    (rank, fn, args, kwargs, backend, timeout), env))
            hung = _wait(procs, timeout)
        finally:
            killed = [rank for rank, p in enumerate(procs) if _kill(p)]
        outcomes = [_outcome(tmp, rank) for rank in range(world)]
    # The first rank to fail comes first: the others mostly fail because a peer went away.
    failed = sorted((r for r in range(world) if not outcomes[r][0] and r not in killed),
                    key=lambda r: outcomes[r][2])
    if not failed and not killed:
        return [value for _, value, _ in outcomes]
    lines = []
    for rank in failed:
        value = outcomes[rank][1]
        lines.append(f"rank {rank} raised:\n{value}" if value is not None else
                     f"rank {rank} exited with {_status(procs[rank].returncode)} before "
                     "returning (its stderr is in the captured output)")
    if killed:
        why = (f"still running after {timeout} s (hung?)" if hung else
               f"still running {GRACE_S} s after rank {failed[0]} failed")
        lines.append(f"killed rank(s) {killed}: {why}")
    raise AssertionError(f"{fn.__module__}.{fn.__qualname__} on {world} ranks failed:\n"
                         + "\n".join(lines))


def _start(tmp: str, rank: int, world: int, port: int, path: list[str], call: tuple,
           env: dict | None) -> subprocess.Popen:
    with open(os.path.join(tmp, f"call{rank}.pkl"), "wb") as f:
        pickle.dump(path, f)  # first: unpickling ``fn`` imports its module
        pickle.dump(call, f)
    child_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                     LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     TORCHELASTIC_USE_AGENT_STORE="True",  # connect to our store, as to torchrun's
                     OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    child_env.update(env or {})
    code = f"import sys; sys.path.insert(0, {TESTS!r}); import harness; harness._child({rank})"
    # A session of its own, so that a kill reaches whatever the rank started.
    return subprocess.Popen([sys.executable, "-c", code, tmp], cwd=REPO, env=child_env,
                            start_new_session=True)


def _child(rank: int) -> None:
    """In the rank's process: run the call and leave its outcome beside it."""
    tmp = sys.argv[1]
    warnings.filterwarnings("ignore")  # megatron-core's deprecation notices, once per rank
    try:
        with open(os.path.join(tmp, f"call{rank}.pkl"), "rb") as f:
            sys.path[:0] = pickle.load(f)
            rank, fn, args, kwargs, backend, timeout = pickle.load(f)
        if backend is not None:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        outcome = (True, fn(rank, *args, **kwargs), time.time())
    except BaseException:
        outcome = (False, traceback.format_exc(), time.time())
    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        data = pickle.dumps(outcome)
    except Exception:
        outcome = (False, f"the result of {fn.__qualname__} cannot be pickled:\n"
                          + traceback.format_exc(), time.time())
        data = pickle.dumps(outcome)
    path = os.path.join(tmp, f"result{rank}.pkl")
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    sys.exit(0 if outcome[0] else 1)


def _wait(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait for the ranks; True if ``timeout`` ran out with none failed. Once one has
    failed the others only get ``GRACE_S``: a collective with a dead peer may hang."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs):
            deadline = min(deadline, time.monotonic() + GRACE_S)
        if time.monotonic() > deadline:
            return not any(p.returncode for p in procs)
        time.sleep(0.05)
    return False


def _kill(p: subprocess.Popen) -> bool:
    """Kill what is left of the rank's session; True if the rank itself was still running."""
    running = p.poll() is None
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the usual case: the rank exited and left nothing behind
    p.wait()
    return running


def _outcome(tmp: str, rank: int) -> tuple[bool, Any, float]:
    """(returned, its result or traceback, when it finished or failed)."""
    try:
        with open(os.path.join(tmp, f"result{rank}.pkl"), "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return False, None, float("inf")  # killed, or died before the end of ``_child``


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
