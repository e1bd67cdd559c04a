"""Parallel, order-preserving tokenization of document chunks for ``prepare-data``.

This module owns turning chunks of ``(doc_id, text)`` into token arrays on N
worker processes while the caller writes the results in corpus order:

* ``ChunkEncoder(kind, path, workers)`` -- a context manager; ``map(chunks)``
  yields one ``EncodedChunk`` per input chunk, in input order. With
  ``workers=1`` it encodes in the calling process, single-threaded; otherwise
  each worker loads the tokenizer once (pool initializer) and encodes with one
  thread. Both run the same ``_ChunkEncoding.encode``, so the output does not
  depend on the worker count.
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
from typing import Any, Callable, Deque, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from locmoe_train.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from locmoe_train.errors import UserError

Document = Tuple[str, str]
# Chunks in flight per worker: one being encoded, one queued behind it.
CHUNKS_IN_FLIGHT_PER_WORKER = 2


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


# The tokenizer of a worker process, loaded once by the pool initializer, or
# the error loading it raised (re-raised by the first task: an initializer
# that raises makes Pool restart the worker forever).
_WORKER_ENCODING: Optional[_ChunkEncoding] = None
_WORKER_INIT_ERROR: Optional[BaseException] = None


def _init_worker(kind: str, path: str, dtype: type) -> None:
    global _WORKER_ENCODING, _WORKER_INIT_ERROR
    # Ctrl-C goes to the whole process group; the parent handles it and
    # terminates the pool, so workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _WORKER_ENCODING = _ChunkEncoding(kind, path, dtype)
    except Exception as exc:  # noqa: BLE001 -- handed to the parent by the first task
        _WORKER_INIT_ERROR = exc


def _encode_in_worker(chunk: List[Document]) -> EncodedChunk:
    if _WORKER_INIT_ERROR is not None:
        raise _WORKER_INIT_ERROR
    assert _WORKER_ENCODING is not None, "pool initializer did not run"
    return _WORKER_ENCODING.encode(chunk)


def bounded_ordered_map(pool: Any, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn(item)`` for each item on ``pool``, in order, with <= ``window`` pending."""
    pending: Deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


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
        self._pool = None
        self._local: Optional[_ChunkEncoding] = None

    def __enter__(self) -> "ChunkEncoder":
        if self.workers == 1:
            self._local = _ChunkEncoding(self.kind, self.path, self.dtype)
        else:
            self._pool = _pool_context().Pool(
                self.workers, initializer=_init_worker,
                initargs=(self.kind, self.path, self.dtype))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, chunks: Iterable[List[Document]]) -> Iterator[EncodedChunk]:
        if self._local is not None:
            return map(self._local.encode, chunks)
        assert self._pool is not None, "use ChunkEncoder as a context manager"
        return bounded_ordered_map(self._pool, _encode_in_worker, chunks,
                                   CHUNKS_IN_FLIGHT_PER_WORKER * self.workers)
