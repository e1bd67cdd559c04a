"""Raw text corpora: which documents exist, in which order, with which ids.

This module owns reading the pre-training text before tokenisation, and the
train/valid split of its documents. It yields ``(doc_id, text)`` pairs in a
deterministic order; the split hashes the doc id (``assign_valid``), so ids
are built from names the user controls, never from absolute paths or
directory-listing order, and the split does not depend on corpus order.

Accepted inputs (``iter_documents(inputs)``), processed in the order given:

* a ``.jsonl`` file -- one document per non-blank line, taken from the line's
  ``"text"`` string field; doc id ``"<file name>:<line number>"``;
* any other file -- the whole file is one document (UTF-8, undecodable bytes
  replaced); doc id ``"<file name>"``;
* a directory -- walked recursively in sorted order; files ending in
  ``TEXT_SUFFIXES`` are read as plain documents and ``.jsonl`` files as above
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
import json
import os
import sysconfig
from typing import Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from locmoe_train.errors import UserError

# Suffixes read as plain-text documents when walking a directory.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
# Directory names never descended into.
SKIPPED_DIRS = ("__pycache__", "site-packages")
# Bytes inspected when deciding whether a file is binary.
_BINARY_SNIFF_BYTES = 8192

Document = Tuple[str, str]


def describe_default_corpus() -> str:
    """The directory holding the embedded default corpus (the Python stdlib)."""
    return sysconfig.get_paths()["stdlib"]


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:_BINARY_SNIFF_BYTES]


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


def _read_text_file(path: str, *, skip_binary: bool) -> Optional[str]:
    """The file decoded as UTF-8 (errors replaced); None if skipped as binary/unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        if skip_binary:
            return None
        raise UserError(f"input file {path!r} could not be read ({exc}); check its permissions")
    if _looks_binary(data):
        if skip_binary:
            return None
        raise UserError(
            f"input file {path!r} looks binary (contains NUL bytes); pass text files, "
            ".jsonl files or directories of them"
        )
    return data.decode("utf-8", errors="replace")


def _iter_jsonl(path: str, id_prefix: str) -> Iterator[Document]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{line_no}: not valid JSON ({exc.msg}); each line of a .jsonl input "
                    'must be one JSON object like {"text": "..."}'
                ) from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{line_no}: no string field 'text' in this line; each line of a "
                    '.jsonl input must be a JSON object like {"text": "..."}'
                )
            yield f"{id_prefix}:{line_no}", text


def _iter_path(path: str) -> Iterator[Document]:
    """Documents of one user-given input path."""
    norm = os.path.normpath(path)
    if not os.path.exists(norm):
        raise UserError(
            f"input path {path!r} does not exist; pass existing files or directories to --input "
            "(or omit --input to use the built-in standard-library corpus)"
        )
    base = os.path.basename(os.path.abspath(norm))
    if os.path.isdir(norm):
        for full, rel in _walk_sorted(norm, TEXT_SUFFIXES + (JSONL_SUFFIX,)):
            doc_id = f"{base}/{rel}"
            if rel.endswith(JSONL_SUFFIX):
                yield from _iter_jsonl(full, doc_id)
            else:
                text = _read_text_file(full, skip_binary=True)
                if text is not None:
                    yield doc_id, text
    elif norm.endswith(JSONL_SUFFIX):
        yield from _iter_jsonl(norm, base)
    else:
        text = _read_text_file(norm, skip_binary=False)
        assert text is not None
        yield base, text


def _iter_stdlib() -> Iterator[Document]:
    root = describe_default_corpus()
    if not os.path.isdir(root):
        raise UserError(
            f"the default corpus (Python standard library at {root!r}) is missing on this "
            "machine; pass your own text with --input"
        )
    for full, rel in _walk_sorted(root, (".py",)):
        text = _read_text_file(full, skip_binary=True)
        if text is not None:
            yield f"stdlib/{rel}", text


def iter_documents(inputs: Optional[List[str]]) -> Iterator[Document]:
    """Yield ``(doc_id, text)`` for ``inputs`` (None: the stdlib corpus), deterministically."""
    source: Iterable[Document]
    if inputs is None:
        source = _iter_stdlib()
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
        source = (doc for path in inputs for doc in _iter_path(path))
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


def assign_valid(doc_ids: Sequence[str], valid_fraction: float) -> Set[str]:
    """The doc ids that go to validation.

    A document is validation iff its score is below ``valid_fraction``. With
    two or more distinct documents both splits are made non-empty by moving
    the lowest-scoring document into validation (or the highest-scoring one
    out of it); all of this depends only on the set of ids, not their order.
    """
    unique = set(doc_ids)
    valid = {d for d in unique if valid_score(d) < valid_fraction}
    if len(unique) >= 2:
        if not valid:
            valid.add(min(unique, key=lambda d: (valid_score(d), d)))
        if len(valid) == len(unique):
            valid.discard(max(unique, key=lambda d: (valid_score(d), d)))
    return valid
