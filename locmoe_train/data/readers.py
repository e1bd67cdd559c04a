"""Streaming readers for input files: compressed JSONL, plain text, bad records.

This module owns how the bytes of one input file become document texts,
without ever holding a whole file in memory:

* ``open_input(path)`` -- a buffered binary stream for ``.jsonl``,
  ``.jsonl.gz`` and ``.jsonl.zst`` (the latter needs the optional
  ``zstandard`` package) and plain files;
* ``iter_jsonl(path, bad)`` -- ``(line number, text)`` of each record, read
  line by line; a line is at most ``MAX_RECORD_BYTES`` long;
* ``iter_text(path, bad, ...)`` -- the text of a plain file in documents of
  bounded size (the chunking rule is below), read block by block;
* ``BadRecords`` -- counts records that are skipped (or stops at the first
  one with ``strict``), with file and line.

Chunking rule for plain text: a file of up to ``TEXT_DOC_BYTES`` (1 MiB) is
one document, as it always was. A bigger file is cut into documents at line
breaks: the file is read in ``TEXT_BLOCK_BYTES`` (64 KiB) blocks, and a
document ends at the last line break of the block that takes it past 1 MiB,
so it holds between 1 MiB - 64 KiB and 1 MiB + 64 KiB. Where such a block has
no line break the document goes on, up to ``TEXT_DOC_MAX_BYTES`` (4 MiB), and
is then cut at the block's end. The last document of a file may be shorter.

What counts as a bad record: in JSONL, a line that is not valid JSON, has no
string ``text`` field, is not UTF-8, or is longer than ``MAX_RECORD_BYTES``;
it is skipped. In plain text, bytes that are not UTF-8 are replaced by U+FFFD
(dropping a line would corrupt the document) and counted per line. Which
files make up the corpus, and their document ids, is ``corpus.py``'s job.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
from typing import IO, Dict, Iterator, List, Tuple

from locmoe_train.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
COMPRESSED_SUFFIXES = (".gz", ".zst")
# A JSONL record longer than this is skipped: it bounds what one line costs.
MAX_RECORD_BYTES = 16 << 20
# Plain-text chunking (see the module docstring).
TEXT_DOC_BYTES = 1 << 20
TEXT_DOC_MAX_BYTES = 4 << 20
# Bytes per read() of a plain-text file; the read buffer of every input.
TEXT_BLOCK_BYTES = 64 << 10
READ_BUFFER_BYTES = 1 << 20
# Bytes inspected when deciding whether a file is binary.
BINARY_SNIFF_BYTES = 8192
# How many bad records are listed by position in the report and meta.json.
MAX_EXAMPLES = 5
JSONL_HINT = 'each line of a .jsonl input must be one JSON object like {"text": "..."}'


class BadRecords:
    """Skipped (or, with ``strict``, fatal) bad records, counted by kind."""

    KINDS = ("invalid_json", "missing_text", "undecodable", "too_long")

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.counts: Dict[str, int] = {kind: 0 for kind in self.KINDS}
        self.replaced_text_lines = 0
        self.examples: List[str] = []

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def _note(self, where: str, reason: str) -> None:
        if self.strict:
            raise UserError(f"{where}: {reason} (--strict stops at the first bad record; drop "
                            "--strict to skip and count them)")
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def skip(self, kind: str, path: str, line_no: int, reason: str) -> None:
        """Record a JSONL record that is left out; raises instead when strict."""
        assert kind in self.counts, kind
        self._note(f"{path}:{line_no}", reason)
        self.counts[kind] += 1

    def replaced(self, path: str, line_no: int) -> None:
        """Record a plain-text line whose non-UTF-8 bytes were replaced."""
        self._note(f"{path}:{line_no}", "bytes that are not UTF-8")
        self.replaced_text_lines += 1

    def as_meta(self) -> Dict[str, object]:
        return {"skipped": self.skipped, **self.counts,
                "replaced_text_lines": self.replaced_text_lines, "examples": list(self.examples)}

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.items() if n)
        text = f"skipped {self.skipped} bad record(s)" + (f" ({kinds})" if kinds else "")
        if self.replaced_text_lines:
            text += (f"; replaced non-UTF-8 bytes in {self.replaced_text_lines} line(s) of "
                     "plain-text files")
        if self.examples:
            text += "; first: " + " | ".join(self.examples)
        return text


def open_input(path: str) -> IO[bytes]:
    """A buffered binary stream of the file's (decompressed) bytes."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(
                f"input file {path!r} is zstd-compressed, which needs the optional 'zstandard' "
                "package; run `pip install zstandard` (or decompress the file to .jsonl)"
            ) from None
        return io.BufferedReader(zstandard.open(path, "rb"), buffer_size=READ_BUFFER_BYTES)
    return open(path, "rb", buffering=READ_BUFFER_BYTES)


def _unreadable(path: str, exc: Exception) -> UserError:
    return UserError(f"input file {path!r} could not be read ({type(exc).__name__}: {exc}); "
                     "check that it is complete (a compressed file may be truncated) and readable")


def _bounded_lines(f: IO[bytes], path: str, bad: BadRecords) -> Iterator[Tuple[int, bytes]]:
    """``(line number, line)`` with lines over ``MAX_RECORD_BYTES`` skipped as too long."""
    line_no = 0
    while True:
        line = f.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        line_no += 1
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            rest = line
            while rest and not rest.endswith(b"\n"):  # drain the line without keeping it
                rest = f.readline(READ_BUFFER_BYTES)
            bad.skip("too_long", path, line_no,
                     f"record longer than {MAX_RECORD_BYTES} bytes; split such documents")
            continue
        yield line_no, line


def iter_jsonl(path: str, bad: BadRecords) -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` of every good record of a JSONL file."""
    try:
        with open_input(path) as f:
            for line_no, line in _bounded_lines(f, path, bad):
                if not line.strip():
                    continue
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad.skip("undecodable", path, line_no,
                             f"bytes that are not UTF-8 (at byte {exc.start} of the line)")
                    continue
                try:
                    record = json.loads(decoded)
                except json.JSONDecodeError as exc:
                    bad.skip("invalid_json", path, line_no,
                             f"not valid JSON ({exc.msg}); {JSONL_HINT}")
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    bad.skip("missing_text", path, line_no,
                             f"no string field 'text' in this line; {JSONL_HINT}")
                    continue
                yield line_no, text
    except (OSError, EOFError) as exc:
        raise _unreadable(path, exc) from exc
    except UserError:
        raise
    except Exception as exc:  # zstandard.ZstdError and friends: a damaged file
        if type(exc).__module__.startswith("zstandard"):
            raise _unreadable(path, exc) from exc
        raise


class _Utf8Blocks:
    """Incremental UTF-8 decoding of blocks; bad bytes are replaced and counted by line."""

    def __init__(self, path: str, bad: BadRecords) -> None:
        self.path, self.bad = path, bad
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.line_no = 1

    def decode(self, block: bytes, final: bool = False) -> str:
        state = self._decoder.getstate()
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError:
            self._decoder.setstate(state)
            text = self._decode_by_line(block, final)
        self.line_no += block.count(b"\n")
        return text

    def _decode_by_line(self, block: bytes, final: bool) -> str:
        # Bad sequences never span a newline byte, so replacing line by line
        # gives what decoding the whole file with errors="replace" gives.
        lines = block.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            line = line + b"\n" if i < len(lines) - 1 else line
            last = final and i == len(lines) - 1
            state = self._decoder.getstate()
            try:
                out.append(self._decoder.decode(line, last))
            except UnicodeDecodeError:
                self.bad.replaced(self.path, self.line_no + i)
                out.append((state[0] + line).decode("utf-8", errors="replace"))
                self._decoder.reset()
        return "".join(out)


def iter_text(path: str, bad: BadRecords, *, skip_binary: bool) -> Iterator[str]:
    """The documents of a plain-text file (one unless it is over 1 MiB: see the rule above).

    A file that looks binary (a NUL byte in its first 8 KiB) or cannot be read
    yields nothing with ``skip_binary`` (directory walks) and is an error
    without it (a file named on the command line).
    """
    try:
        f = open_input(path)
    except OSError as exc:
        if skip_binary:
            return
        raise UserError(f"input file {path!r} could not be read ({exc}); check its permissions")
    with f:
        if b"\x00" in f.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]:
            if skip_binary:
                return
            raise UserError(f"input file {path!r} looks binary (contains NUL bytes); pass text "
                            "files, .jsonl files or directories of them")
        decoder = _Utf8Blocks(path, bad)
        parts: List[str] = []
        size = 0
        for block in iter(lambda: f.read(TEXT_BLOCK_BYTES), b""):
            text = decoder.decode(block)
            size += len(block)
            cut = text.rfind("\n") + 1 if size > TEXT_DOC_BYTES else 0
            if cut == 0 and size > TEXT_DOC_MAX_BYTES:
                cut = len(text)
            if cut == 0:
                parts.append(text)
                continue
            parts.append(text[:cut])
            yield "".join(parts)
            rest = text[cut:]
            parts, size = [rest], len(rest.encode("utf-8"))
        parts.append(decoder.decode(b"", final=True))
        yield "".join(parts)
