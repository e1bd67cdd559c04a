"""Workers never outlive their launcher: a torchrun worker dies with its agent.

Owns what a worker does, from the first line of ``main``, when its torchrun
agent goes away (``kill -9``, an OOM kill, a lost job step): the kernel sends
it ``SIGKILL`` (Linux ``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread that
polls ``os.getppid()`` ends it too where that is unavailable or did not fire:
a *change* of parent is the agent's death, whoever adopted us (init, or a
subreaper such as tini or ``systemd --user``). Either way the worker stops at
once: its peers may be gone, so a clean stop would hang in a collective, and
it must not publish a checkpoint. A signal handler could not help: Python runs
them only between bytecodes, never while the main thread waits inside gloo or
NCCL.

The agent may also have died before we looked; then we were adopted by PID 1
already. But a parent of 1 is also what every worker sees when the agent *is*
PID 1: a container whose exec-form entrypoint is ``torchrun ...`` (Docker
without ``--init``, a Kubernetes PyTorchJob). Those are told apart by what PID
1 runs: torchrun starts its workers with its own interpreter
(``sys.executable``), so an agent at PID 1 runs the same executable as we do,
and an init (tini, dumb-init, a shell, systemd) does not. Nothing needs
watching then: when PID 1 of a pid namespace dies, the kernel kills every
process in it.

Only under torchrun (its agent sets ``TORCHELASTIC_RUN_ID``): a process started
from a shell, or by a sweep, keeps running when that parent exits, as a
``nohup`` run should. Imports nothing heavy: it runs before torch loads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def under_torchrun() -> bool:
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exe(pid: object) -> Optional[str]:
    """The executable ``pid`` runs, or None where /proc cannot tell (another user's
    process, no /proc)."""
    try:
        return os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def _command(pid: int, limit: int = 100) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    except OSError:
        return "?"
    return text if len(text) <= limit else text[:limit] + "..."


def init_is_our_agent() -> bool:
    """Whether PID 1 (of our pid namespace) is the torchrun agent that started us:
    it runs this very interpreter. An init that adopted us after the agent died does
    not; one we may not inspect (another user's) is not ours either."""
    ours = _exe("self")
    return ours is not None and _exe(1) == ours


def _watch(parent: int, prefix: str) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    print(f"{prefix}error: the torchrun agent (pid {parent}) is gone; this worker exits "
          f"without saving a checkpoint.", file=sys.stderr, flush=True)
    os._exit(1)  # from this thread, even while the main one is blocked in a collective


def die_with_launcher(prefix: str = "") -> None:
    """Under torchrun, make this process end within about a second of its agent."""
    if not under_torchrun():
        return
    parent = os.getppid()
    _set_pdeathsig()
    if parent == 1:
        if init_is_our_agent():  # the agent is PID 1: the kernel ends us with it
            return
        # Adopted by init: the agent died before we looked.
        print(f"{prefix}error: the torchrun agent is gone (this worker was adopted by PID 1, "
              f"{_command(1)!r}, which is not a torchrun agent); this worker exits.",
              file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, prefix), name="launcher-watchdog",
                     daemon=True).start()
