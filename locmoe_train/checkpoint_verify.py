"""Checkpoint file checksums and file names: what ``meta.json`` may name, and whether
each file still holds the bytes that were saved.

A file is hashed just after it is written, while ``fsync`` waits for the disk
(``sync_and_checksum``): the bytes are read back from the page cache on one core as
the disk takes them, so the hash adds next to no time to a save (hashing inside
``torch.save``'s writes instead cost 20-25% of the save in our measurements, see
``scripts/bench_checksum.py``). Rank 0 stores every file's checksum in
``meta.json["checksums"]`` as ``{"shards_rank00000.pt": "crc32:1a2b3c4d"}``, next to
the sizes in ``meta["files"]`` that older versions read. ``check_files`` compares
both with the directory: the sizes always, the checksums when asked (that reads
every byte). A checkpoint saved before checksums existed has no such key and is
checked by size only.

Why CRC-32 (``zlib.crc32``): it is the fastest hash in the standard library on the
machines we measured (about 3x the speed of writing and fsyncing the same file, 2x
SHA-256), and what is guarded against is damage (bit rot, a torn or overwritten
copy), not forgery: whoever can rewrite a shard can rewrite ``meta.json`` too. The
``crc32:`` prefix leaves room for another algorithm.

Names: every file a checkpoint's ``meta.json`` names is opened inside the
checkpoint's directory; ``name_problem`` refuses a name that could lead outside it.

Not owned: the layout and saving of checkpoints (``checkpoint.py``), how a file is
unpickled (``checkpoint_io.py``).
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

ALGO = "crc32"
# Bytes read per call when hashing: 1 MiB hashes as fast as 4 MiB (2.4 GB/s from the page
# cache here) and is all the memory a save adds beyond the tensors (issue 24).
_CHUNK = 1 << 20


def name_problem(name) -> Optional[str]:
    """None if ``name`` is a plain file name inside a checkpoint directory, else why not."""
    if not isinstance(name, str) or not name:
        return "it is not a file name"
    if "\0" in name:
        return "it contains a NUL character"
    if os.path.isabs(name) or "/" in name or "\\" in name:
        return "it is a path, not a name inside the checkpoint directory"
    if name in (".", ".."):
        return "it names a directory"
    return None


def bad_name(name) -> Optional[str]:
    """What is wrong with a file name read from meta.json, for a message; None if fine."""
    why = name_problem(name)
    if why is None:
        return None
    return (f"meta.json names the file {name!r}, which is refused: {why} (meta.json was "
            f"altered; a checkpoint's files are plain names inside its directory)")


def sync_and_checksum(f, path: str) -> str:
    """fsync ``f`` (the file at ``path``, written and flushed) and return its checksum,
    read back while the fsync runs (both release the GIL). An fsync error (a full
    disk, EIO) is raised here, as a plain ``os.fsync`` would raise it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync") as pool:
        synced = pool.submit(os.fsync, f.fileno())
        try:
            checksum = file_checksum(path)
        finally:
            synced.result()
    return checksum


def file_checksum(path: str) -> str:
    """The ``ALGO`` checksum of the file at ``path`` (read in chunks into one buffer)."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return f"{ALGO}:{crc:08x}"


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` of ``world`` hashes: each file to the rank with the
    fewest bytes so far, largest first, so that every rank reads about as much."""
    load = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[name]
        if r == rank:
            mine.append(name)
    return mine


def check_files(path: str, meta: dict, checksums: bool = True, rank: int = 0,
                world: int = 1) -> Optional[str]:
    """None if every file ``meta.json`` lists is in ``path`` with its size and (with
    ``checksums``, for this rank's ``share`` of them) its checksum, else what is wrong.
    A checkpoint without checksums (older versions) is checked by size only."""
    files = meta.get("files")
    if not isinstance(files, dict):
        return "meta.json lists no files"
    sums = meta.get("checksums")
    if sums is not None and not isinstance(sums, dict):
        return "meta.json's checksums are not a mapping of file names"
    for file in list(files) + [f for f in sums or {} if f not in files]:
        problem = bad_name(file)
        if problem is not None:
            return problem
    tensors = meta.get("tensors")
    for key, entries in tensors.items() if isinstance(tensors, dict) else ():
        for entry in entries if isinstance(entries, list) else ():
            file = entry.get("file") if isinstance(entry, dict) else None
            if file not in files:
                return bad_name(file) or (f"meta.json puts {key} in {file!r}, which is not "
                                          f"one of its files")
    for file, size in files.items():
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            return f"{file} is missing"
        if os.path.getsize(full) != size:
            return f"{file} has {os.path.getsize(full)} bytes, expected {size} (truncated?)"
    if sums is None:
        return None
    for file in files:
        if file not in sums:
            return f"meta.json has no checksum for {file}, though it has for other files"
    for file in sums:
        if file not in files:
            return f"meta.json has a checksum for {file}, which is not one of its files"
    if not checksums:
        return None
    for file in share(files, rank, world):
        stored = sums[file]
        algo = stored.split(":", 1)[0] if isinstance(stored, str) else None
        if algo != ALGO:
            return (f"{file} has a checksum of unknown kind {stored!r} (this version "
                    f"checks {ALGO}); a newer version saved it, or meta.json was altered")
        found = file_checksum(os.path.join(path, file))
        if found != stored:
            return (f"{file} does not match its checksum (meta.json: {stored}, file: "
                    f"{found}): it was damaged or overwritten after the save")
    return None


def agree(problem: Optional[str]) -> Optional[str]:
    """The first problem any rank found (by rank order), on every rank: a collective over
    the default process group, so that all ranks take the same checkpoint."""
    import torch.distributed as dist

    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p is not None), None)
