"""Checkpoint directories: which step directories are a run's history, and every change to them.

A checkpoint directory holds complete ``step_NNNNNNNN/`` directories, at most
one ``step_N.tmp/`` being written, a ``latest`` file naming the newest complete
one, and ``superseded-<UTC time>/`` directories holding step directories that
were moved aside. Shared by pre-training (``checkpoint.py``) and the Ada-K
stage (``adak/stage.py``); neither touches the directory other than through
this module. What is inside a step directory, and whether it is valid (the
``validate`` callables passed in), is theirs.

The history rule: the step directories in a checkpoint directory are one
run's lineage, and ``latest`` names its newest. So
* a run that does not continue that lineage (a fresh start, or a resume from a
  checkpoint elsewhere) is refused while step directories are there, unless
  the user asks to move them aside (``check_fresh_start``, ``move_aside_all``);
* a resume from step S moves every step directory newer than S aside and
  points ``latest`` at S (``resume_point``): the run's saves replace that
  future, and nothing it holds is lost;
* pruning after a save of step S keeps the ``keep`` newest of the directories
  numbered up to S and never touches a newer one (``publish_step_dir``).
Only rank 0 changes the directory; the other ranks learn its decisions by a
broadcast. Nothing here deletes a complete checkpoint except that pruning.

A save that fails with an ``OSError`` (a full volume, say) is agreed on by every rank
before anything is published (``StepWrite``): every rank raises ``SaveFailed``
together, rank 0 removes the partial ``step_N.tmp`` and builds the user's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from typing import Callable, Optional

import torch.distributed as dist

from locmoe_train.errors import UserError

STEP_NAME = re.compile(r"step_(\d+)")
LATEST = "latest"
MOVE_OPTION = "--checkpoint.existing=move_aside"


def barrier(pctx) -> None:
    if pctx.world_size > 1:
        dist.barrier()


def checkpoint_dir(cfg) -> str:
    """``checkpoint.dir``, else ``<logging.run_dir>/checkpoints``."""
    return cfg.checkpoint.dir or os.path.join(cfg.logging.run_dir, "checkpoints")


def step_number(name: str) -> Optional[int]:
    """``step_00000300`` -> 300; None for any other name (``step_3.tmp``, ``latest``)."""
    m = STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def step_dirs(ckpt_dir: str) -> list[str]:
    """The names of the (renamed, so once complete) step directories, oldest step first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir)
             if step_number(n) is not None and os.path.isdir(os.path.join(ckpt_dir, n))]
    return sorted(names, key=step_number)


def read_latest(ckpt_dir: str) -> tuple[Optional[str], Optional[str]]:
    """``(name, None)`` when ``latest`` names a step directory beside it, else ``(None, what is
    wrong)``. Only a bare ``step_N`` name is accepted: a pointer with ``/``, ``\\`` or ``..`` or
    an absolute path would lead a resume out of the checkpoint directory."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None, "is missing"
    try:
        with open(path) as f:
            name = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"is unreadable ({e})"
    if step_number(name) is None:
        return None, (f"holds {name[:200]!r}, which is not the name of a step_* directory beside "
                      f"it (no '/', '\\', '..' or absolute path)")
    return name, None


def _write_latest(ckpt_dir: str, name: str) -> str:
    """Write ``latest.tmp`` naming ``name``; ``os.replace`` it onto ``latest`` to publish."""
    tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_aside(ckpt_dir: str, names: list[str]) -> str:
    """Rename the step directories ``names`` into a new ``<ckpt_dir>/superseded-<UTC time>/``
    (same file system: nothing is copied or deleted); returns it. Its own ``latest`` names
    the newest of them, so it can be inspected or resumed from like any checkpoint dir."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = os.path.join(ckpt_dir, f"superseded-{stamp}"), 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(ckpt_dir, f"superseded-{stamp}-{n}")
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(ckpt_dir, name), os.path.join(dest, name))
    os.replace(_write_latest(dest, max(names, key=step_number)), os.path.join(dest, LATEST))
    _fsync_dir(dest)
    _fsync_dir(ckpt_dir)
    return dest


# ---- a run's place in the history ------------------------------------------------------

def foreign_checkpoints(ckpt_dir: str, resume: Optional[str]) -> list[str]:
    """The step directories in ``ckpt_dir`` that a run resuming from ``resume`` does not
    continue: all of them on a fresh start (None) or a resume from a checkpoint elsewhere."""
    if resume == "auto":
        return []
    if resume is not None and os.path.realpath(os.path.dirname(os.path.abspath(resume))) \
            == os.path.realpath(ckpt_dir):
        return []
    return step_dirs(ckpt_dir)


def check_fresh_start(ckpt_dir: str, resume: Optional[str], existing: str) -> None:
    """UserError when this run would start a new history among another run's checkpoints
    and ``checkpoint.existing`` is ``refuse``. Read-only: every rank, and ``--check``, call it."""
    found = foreign_checkpoints(ckpt_dir, resume)
    if not found or existing == "move_aside":
        return
    shown = ", ".join(found[-3:]) + (f" and {len(found) - 3} older" if len(found) > 3 else "")
    start = ("starts from step 0 (checkpoint.resume=null)" if resume is None else
             f"continues {resume}, which is not in that directory")
    raise UserError(
        f"checkpoint directory {ckpt_dir} already holds checkpoints of another run ({shown}); "
        f"this run {start}, and its saves would mix with them. Either continue them with "
        f"--checkpoint.resume=auto, or give this run another --checkpoint.dir or "
        f"--logging.run_dir, or move them aside with {MOVE_OPTION} (nothing is deleted).")


def move_aside_all(ckpt_dir: str, resume: Optional[str]) -> Optional[str]:
    """Rank 0, with ``checkpoint.existing=move_aside``: move another run's step directories
    (``foreign_checkpoints``) and ``latest`` aside and say where; returns the new place."""
    found = foreign_checkpoints(ckpt_dir, resume)
    if not found:
        return None
    try:
        dest = move_aside(ckpt_dir, found)
        if os.path.exists(os.path.join(ckpt_dir, LATEST)):
            os.remove(os.path.join(ckpt_dir, LATEST))  # it named one of them; dest has its copy
    except OSError as e:
        raise UserError(f"cannot move the checkpoints in {ckpt_dir} aside ({e}); nothing was "
                        f"trained. Give this run another checkpoint.dir.") from None
    print(f"note: moved the {len(found)} checkpoints of the earlier run in {ckpt_dir} to {dest}/ "
          f"({MOVE_OPTION})", flush=True)
    return dest


def find_resume(resume: Optional[str], ckpt_dir: str, key: str, validate,
                warn: bool = False) -> Optional[str]:
    """The checkpoint to resume from (read-only). ``resume`` is the value of config key ``key``:
    None = fresh start; a path, which must be valid; "auto" = the one ``latest`` names, or,
    when ``latest`` is missing or damaged or names an unusable checkpoint, the newest valid
    step directory (with a warning when ``warn``). UserError when "auto" finds step
    directories but none is valid. ``validate(path)`` returns None or what is wrong."""
    if resume is None:
        return None
    if resume != "auto":
        problem = validate(resume)
        if problem:
            raise UserError(f"{key}={resume!r}: {problem}")
        return resume
    names = step_dirs(ckpt_dir)
    if not names:
        return None  # nothing saved yet: start fresh
    latest, problem = read_latest(ckpt_dir)
    if latest is not None:
        problem = validate(os.path.join(ckpt_dir, latest))
        if problem is None:
            return os.path.join(ckpt_dir, latest)
        problem = f"names {latest}, which is not usable: {problem}"
    say = (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True)) if warn else \
        (lambda msg: None)
    say(f"{os.path.join(ckpt_dir, LATEST)} {problem}; {key}=auto takes the newest valid "
        f"checkpoint instead")
    damaged = []
    for name in reversed(names):
        path = os.path.join(ckpt_dir, name)
        problem = validate(path)
        if problem is None:
            return path
        damaged.append(f"{name} ({problem})")
        say(f"skipping checkpoint {path}: {problem}")
    aside = (f", or start over here with {key}=null and {MOVE_OPTION[2:]}, which moves them "
             f"aside" if key == "checkpoint.resume" else "")
    raise UserError(
        f"{key}=auto: every checkpoint in {ckpt_dir} is damaged: {'; '.join(damaged)}. Nothing "
        f"was started or changed. Resume from a repaired one with {key}=PATH, or start over "
        f"in another directory{aside}.")


def roll_back(ckpt_dir: str, path: str) -> Optional[str]:
    """Rank 0, resuming from ``path``: when it is a step directory of ``ckpt_dir``, move the
    newer ones aside (the run is about to write its own) and point ``latest`` at ``path``, so
    that it never names a moved directory. Returns where they went, or None."""
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != os.path.realpath(ckpt_dir):
        return None
    name = os.path.basename(os.path.normpath(path))
    step = step_number(name)
    if step is None:
        return None
    newer = [n for n in step_dirs(ckpt_dir) if step_number(n) > step]
    dest = move_aside(ckpt_dir, newer) if newer else None
    if dest:
        print(f"note: resuming from step {step}: moved the newer checkpoints "
              f"{', '.join(newer)} to {dest}/", flush=True)
    if read_latest(ckpt_dir)[0] != name:
        os.replace(_write_latest(ckpt_dir, name), os.path.join(ckpt_dir, LATEST))
        _fsync_dir(ckpt_dir)
    return dest


def on_main(pctx, decide: Callable[[], object]):
    """``decide()`` on rank 0 only, its result (or its UserError) on every rank. An OSError
    there (moving checkpoints aside) becomes a UserError too: no rank waits for a dead one."""
    box = [None]
    if pctx.is_main:
        try:
            box[0] = ("ok", decide())
        except (UserError, OSError) as e:
            box[0] = ("error", str(e))
    if pctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def resume_point(resume: Optional[str], ckpt_dir: str, key: str, validate, pctx,
                 verify: Optional[Callable[[str], Optional[str]]] = None) -> Optional[str]:
    """``find_resume`` decided on rank 0 (its warnings there), then ``roll_back`` there;
    every rank gets the same path (or UserError) and leaves after the directory is settled.

    ``validate`` runs on rank 0 alone, so it must be cheap (sizes, names); ``verify``, if
    given, is the collective check of the chosen checkpoint's contents (checksums, each
    rank reading its share), called on every rank. A checkpoint it refuses is skipped as
    ``validate`` would skip it: ``auto`` takes the next one, an explicit path exits 2."""
    refused: dict[str, str] = {}

    def checked(path: str) -> Optional[str]:
        return refused.get(os.path.realpath(path)) or validate(path)

    while True:
        path = on_main(pctx, lambda: find_resume(resume, ckpt_dir, key, checked, warn=True))
        problem = verify(path) if path is not None and verify is not None else None
        if problem is None:
            break
        if resume != "auto":
            raise UserError(f"{key}={resume!r}: {problem}")
        refused[os.path.realpath(path)] = problem

    if path is not None:
        on_main(pctx, lambda: roll_back(ckpt_dir, path))
    return path


# ---- writing one step directory -------------------------------------------------------

class SaveFailed(Exception):
    """A checkpoint could not be written (an ``OSError``); every rank raises it together.
    ``message``: the one line for the user, on rank 0 (None on the others)."""

    def __init__(self, message: Optional[str]):
        super().__init__(message or "the checkpoint save failed (rank 0 says why)")
        self.message = message


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e``: itself, or the one a torch writer turned into a RuntimeError
    (``torch.save`` reports a failed write as an ``inline_container`` enforce failure)."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _mib(n: Optional[int]) -> str:
    return "an unknown amount" if n is None else f"{n / 2**20:.1f} MiB"


def _free(path: str) -> Optional[int]:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


class StepWrite:
    """One checkpoint that every rank writes into ``tmp`` and rank 0 publishes as ``final``.

    A write that fails with an OSError (``attempt``) is remembered and the rank goes on to
    the next agreement instead of raising: ``gather`` (after each rank's own files) and
    ``publish`` (after rank 0's). There every rank learns of any failure and raises
    ``SaveFailed``, so none is left waiting in a collective; rank 0 removes the partial
    ``step_N.tmp`` first. ``latest`` is untouched: it keeps naming the last good one."""

    def __init__(self, ckpt_dir: str, step: int, pctx, resume_key: str = "checkpoint.resume"):
        self.dir, self.step, self.pctx, self.resume_key = ckpt_dir, step, pctx, resume_key
        self.final = os.path.join(ckpt_dir, f"step_{step:08d}")
        self.tmp = f"{self.final}.tmp"
        self.error: Optional[str] = None  # this rank's failed write: "file: [Errno N] why"
        self.free: Optional[int] = None  # rank 0: free bytes when the save began
        self.planned = 0  # bytes of tensors the ranks set out to write
        self._start()

    def _start(self) -> None:  # rank 0 prepares step_N.tmp, the others wait for it
        if self.pctx.is_main:
            self.attempt(self.dir, self._begin)
        barrier(self.pctx)

    def _begin(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # a save of this step that did not finish
        self.free = shutil.disk_usage(self.dir).free
        os.makedirs(self.tmp)

    def attempt(self, what: str, write: Callable, *args):
        """``write(*args)`` (its result) unless this rank failed already; an OSError is
        kept, not raised (the result is then None)."""
        if self.error is not None:
            return None
        try:
            return write(*args)
        except (OSError, RuntimeError) as e:
            cause = _os_error(e)
            if cause is None:
                raise
            why = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
            self.error = f"{what}: {why}"

    def gather(self, item, nbytes: int = 0) -> list:
        """Every rank's ``item`` in rank order, once every rank has written its files;
        ``SaveFailed`` on every rank when one failed. ``nbytes``: what this rank wrote."""
        mine = (item, self.error, nbytes)
        gathered = [mine]
        if self.pctx.world_size > 1:
            gathered = [None] * self.pctx.world_size
            dist.all_gather_object(gathered, mine)
        self.planned = sum(g[2] for g in gathered)
        failed = [(rank, g[1]) for rank, g in enumerate(gathered) if g[1]]
        if failed:
            self._fail(*failed[0])
        return [g[0] for g in gathered]

    def publish(self, meta: Optional[dict], keep: int) -> str:
        """Rank 0 publishes (``publish_step_dir``); every rank waits for its outcome."""
        if self.pctx.is_main:
            self.attempt("meta.json", publish_step_dir, self.dir, self.tmp, self.final, meta, keep)
        box = [self.error]
        if self.pctx.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0]:
            self._fail(0, box[0])
        return self.final

    def _fail(self, rank: int, what: str):
        message = None
        if self.pctx.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.dir, LATEST + ".tmp"))
            message = self._message(rank, what)
        raise SaveFailed(message)

    def _message(self, rank: int, what: str) -> str:
        name, _ = read_latest(self.dir)
        last = os.path.join(self.dir, name) if name else None
        last = last if last and os.path.isdir(last) else None
        needed, basis = self.planned, "its tensors alone"
        # The last checkpoint's files: the best estimate of the next one's.
        with contextlib.suppress(OSError, TypeError, ValueError, KeyError, AttributeError):
            with open(os.path.join(last, "meta.json")) as f:
                needed, basis = sum(json.load(f)["files"].values()), f"the size of {name}"
        free = self.free if self.free is not None else _free(self.dir)
        where = f" (rank {rank})" if self.pctx.world_size > 1 else ""
        return (f"checkpoint of step {self.step} not saved in {self.dir}{where}: {what}; it "
                f"needs about {_mib(needed)} ({basis}) and {_mib(free)} was free when the save "
                f"began. Removed the partial {os.path.basename(self.tmp)}; the last complete "
                f"checkpoint is {last + ' (latest names it)' if last else 'none'}. Free space "
                f"or set checkpoint.dir to a larger volume, then continue with "
                f"--{self.resume_key}=auto.")


def publish_step_dir(ckpt_dir: str, tmp: str, final: str, meta: dict, keep: int) -> None:
    """Rank 0, after every file is in ``tmp``: write meta.json (it marks the checkpoint
    complete) and ``latest.tmp`` first, so that a full volume fails before anything is
    published; then rename ``tmp`` to ``final``, replace ``latest`` and prune the history
    (``keep`` newest up to this step). Each step is fsynced: a crash at any point leaves
    the previous checkpoint intact and ``latest`` valid."""
    meta = dict(meta, files={f: os.path.getsize(os.path.join(tmp, f))
                             for f in sorted(os.listdir(tmp))})
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    latest_tmp = _write_latest(ckpt_dir, os.path.basename(final))
    if os.path.exists(final):  # not after the history checks; still, never delete it
        dest = move_aside(ckpt_dir, [os.path.basename(final)])
        print(f"warning: {final} existed already; moved it to {dest}/", file=sys.stderr,
              flush=True)
    os.replace(tmp, final)
    os.replace(latest_tmp, os.path.join(ckpt_dir, LATEST))
    _fsync_dir(ckpt_dir)
    step = step_number(os.path.basename(final))
    history = [n for n in step_dirs(ckpt_dir) if step_number(n) <= step]
    for old in history[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def resolve(path: str) -> str:
    """A ``step_*`` directory as given, or the one a checkpoint directory's ``latest`` names
    (UserError naming the file when that is not a step directory beside it)."""
    if os.path.isfile(os.path.join(path, LATEST)):
        name, problem = read_latest(path)
        if problem is not None:
            raise UserError(f"{os.path.join(path, LATEST)} {problem}: give a step_* directory, "
                            f"or rewrite the file with the name of one.")
        return os.path.join(path, name)
    return path
