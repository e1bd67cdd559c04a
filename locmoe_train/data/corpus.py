"""Raw text corpora: which documents exist, in which order, with which ids.

This module owns reading the pre-training text before tokenisation, and the
train/valid split of its documents. It yields ``(doc_id, text)`` pairs in a
deterministic order; the split hashes the doc id (``assign_valid``), so ids
are built from names the user controls, never from absolute paths or
directory-listing order, and the split does not depend on corpus order.

Accepted inputs (``iter_documents(inputs, bad)``), processed in the order
given, each read as a stream (``readers.py``), never whole:

* a ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` file -- one document per
  non-blank line, taken from the line's ``"text"`` string field; doc id
  ``"<file name>:<line number>"``. Bad lines are skipped and counted in
  ``bad`` (or stop the run when it is strict);
* any other file -- plain text (UTF-8, undecodable bytes replaced): one
  document, doc id ``"<file name>"``, unless it is over 1 MiB, when it is cut
  at line breaks into documents ``"<file name>"``, ``"<file name>#2"``, ...;
* a directory -- walked recursively in sorted order; files ending in
  ``TEXT_SUFFIXES`` are read as plain documents and JSONL files as above
  (``.json`` is not accepted: it has no agreed document layout). Hidden
  entries (starting with ``.``) and ``__pycache__`` are skipped, and so are
  files that look binary (contain NUL bytes). Doc ids are
  ``"<directory name>/<relative path>"``.

``inputs=None`` selects the embedded default corpus: the ``.py`` files of the
running Python's standard library (``sysconfig.get_paths()["stdlib"]``),
without ``site-packages``. Python source is present wherever Python is, so the
quickstart needs no download. Doc ids are ``"stdlib/<relative path>"``.

Empty and whitespace-only documents are skipped everywhere: they would add a
lone end-of-document token and nothing to learn from.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from locmoe_train.data.readers import (COMPRESSED_SUFFIXES, JSONL_SUFFIXES, BadRecords,
                                       iter_jsonl, iter_text)
from locmoe_train.errors import UserError

# Suffixes read as plain-text documents when walking a directory.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
# Directory names never descended into.
SKIPPED_DIRS = ("__pycache__", "site-packages")

Document = Tuple[str, str]


def describe_default_corpus() -> str:
    """The directory holding the embedded default corpus (the Python stdlib)."""
    return sysconfig.get_paths()["stdlib"]


def _walk_sorted(root: str, suffixes: Tuple[str, ...]) -> Iterator[Tuple[str, str]]:
    """Yield ``(absolute path, posix relative path)`` of matching files, sorted.

    Sorting the full relative paths (not per-directory listings) makes the
    order independent of the file system, and ``os.walk`` does not follow
    directory symlinks, so a link loop cannot make the walk infinite.
    """
    found: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend into skipped directories.
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.endswith(suffixes):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            found.append(rel.replace(os.sep, "/"))
    for rel in sorted(found):
        yield os.path.join(root, *rel.split("/")), rel


def _iter_file(path: str, doc_id: str, bad: BadRecords, *, in_directory: bool
               ) -> Iterator[Document]:
    if path.endswith(JSONL_SUFFIXES):
        for line_no, text in iter_jsonl(path, bad):
            yield f"{doc_id}:{line_no}", text
        return
    if path.endswith(COMPRESSED_SUFFIXES):
        raise UserError(f"input file {path!r} is compressed but not JSONL; only .jsonl.gz and "
                        ".jsonl.zst are read compressed -- decompress it first")
    for part, text in enumerate(iter_text(path, bad, skip_binary=in_directory), start=1):
        yield (doc_id if part == 1 else f"{doc_id}#{part}"), text


def input_files(path: Optional[str]) -> List[Tuple[str, str]]:
    """``(file, doc id stem)`` of every file one input path is read from, in reading
    order; ``None``: the default corpus. What ``iter_documents`` reads, and what
    ``prepare-data`` stamps (size, mtime) to notice changed inputs."""
    if path is None:
        root = describe_default_corpus()
        if not os.path.isdir(root):
            raise UserError(
                f"the default corpus (Python standard library at {root!r}) is missing on this "
                "machine; pass your own text with --input"
            )
        return [(full, f"stdlib/{rel}") for full, rel in _walk_sorted(root, (".py",))]
    norm = os.path.normpath(path)
    base = os.path.basename(os.path.abspath(norm))
    if os.path.isdir(norm):
        return [(full, f"{base}/{rel}")
                for full, rel in _walk_sorted(norm, TEXT_SUFFIXES + JSONL_SUFFIXES)]
    return [(norm, base)]


def _iter_path(path: Optional[str], bad: BadRecords) -> Iterator[Document]:
    """Documents of one user-given input path (``None``: the default corpus)."""
    in_directory = path is None or os.path.isdir(path)
    for full, doc_id in input_files(path):
        yield from _iter_file(full, doc_id, bad, in_directory=in_directory)


def iter_documents(inputs: Optional[List[str]],
                   bad: Optional[BadRecords] = None) -> Iterator[Document]:
    """Yield ``(doc_id, text)`` for ``inputs`` (None: the stdlib corpus), deterministically.

    Bad records are counted in ``bad`` (a throw-away counter when None); a
    strict ``bad`` raises ``UserError`` with the file and line instead.
    """
    bad = bad if bad is not None else BadRecords()
    source: Iterable[Document]
    if inputs is None:
        source = _iter_path(None, bad)
    else:
        if not inputs:
            raise UserError("--input was given no paths; pass files/directories or omit --input")
        # Check every path up front so a typo in the last one fails fast.
        for path in inputs:
            if not os.path.exists(path):
                raise UserError(
                    f"input path {path!r} does not exist; pass existing files or directories "
                    "to --input (or omit --input to use the built-in standard-library corpus)"
                )
        source = (doc for path in inputs for doc in _iter_path(path, bad))
    for doc_id, text in source:
        if text.strip():
            yield doc_id, text


def limit_bytes(documents: Iterable[Document], max_bytes: Optional[int]) -> Iterator[Document]:
    """Stop after ``max_bytes`` bytes of UTF-8 text; the last document is cut to fit.

    The cut falls on a character boundary, so the result may be a few bytes
    short of the cap but never over it. ``None`` means no cap.
    """
    if max_bytes is None:
        yield from documents
        return
    remaining = max_bytes
    for doc_id, text in documents:
        if remaining <= 0:
            return
        data = text.encode("utf-8")
        if len(data) > remaining:
            text = data[:remaining].decode("utf-8", errors="ignore")
            if text.strip():
                yield doc_id, text
            return
        remaining -= len(data)
        yield doc_id, text


def valid_score(doc_id: str) -> float:
    """Stable pseudo-random number in [0, 1) for ``doc_id`` (same on every machine)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class ValidSplit:
    """The train/valid split, computed in one streaming pass over the doc ids.

    ``observe`` every id once (memory stays constant), then ``is_valid``
    answers for any of them. A document is validation iff its score is below
    ``valid_fraction``. With two or more distinct ids both splits are made
    non-empty by moving the lowest-scoring document into validation (or the
    highest-scoring one out of it). All of this depends only on the set of
    ids, not on their order or repetitions.
    """

    def __init__(self, valid_fraction: float) -> None:
        self.valid_fraction = valid_fraction
        self.count = 0
        self._first: Optional[str] = None
        self.distinct_at_least_2 = False
        self._lowest: Optional[Tuple[float, str]] = None
        self._highest: Optional[Tuple[float, str]] = None
        self._any_valid, self._all_valid = False, True
        self._forced_in: Optional[str] = None
        self._forced_out: Optional[str] = None

    def observe(self, doc_id: str) -> None:
        self.count += 1
        if self._first is None:
            self._first = doc_id
        elif doc_id != self._first:
            self.distinct_at_least_2 = True
        key = (valid_score(doc_id), doc_id)
        self._lowest = key if self._lowest is None else min(self._lowest, key)
        self._highest = key if self._highest is None else max(self._highest, key)
        natural = key[0] < self.valid_fraction
        self._any_valid |= natural
        self._all_valid &= natural
        if self.distinct_at_least_2 and self._lowest is not None:
            self._forced_in = None if self._any_valid else self._lowest[1]
            self._forced_out = self._highest[1] if self._all_valid else None

    def is_valid(self, doc_id: str) -> bool:
        if doc_id == self._forced_in:
            return True
        return doc_id != self._forced_out and valid_score(doc_id) < self.valid_fraction


def assign_valid(doc_ids: Sequence[str], valid_fraction: float) -> Set[str]:
    """The doc ids that go to validation (``ValidSplit`` over a list)."""
    split = ValidSplit(valid_fraction)
    for doc_id in doc_ids:
        split.observe(doc_id)
    return {d for d in set(doc_ids) if split.is_valid(d)}
