"""The run-directory lock: one live process trains a run directory at a time.

Owns ``<run_dir>/.lock``: an ``flock`` held while a run (the trainer's rank 0,
or a sweep for the run it is training) lives, and inside it the holder's pid
and host, for the message that refuses a second run. The kernel drops an
``flock`` when its holder dies, even by ``kill -9``; a file that is not locked
but still names a holder is that dead holder's: taken over with a warning.
A name from another host cannot be checked from here (a shared file system
may not pass ``flock`` between hosts), so it is refused with a hint.

A sweep holds the lock of the run it trains and tells the trainer so
(``child_env``): the trainer then runs under the sweep's lock instead of
refusing it. Does not own what
a run writes (``train.py``) or what a sweep records (``sweep/runner.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from typing import Optional

from locmoe_train.errors import UserError

NAME = ".lock"
ENV = "LOCMOE_RUN_LOCK_HOLDER"  # the pid of a parent that holds this run's lock for us


def _holder(f) -> Optional[dict]:
    f.seek(0)
    try:
        info = json.loads(f.read() or "null")
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')}"


def held_by(run_dir: str) -> Optional[str]:
    """Who holds ``run_dir``'s lock ("pid N on host H"), or None when nobody does."""
    path = os.path.join(run_dir, NAME)
    if not os.path.exists(path):
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _describe(_holder(f))
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class RunLock:
    """A held lock on one run directory; ``release()`` (or process death) lets go."""

    def __init__(self, run_dir: str, f, owned: bool):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, NAME)
        self.file, self.owned = f, owned
        self.created = False  # we made run_dir: removed again if left empty

    @classmethod
    def try_acquire(cls, run_dir: str) -> "RunLock | str":
        """The lock, or a description of its live holder. Takes over a dead holder's
        lock with a warning on stderr."""
        created = not os.path.isdir(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, NAME)
        while True:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                info = _holder(f)
                if info and str(info.get("pid")) == os.environ.get(ENV):
                    return cls(run_dir, f, owned=False)  # our sweep's: it is held for us
                f.close()
                return _describe(info)
            # A holder that released between our open and flock may have removed the
            # file: then this lock is on a dead inode; open the new file again.
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        previous = _holder(f)
        if previous:
            host = socket.gethostname()
            if previous.get("host") != host:
                f.close()
                raise UserError(
                    f"{path} names pid {previous.get('pid')} on host {previous.get('host')}, "
                    f"which cannot be checked from {host}: if no run is alive there, delete "
                    f"{path} and start again.")
            print(f"warning: taking over the stale lock of {run_dir} (pid {previous.get('pid')} "
                  f"on {host} is gone)", file=sys.stderr, flush=True)
        lock = cls(run_dir, f, owned=True)
        lock.created = created
        lock._write()
        return lock

    def _write(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        self.file.flush()

    def child_env(self) -> dict:
        """Environment entries that let a child train under this lock."""
        return {ENV: str(os.getpid())}

    def release(self) -> None:
        """Let go; the file goes too, so a lock file left behind means a dead holder.
        A lock held for us by a parent stays with it."""
        if self.file.closed:
            return
        if self.owned:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        if self.created:
            try:
                os.rmdir(self.run_dir)  # a run refused before writing anything
            except OSError:
                pass


def _in_use(run_dir: str, holder: str) -> UserError:
    return UserError(f"{run_dir} is in use by {holder}: wait for that run to end, stop it, "
                     f"or give this run another logging.run_dir.")


def acquire(run_dir: str) -> RunLock:
    """The lock on ``run_dir``; ``UserError`` (exit 2) while a live process holds it."""
    lock = RunLock.try_acquire(run_dir)
    if isinstance(lock, str):
        raise _in_use(run_dir, lock)
    return lock


def check_free(run_dir: str) -> None:
    """``UserError`` while a live process holds ``run_dir``'s lock (takes nothing)."""
    holder = held_by(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)

