"""The run-directory lock: one live process trains a run directory at a time.

Owns ``<run_dir>/.lock``: an ``flock`` held while a run (the trainer's rank 0,
or a sweep for the run it is training) lives, and inside it the holder's pid
and host, for the message that refuses a second run. The kernel drops an
``flock`` when its holder dies, even by ``kill -9``; a file that is not locked
but still names a holder on this host is that dead holder's: taken over with a
warning. A name from another host cannot be checked from here (a shared file
system may not pass ``flock`` between hosts): it is refused, unless the user
says explicitly that no run is alive there (``logging.take_over_lock``, which
``launch/slurm.sbatch`` passes on a requeue).

Only ``EWOULDBLOCK``/``EAGAIN``/``EACCES`` from ``flock`` mean "held". A file
system without ``flock`` (``ENOSYS``, ``ENOLCK``, ``EOPNOTSUPP``: Lustre
without ``-o flock``, some FUSE and NFS mounts) cannot enforce the lock: the
run goes on with a one-line warning naming the file system. Any other errno is
a broken file system, not a busy one: a ``UserError`` naming it and the file.

A sweep holds the lock of the run it trains and tells the trainer so
(``child_env``): the trainer then runs under the sweep's lock instead of
refusing it. Does not own what a run writes (``train.py``) or what a sweep
records (``sweep/runner.py``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
from typing import Optional

from locmoe_train.errors import UserError

NAME = ".lock"
ENV = "LOCMOE_RUN_LOCK_HOLDER"  # the pid of a parent that holds this run's lock for us
HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
_warned: set[str] = set()  # paths already warned about, once per process


def file_system(path: str) -> str:
    """``"TYPE at MOUNTPOINT"`` of the mount that holds ``path`` (from /proc/self/mounts)."""
    real, best = os.path.realpath(path), None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= len(best[0])):  # last mount on top
                    best = (point, fields[2])
    except OSError:
        pass
    return f"{best[1]} at {best[0]}" if best else "a file system of unknown type"


def _flock(f, path: str) -> str:
    """Try to take ``f``'s flock: "locked", "held" (by a live process) or "unsupported"."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno))
        if e.errno in HELD:
            return "held"
        if e.errno in UNSUPPORTED:
            if path not in _warned:
                _warned.add(path)
                print(f"warning: the run lock {path} is not enforced: its file system "
                      f"({file_system(path)}) does not support flock ({code}: {e.strerror}); "
                      f"this run goes on, but nothing stops a second run on "
                      f"{os.path.dirname(path)}: make sure only one run uses it.",
                      file=sys.stderr, flush=True)
            return "unsupported"
        raise UserError(f"cannot lock {path}: flock failed with {code} ({e.strerror}) on "
                        f"{file_system(path)}; check that file system, or give this run a "
                        f"logging.run_dir on another one.") from e
    return "locked"


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


def _elsewhere(info: Optional[dict]) -> bool:
    return bool(info) and info.get("host") != socket.gethostname()


def _other_host(path: str, info: dict) -> UserError:
    return UserError(
        f"{path} names pid {info.get('pid')} on host {info.get('host')}, which cannot be "
        f"checked from {socket.gethostname()}. If no run is alive there (a killed or requeued "
        f"job), start again with --logging.take_over_lock=true (launch/slurm.sbatch passes it "
        f"on a requeue), or delete {path}.")


def _probe(run_dir: str) -> tuple[str, Optional[dict]]:
    """The lock's state ("free", "held", "unsupported") and the holder its file names."""
    path = os.path.join(run_dir, NAME)
    if not os.path.exists(path):
        return "free", None
    with open(path, "a+") as f:
        state = _flock(f, path)
        if state == "locked":
            fcntl.flock(f, fcntl.LOCK_UN)
            state = "free"
        return state, _holder(f)


def held_by(run_dir: str) -> Optional[str]:
    """Who holds ``run_dir``'s lock ("pid N on host H"), or None when nobody does (or
    its file system cannot tell)."""
    state, info = _probe(run_dir)
    return _describe(info) if state == "held" else None


class RunLock:
    """A lock on one run directory; ``release()`` (or process death) lets go.

    ``mode``: "held" (our flock), "parent" (a sweep holds it for us) or
    "unenforced" (the file system has no flock; warned about)."""

    def __init__(self, run_dir: str, f, mode: str = "held"):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, NAME)
        self.file, self.mode = f, mode
        self.created = False  # we made run_dir: removed again if left empty
        self.made_file = False  # an unenforced lock's file that we created: removed again

    @property
    def owned(self) -> bool:
        return self.mode == "held"

    @classmethod
    def try_acquire(cls, run_dir: str, take_over: bool = False) -> "RunLock | str":
        """The lock, or a description of its live holder. Takes over a dead holder's
        lock with a warning on stderr; one that names another host only with
        ``take_over`` (``UserError`` otherwise). Never one that is held."""
        created = not os.path.isdir(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, NAME)
        while True:
            existed = os.path.exists(path)
            f = open(path, "a+")
            try:
                state = _flock(f, path)
            except UserError:
                f.close()
                raise
            if state == "unsupported":
                lock = cls(run_dir, f, "unenforced")
                lock.created, lock.made_file = created, not existed
                return lock
            if state == "held":
                info = _holder(f)
                if info and str(info.get("pid")) == os.environ.get(ENV):
                    return cls(run_dir, f, "parent")  # our sweep's: it is held for us
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
        if _elsewhere(previous):
            if not take_over:
                f.close()
                raise _other_host(path, previous)
            print(f"warning: taking over the lock of {run_dir} left by pid {previous.get('pid')} "
                  f"on host {previous.get('host')} (logging.take_over_lock=true: no run is "
                  f"alive there)", file=sys.stderr, flush=True)
        elif previous:
            print(f"warning: taking over the stale lock of {run_dir} (pid {previous.get('pid')} "
                  f"on {socket.gethostname()} is gone)", file=sys.stderr, flush=True)
        lock = cls(run_dir, f)
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
        A lock held for us by a parent stays with it; an unenforced one only removes
        the file it created (there is no flock to undo)."""
        if self.file.closed:
            return
        if self.owned or self.made_file:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        if self.owned:
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


def acquire(run_dir: str, take_over: bool = False) -> RunLock:
    """The lock on ``run_dir``; ``UserError`` (exit 2) while a live process holds it, or
    when it names another host and ``take_over`` is off."""
    lock = RunLock.try_acquire(run_dir, take_over)
    if isinstance(lock, str):
        raise _in_use(run_dir, lock)
    return lock


def check_free(run_dir: str, take_over: bool = False) -> None:
    """``UserError`` where ``acquire`` would refuse ``run_dir`` (takes nothing)."""
    state, info = _probe(run_dir)
    if state == "held":
        raise _in_use(run_dir, _describe(info))
    if state == "free" and _elsewhere(info) and not take_over:
        raise _other_host(os.path.join(run_dir, NAME), info)
