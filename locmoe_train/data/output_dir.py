"""The output directory of ``prepare-data``: is it already prepared, whose are the work
directories beside it, and the swap of a finished dataset into place.

* ``recorded_args(args)`` -- the options that determine the output (``meta["args"]``).
* ``input_stamp(inputs)`` -- per input path: its files, their bytes and a digest
  of every file's name, size and modification time (``meta["inputs"]``). A
  content fingerprint would mean reading the corpus again; the stamp is one
  ``stat`` per file, and an edit changes the mtime.
* ``existing_output_note(...)`` -- "already prepared" only when the options and
  the input stamp both match; a dataset whose inputs changed is refused, never
  deleted behind the user's back (a training run may be reading it): ``--force``
  rebuilds it. ``refuse_bad_records_if_strict``: --strict does not accept one
  built by skipping records.
* ``clear_leftovers(output)`` -- ``OUTPUT.tmp-<pid>`` directories of runs that
  were killed. A work directory records its host and pid (``OWNER_FILE``); one
  whose process is gone from this host is incomplete and ours to remove; one
  whose process still runs belongs to another ``prepare-data`` on the same
  output, which is refused; one from another host is left alone, since its
  process cannot be checked from here.
* ``make_work_dir(output)`` / ``publish(work_dir, output)``.

The dataset format itself and ``load_meta`` are ``prepare.py``'s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
from typing import Any, Callable, Dict, List, Optional

import psutil

from locmoe_train.data.corpus import describe_default_corpus, input_files
from locmoe_train.errors import UserError

# Written into a work directory when it is made, removed before it is renamed
# into place, so a finished dataset never holds it.
OWNER_FILE = ".prepare-data-owner.json"
# A process that started more than this after its supposed work directory was
# last modified cannot have made it: its pid was reused.
PID_REUSE_SLACK_S = 2.0


def recorded_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The options that determine the output; what 'already prepared' compares.

    --workers and --strict are left out: neither changes the bytes written.
    """
    return {
        "input": None if args.input is None else [os.path.abspath(p) for p in args.input],
        "tokenizer": args.tokenizer,
        "tokenizer_path": None if args.tokenizer_path is None
        else os.path.abspath(args.tokenizer_path),
        "vocab_size": args.vocab_size,
        "valid_fraction": args.valid_fraction,
        "max_bytes": args.max_bytes,
        "seed": args.seed,
    }


def input_stamp(inputs: Optional[List[str]]) -> List[Dict[str, Any]]:
    """Per input path (the default corpus for None): files, bytes, and a digest of
    every file's doc id stem, size and mtime in nanoseconds."""
    stamp = []
    for path in [None] if inputs is None else inputs:
        digest = hashlib.blake2b(digest_size=16)
        n_files = n_bytes = 0
        for full, stem in input_files(path):
            st = os.stat(full)
            digest.update(f"{stem}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
            n_files += 1
            n_bytes += st.st_size
        stamp.append({"path": describe_default_corpus() if path is None
                      else os.path.abspath(path),
                      "files": n_files, "bytes": n_bytes, "digest": digest.hexdigest()})
    return stamp


def describe_stamp_change(old: List[Dict[str, Any]], new: List[Dict[str, Any]]) -> str:
    """What differs between two stamps of the same input paths, for a message."""
    parts = []
    for was, now in zip(old, new):
        if was == now:
            continue
        what = []
        if was.get("files") != now["files"]:
            what.append(f"{was.get('files')} -> {now['files']} files")
        if was.get("bytes") != now["bytes"]:
            what.append(f"{was.get('bytes')} -> {now['bytes']} bytes")
        parts.append(f"{now['path']}: " + (", ".join(what) or "modified (same size)"))
    return "; ".join(parts) or "the list of input paths"


def existing_output_note(output: str, recorded: Dict[str, Any],
                         stamp: List[Dict[str, Any]], force: bool) -> Optional[str]:
    """None if ``output`` is free to (re)build; if it already holds this exact dataset,
    the note to print; errors if it holds something else or was made from other inputs."""
    from locmoe_train.data.prepare import META_FILE, load_meta

    if not os.path.exists(output):
        return None
    if not os.path.isdir(output):
        raise UserError(f"--output {output!r} is a file, not a directory; choose another --output")
    if force:
        return None
    if not os.path.exists(os.path.join(output, META_FILE)):
        if not os.listdir(output):
            return None  # an empty directory is free to use
        raise UserError(
            f"--output {output!r} exists and is not a prepared dataset (no {META_FILE}); pass "
            "--force to replace its contents or choose another --output"
        )
    meta = load_meta(output)
    old = meta.get("args", {})
    if old != recorded:
        changed = ", ".join(
            f"{key}: {old.get(key)!r} -> {recorded.get(key)!r}"
            for key in sorted(set(old) | set(recorded)) if old.get(key) != recorded.get(key)
        )
        raise UserError(
            f"--output {output!r} already holds data prepared with different options "
            f"({changed}); pass --force to overwrite it or choose another --output"
        )
    if "inputs" not in meta:
        return ("same options; prepared by a version that did not record its inputs' sizes "
                "and times, so changed inputs go unnoticed: pass --force to rebuild")
    if meta["inputs"] != stamp:
        raise UserError(
            f"--output {output!r} was prepared from inputs that have changed since "
            f"({describe_stamp_change(meta['inputs'], stamp)}); pass --force to prepare it "
            "again from the current inputs (the old dataset is replaced only once the new one "
            "is complete), or choose another --output"
        )
    return "same options and inputs; pass --force to rebuild"


def refuse_bad_records_if_strict(strict: bool, output: str) -> None:
    """--strict must not accept an existing dataset that was built by skipping records."""
    if not strict:
        return
    from locmoe_train.data.prepare import load_meta

    bad = load_meta(output).get("bad_records", {})
    n_bad = bad.get("skipped", 0) + bad.get("replaced_text_lines", 0)
    if n_bad:
        first = (bad.get("examples") or ["?"])[0]
        raise UserError(f"--output {output!r} was prepared from these inputs with {n_bad} bad "
                        f"record(s) (first: {first}), which --strict refuses; fix the input and "
                        "rerun with --force")


def _read_owner(work_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(work_dir, OWNER_FILE), "r", encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # killed before it was written, or made by an older version


def _still_running(pid: int, work_dir: str) -> bool:
    """Whether process ``pid`` of this host may be the one writing ``work_dir``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's live process: not ours to judge
    return started <= os.stat(work_dir).st_mtime + PID_REUSE_SLACK_S


def clear_leftovers(output: str, log: Callable[[str], None]) -> None:
    """Remove the ``OUTPUT.tmp-<pid>`` work directories of killed runs on this host."""
    target = os.path.abspath(output)
    parent, prefix = os.path.dirname(target), os.path.basename(target) + ".tmp-"
    if not os.path.isdir(parent):
        return
    host = socket.gethostname()
    for name in sorted(os.listdir(parent)):
        pid_text = name[len(prefix):]
        if not name.startswith(prefix) or not pid_text.isdigit():
            continue
        work_dir, pid = os.path.join(parent, name), int(pid_text)
        if pid == os.getpid():
            continue  # this process's own: make_work_dir replaces it
        owner_host = _read_owner(work_dir).get("host", host)
        if owner_host != host:
            log(f"leaving {work_dir} alone: it belongs to a run on host {owner_host} (pid "
                f"{pid}), which cannot be checked from here; delete it once that run is gone")
            continue
        try:
            running = _still_running(pid, work_dir)
        except FileNotFoundError:
            continue  # its run just finished and renamed it into place
        if running:
            raise UserError(
                f"another prepare-data (pid {pid}) is writing --output {output!r} (work "
                f"directory {work_dir!r}); wait for it to finish or choose another --output "
                f"(if pid {pid} is not a prepare-data run, delete {work_dir!r})")
        shutil.rmtree(work_dir)
        log(f"removed {work_dir}: the incomplete work directory of a run that was killed "
            f"(pid {pid} no longer runs)")


def make_work_dir(output: str) -> str:
    """A fresh ``OUTPUT.tmp-<pid>`` that records its owner."""
    work_dir = f"{os.path.abspath(output)}.tmp-{os.getpid()}"
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    with open(os.path.join(work_dir, OWNER_FILE), "w", encoding="utf-8") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    return work_dir


def publish(work_dir: str, output: str) -> None:
    """Swap the finished ``work_dir`` in as ``output``, atomically: an old directory
    (--force) is moved aside first and deleted only once the new one is in place."""
    os.remove(os.path.join(work_dir, OWNER_FILE))
    trash = f"{os.path.abspath(output)}.old-{os.getpid()}"
    if os.path.exists(output):
        os.rename(output, trash)
    os.rename(work_dir, output)
    shutil.rmtree(trash, ignore_errors=True)
