"""Workers never outlive their launcher: a torchrun worker dies with its agent.

Owns what a worker does, from the first line of ``main``, when its torchrun
agent goes away (``kill -9``, an OOM kill, a lost job step): the kernel sends
it ``SIGKILL`` (Linux ``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread that
polls ``os.getppid()`` ends it too where that is unavailable or did not fire
(the parent died before the call). Either way the worker stops at once: its
peers may be gone, so a clean stop would hang in a collective, and it must not
publish a checkpoint. A signal handler could not help: Python runs them only
between bytecodes, never while the main thread waits inside gloo or NCCL.

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
    if parent == 1:  # already re-parented to init: the agent died before we looked
        print(f"{prefix}error: the torchrun agent is gone; this worker exits.",
              file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, prefix), name="launcher-watchdog",
                     daemon=True).start()
