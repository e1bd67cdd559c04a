"""How much checkpoint checksums cost: hash speeds against the speed of saving a file.

    python scripts/bench_checksum.py                       # 256 MB, 5 repeats, in runs/bench_checksum
    python scripts/bench_checksum.py --mb 1024 --dir /scratch/ckpt --out bench_checksum.json

Measures, in MB/s (10^6 bytes per second; the best of ``--repeats`` runs):

* ``hash``: each candidate over an in-memory buffer of random bytes, fed in
  4 MiB pieces: ``zlib.crc32`` and ``zlib.adler32``
  and hashlib's md5, sha1, sha256, blake2b (the standard library; nothing to install);
* ``save_with_fsync``: ``torch.save`` of a tensor dict of that size plus flush and
  fsync, into a new folder in ``--dir`` (removed after): ``plain``; ``crc32_during_fsync``, the file read back and
  hashed while the fsync runs (``checkpoint_verify.sync_and_checksum``, what
  ``checkpoint.save_synced`` does); and, the alternatives, the CRC-32 or SHA-256
  taken inside ``torch.save``'s writes (``*_while_writing``: nothing read back, but
  the hash runs in line with the writes);
* ``verify_crc32_page_cache``: reading the saved file back and taking its CRC-32
  (``checkpoint_verify.file_checksum``, what validation does). The file was just
  written, so it is read from the page cache: a cold read from a disk or a
  network file system is slower, and then the read, not the hash, sets the pace.

Writes one JSON object (``--out``, else stdout) with the numbers, the machine and
the versions. The figures in the README come from this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from locmoe_train.checkpoint_verify import file_checksum, sync_and_checksum  # noqa: E402

PIECE = 4 << 20
HASHLIB = ("md5", "sha1", "sha256", "blake2b")


def _best(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hash_speeds(data: bytes, repeats: int) -> dict[str, float]:
    view = memoryview(data)
    pieces = [view[i:i + PIECE] for i in range(0, len(data), PIECE)]

    def running(update, start):
        def run():
            value = start
            for piece in pieces:
                value = update(piece, value)
        return run

    def hashlib_run(name):
        def run():
            h = hashlib.new(name)
            for piece in pieces:
                h.update(piece)
            h.digest()
        return run

    runs = {"crc32": running(zlib.crc32, 0), "adler32": running(zlib.adler32, 1),
            **{name: hashlib_run(name) for name in HASHLIB}}
    return {name: round(len(data) / 1e6 / _best(run, repeats)) for name, run in runs.items()}


class _HashingWriter:
    """Hashes what ``torch.save`` writes, as it passes (``update(data)``)."""

    def __init__(self, f, update):
        self.f, self.update = f, update

    def write(self, data) -> int:
        self.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _crc32_updater():
    state = [0]

    def update(data):
        state[0] = zlib.crc32(data, state[0])
    return update


def save_speeds(obj: dict, path: str, repeats: int) -> dict[str, float]:
    def saver(wrap=None, during_fsync=False):
        def run():
            with open(path, "wb") as f:
                torch.save(obj, wrap(f) if wrap else f)
                f.flush()
                if during_fsync:
                    sync_and_checksum(f, path)
                else:
                    os.fsync(f.fileno())
        return run

    runs = {"plain": saver(),
            "crc32_during_fsync": saver(during_fsync=True),
            "crc32_while_writing": saver(lambda f: _HashingWriter(f, _crc32_updater())),
            "sha256_while_writing": saver(lambda f: _HashingWriter(f, hashlib.sha256().update))}
    out = {}
    for _ in range(2):  # interleaved rounds: a burst of load on the machine hits every way
        for name, run in runs.items():
            seconds = _best(run, repeats)
            speed = round(os.path.getsize(path) / 1e6 / seconds)
            out[name] = max(out.get(name, 0), speed)
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="size of the buffer and the file, MB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=os.path.join(REPO, "runs", "bench_checksum"),
                    help="a folder on the file system your checkpoints go to: the test file "
                         "is written into a new folder in it, removed after")
    ap.add_argument("--out", help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)

    nbytes = args.mb * 1_000_000
    data = os.urandom(nbytes)
    obj = {"weights": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    os.makedirs(args.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench_checksum_", dir=args.dir)
    path = os.path.join(scratch, "bench.pt")
    try:
        saves = save_speeds(obj, path, args.repeats)
        verify = round(os.path.getsize(path) / 1e6 / _best(lambda: file_checksum(path),
                                                             args.repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"mb": args.mb, "repeats": args.repeats, "unit": "MB/s (best of repeats)",
              "hash": hash_speeds(data, args.repeats), "save_with_fsync": saves,
              "verify_crc32_page_cache": verify,
              "machine": {"cpu": _cpu_name(),
                          "cores": os.cpu_count(), "python": platform.python_version(),
                          "zlib": zlib.ZLIB_RUNTIME_VERSION, "torch": torch.__version__}}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
