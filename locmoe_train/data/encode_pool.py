"""Parallel, order-preserving tokenization of document chunks for ``prepare-data``.

This module owns turning chunks of ``(doc_id, text)`` into token arrays on N
worker processes while the caller writes the results in corpus order:

* ``ChunkEncoder(kind, path, workers)`` -- a context manager; ``map(chunks)``
  yields one ``EncodedChunk`` per input chunk, in input order. With
  ``workers=1`` it encodes in the calling process, single-threaded; otherwise
  on a ``concurrent.futures.ProcessPoolExecutor`` whose workers each load the
  tokenizer once (initializer) and encode with one thread. Both run the same
  ``_ChunkEncoding.encode``, so the output does not depend on the worker count.
* A worker that dies (SIGKILL from the out-of-memory killer, a crash) breaks
  the executor, which fails every pending chunk at once (``BrokenProcessPool``);
  ``map`` turns that into ``WorkerDied``, naming the documents that were in
  flight. ``multiprocessing.Pool``, used before, replaces a dead worker and
  loses its task, so the caller waited forever.
* ``bounded_ordered_map`` -- at most ``window`` chunks are submitted and not
  yet consumed, so memory does not grow with the input (``Pool.imap`` would
  read its whole input ahead).
* ``default_workers()`` -- the CPUs this process may run on.

It does not read files or decide splits: that is ``corpus.py`` and
``prepare.py``.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Deque, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from locmoe_train.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from locmoe_train.errors import UserError

Document = Tuple[str, str]
# Chunks in flight per worker: one being encoded, one queued behind it.
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# Test hook, "INDEX:FILE": the worker that takes chunk INDEX (0-based) writes its pid
# to FILE and waits there for up to STALL_SECONDS, so that a test can SIGKILL a worker
# known to be mid-chunk, or the main process while it waits for that chunk. The parent
# reads it and hands it to the workers (a forkserver's children keep the environment
# the forkserver started with).
STALL_ENV = "LOCMOE_PREPARE_STALL_CHUNK"
STALL_SECONDS = 120


class WorkerDied(UserError):
    """A tokenizer worker process died; the message names the input in flight."""


class EncodedChunk(NamedTuple):
    """A chunk's documents as one token array (EOD after each) plus per-doc lengths."""

    doc_ids: List[str]
    tokens: np.ndarray
    lengths: np.ndarray


def default_workers() -> int:
    """CPUs available to this process (its affinity set where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


class _ChunkEncoding:
    """Tokenizer plus the rules that turn a chunk into an ``EncodedChunk``."""

    def __init__(self, kind: str, path: str, dtype: type) -> None:
        self.kind = kind
        self.tokenizer = load_tokenizer(kind, path)
        if isinstance(self.tokenizer, SentencePieceTokenizer):
            self.tokenizer.num_threads = 1  # processes are the parallelism
        self.dtype = dtype

    def encode(self, chunk: List[Document]) -> EncodedChunk:
        tok = self.tokenizer
        encoded = tok.encode_batch([text for _, text in chunk])
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64,
                              count=len(encoded))
        tokens_np = np.empty(int(lengths.sum()), dtype=np.int64)
        offset = 0
        for (doc_id, _), ids in zip(chunk, encoded):
            end = offset + len(ids)
            tokens_np[offset:end] = ids
            tokens_np[end] = tok.eod_id
            doc_np = tokens_np[offset:end + 1]
            if doc_np.size and (doc_np.min() < 0 or doc_np.max() >= tok.vocab_size):
                raise UserError(
                    f"tokenizer produced ids outside [0, {tok.vocab_size}) for document "
                    f"{doc_id!r}; the {self.kind!r} tokenizer is inconsistent with its own "
                    "vocab size -- use another --tokenizer-path"
                )
            offset = end + 1
        return EncodedChunk([doc_id for doc_id, _ in chunk], tokens_np.astype(self.dtype),
                            lengths)


# The tokenizer of a worker process, loaded once by the initializer, or the error
# loading it raised (re-raised by the first task: an initializer that raises breaks
# the executor with a message that does not say why).
_WORKER_ENCODING: Optional[_ChunkEncoding] = None
_WORKER_INIT_ERROR: Optional[BaseException] = None
_WORKER_STALL: Optional[Tuple[int, str]] = None


def _init_worker(kind: str, path: str, dtype: type, stall: Optional[Tuple[int, str]]) -> None:
    global _WORKER_ENCODING, _WORKER_INIT_ERROR, _WORKER_STALL
    # Ctrl-C goes to the whole process group; the parent handles it and
    # shuts the executor down, so workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_STALL = stall
    try:
        _WORKER_ENCODING = _ChunkEncoding(kind, path, dtype)
    except Exception as exc:  # noqa: BLE001 -- handed to the parent by the first task
        _WORKER_INIT_ERROR = exc


def _stall_from_env() -> Optional[Tuple[int, str]]:
    value = os.environ.get(STALL_ENV)
    if not value:
        return None
    index, _, path = value.partition(":")
    return int(index), path


def _stall_here(index: int, stall: Optional[Tuple[int, str]]) -> None:
    """The test hook (``STALL_ENV``): report this pid and wait, at chunk ``index``."""
    if stall is None or stall[0] != index:
        return
    with open(stall[1] + ".part", "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    os.replace(stall[1] + ".part", stall[1])  # the test never reads half a pid
    time.sleep(STALL_SECONDS)


def _encode_in_worker(item: Tuple[int, List[Document]]) -> EncodedChunk:
    index, chunk = item
    if _WORKER_INIT_ERROR is not None:
        raise _WORKER_INIT_ERROR
    assert _WORKER_ENCODING is not None, "the executor's initializer did not run"
    _stall_here(index, _WORKER_STALL)
    return _WORKER_ENCODING.encode(chunk)


def bounded_ordered_map(pool: Any, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn(item)`` for each item on the executor ``pool``, in order, with <= ``window``
    pending. An exception of a call (or of ``submit``) is raised here, in order."""
    pending: Deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def worker_died_message(in_flight: Iterable[Tuple[int, str, str]]) -> str:
    """What to say when a worker died while the chunks ``(index, first id, last id)``
    were submitted and not yet written; one of them was the dead worker's."""
    chunks = list(in_flight)
    where = "between chunks"
    if chunks:
        first, last = chunks[0], chunks[-1]
        numbers = (f"chunk {first[0] + 1}" if len(chunks) == 1
                   else f"chunks {first[0] + 1}-{last[0] + 1}")
        where = f"on the input from document {first[1]!r} to document {last[2]!r} ({numbers})"
    return (f"a tokenizer worker process died while the workers were {where}: it was killed "
            "(often by the out-of-memory killer; see `dmesg`) or it crashed")


def _pool_context():
    # forkserver: workers start from a small clean process, not a fork of a
    # parent that may hold torch, threads and a large heap (the tokenizer
    # trainer's sample); spawn where forkserver does not exist.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class ChunkEncoder:
    """Encodes chunks on ``workers`` processes (or in-process for 1), in order."""

    def __init__(self, kind: str, path: str, dtype: type, workers: int) -> None:
        self.kind, self.path, self.dtype, self.workers = kind, path, dtype, workers
        self._pool: Optional[ProcessPoolExecutor] = None
        self._local: Optional[_ChunkEncoding] = None
        self._stall = _stall_from_env()

    def __enter__(self) -> "ChunkEncoder":
        if self.workers == 1:
            self._local = _ChunkEncoding(self.kind, self.path, self.dtype)
        else:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=_pool_context(), initializer=_init_worker,
                initargs=(self.kind, self.path, self.dtype, self._stall))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            # On an error, chunks not yet started are dropped; a running one ends first
            # (a broken executor has already terminated its workers).
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            self._pool = None

    def map(self, chunks: Iterable[List[Document]]) -> Iterator[EncodedChunk]:
        if self._local is not None:
            return self._map_local(chunks)
        assert self._pool is not None, "use ChunkEncoder as a context manager"
        return self._map_on_pool(chunks)

    def _map_local(self, chunks: Iterable[List[Document]]) -> Iterator[EncodedChunk]:
        assert self._local is not None
        for index, chunk in enumerate(chunks):
            _stall_here(index, self._stall)
            yield self._local.encode(chunk)

    def _map_on_pool(self, chunks: Iterable[List[Document]]) -> Iterator[EncodedChunk]:
        in_flight: Deque[Tuple[int, str, str]] = collections.deque()

        def numbered() -> Iterator[Tuple[int, List[Document]]]:
            for index, chunk in enumerate(chunks):
                in_flight.append((index, chunk[0][0], chunk[-1][0]))
                yield index, chunk

        try:
            for encoded in bounded_ordered_map(self._pool, _encode_in_worker, numbered(),
                                               CHUNKS_IN_FLIGHT_PER_WORKER * self.workers):
                in_flight.popleft()
                yield encoded
        except BrokenProcessPool as exc:
            raise WorkerDied(worker_died_message(in_flight)) from exc
