"""The ``prepare-data`` command: raw text -> tokenised, indexed train/valid splits.

This module owns the on-disk dataset format and its creation:

``DIR/``
  ``train.bin`` / ``train.idx``  megatron-core indexed dataset, one sequence per
                                 document (its tokens followed by the EOD token)
  ``valid.bin`` / ``valid.idx``  the same for the validation split
  ``tokenizer.model``            SentencePiece model (absent for ``hf``, whose
                                 directory is referenced by absolute path)
  ``valid_documents.txt``        doc ids of the validation split, one JSON
                                 string per line (for audits)
  ``meta.json``                  format version, tokenizer, vocab size, EOD id,
                                 token dtype, per-split counts, source, args

Documents are assigned to validation by a stable hash of their doc id (see
``corpus.py``), so the split does not depend on corpus order or ``--seed``.
The input is streamed (``readers.py``) in three passes -- scan for the split
and the bad-record count, tokenizer training when one is trained, then
tokenization on ``--workers`` processes (``encode_pool.py``) whose results are
written in corpus order -- so memory does not grow with the input and the
output does not depend on the number of workers.
Everything is written to a temporary sibling directory that is renamed into
place only when complete: a crash never leaves a directory that has a
``meta.json`` but partial data. Re-running with the same options on unchanged
inputs is a no-op (``output_dir.py``: that check, killed runs' leftovers, the swap).

``load_meta(data_dir)`` validates a prepared directory for the trainer.
Run as ``locmoe-train prepare-data`` or ``python -m locmoe_train.data.prepare``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional

import numpy as np

from locmoe_train.data.corpus import (Document, ValidSplit, describe_default_corpus,
                                      iter_documents, limit_bytes)
from locmoe_train.data.encode_pool import ChunkEncoder, WorkerDied, default_workers
from locmoe_train.data.output_dir import (clear_leftovers, existing_output_note, input_stamp,
                                          make_work_dir, publish, recorded_args,
                                          refuse_bad_records_if_strict)
from locmoe_train.data.readers import BadRecords
from locmoe_train.data.tokenizer import (TOKENIZER_KINDS, Tokenizer, load_tokenizer,
                                         train_sentencepiece)
from locmoe_train.errors import UserError

FORMAT_VERSION = 1
DEFAULT_OUTPUT = os.path.join("data", "stdlib")
SPLITS = ("train", "valid")
META_FILE = "meta.json"
SP_MODEL_FILE = "tokenizer.model"
VALID_IDS_FILE = "valid_documents.txt"
# A chunk (the unit of work sent to a worker) closes at this many documents
# or characters: big enough that inter-process overhead is small, small
# enough that the progress bar moves and the chunks in flight stay small.
ENCODE_CHUNK_DOCS = 64
ENCODE_CHUNK_CHARS = 1 << 20
# uint16 halves disk and page-cache use; leave headroom below 65536 so a
# tokenizer with a few extra special tokens still fits.
UINT16_VOCAB_LIMIT = 65500


def token_dtype(vocab_size: int) -> type:
    """Smallest on-disk dtype holding every id of a ``vocab_size`` vocabulary."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


# ------------------------------------------------------------------ reading
def split_prefix(data_dir: str, split: str) -> str:
    """Path prefix of a split's ``.bin``/``.idx`` pair (for ``TokenWindows``)."""
    return os.path.join(data_dir, split)


def resolve_tokenizer_path(data_dir: str, meta: Dict[str, Any]) -> str:
    path = meta["tokenizer"]["path"]
    return path if os.path.isabs(path) else os.path.join(data_dir, path)


def _rerun_hint(data_dir: str, force: bool = True) -> str:
    return f"run `locmoe-train prepare-data --output {data_dir}{' --force' if force else ''}`"


def load_meta(data_dir: str) -> Dict[str, Any]:
    """Read and validate ``DIR/meta.json`` and the files it describes."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir!r} does not exist; "
                        f"{_rerun_hint(data_dir, force=False)} to create it")
    meta_path = os.path.join(data_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise UserError(
            f"data directory {data_dir!r} has no {META_FILE}, so it is not a prepared dataset; "
            f"{_rerun_hint(data_dir, force=False)} (add --force to replace what is there)"
        )
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path!r} is unreadable ({exc}); {_rerun_hint(data_dir)}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{meta_path!r} has format {found!r}, this version reads format "
                        f"{FORMAT_VERSION}; {_rerun_hint(data_dir)}")
    missing = [k for k in ("tokenizer", "vocab_size", "eod_id", "dtype", "args") + SPLITS
               if k not in meta]
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not {"kind", "path"} <= set(tok):
        missing.append("tokenizer.kind/path")
    if missing or meta["dtype"] not in ("uint16", "int32"):
        raise UserError(f"{meta_path!r} is incomplete (missing {missing}, dtype "
                        f"{meta.get('dtype')!r}); {_rerun_hint(data_dir)}")
    for split in SPLITS:
        for ext in (".bin", ".idx"):
            path = split_prefix(data_dir, split) + ext
            if not os.path.isfile(path):
                raise UserError(f"{path!r} is missing from the prepared dataset; "
                                f"{_rerun_hint(data_dir)}")
    tok_path = resolve_tokenizer_path(data_dir, meta)
    if not os.path.exists(tok_path):
        raise UserError(f"tokenizer {tok_path!r} named in {meta_path!r} does not exist; "
                        f"{_rerun_hint(data_dir)}")
    return meta


def load_data_tokenizer(data_dir: str, meta: Optional[Dict[str, Any]] = None) -> Tokenizer:
    """The tokenizer a prepared directory was tokenised with."""
    meta = meta if meta is not None else load_meta(data_dir)
    return load_tokenizer(meta["tokenizer"]["kind"], resolve_tokenizer_path(data_dir, meta))


# ----------------------------------------------------------------- progress
class _Progress:
    """tqdm on stderr (documents/s, tokens/s) when available, else a line every ~10% / 10 s."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.tokens = total, desc, 0, 0
        self._start = self._last_print = time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="doc", file=sys.stderr,
                             mininterval=0.5, leave=False)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self._start, 1e-9)

    def update(self, docs: int, tokens: int) -> None:
        self.done += docs
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(docs)
            # tqdm's own rate is documents/s; tokens/s rides in the postfix.
            self._bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tok/s", refresh=False)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        if now - self._last_print > 10 or self.done // step != (self.done - docs) // step:
            rate = self.done / max(now - self._start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} documents, {rate:,.0f} doc/s, "
                  f"{self.tokens_per_s():,.0f} tok/s", file=sys.stderr, flush=True)
            self._last_print = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()  # also on an error, so its message does not follow the bar's line


def _log(msg: str) -> None:
    print(f"prepare-data: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ writing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locmoe-train prepare-data",
        description="Tokenise a text corpus into train/valid indexed datasets. Without --input "
        "the Python standard library's own source code is used, so no download is needed.",
    )
    parser.add_argument("--input", nargs="+", metavar="PATH", default=None,
                        help="one or more text files (.txt/.md/.rst/.py/...), JSONL files "
                        "({'text': ...} per line; .jsonl, .jsonl.gz, .jsonl.zst) or directories "
                        "of them (default: the Python standard library's source)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="sentencepiece",
                        help="tokenizer kind (default: %(default)s)")
    parser.add_argument("--tokenizer-path", default=None, metavar="P",
                        help="existing SentencePiece .model file or Hugging Face tokenizer "
                        "directory; if omitted with sentencepiece, one is trained on the "
                        "training split")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="vocabulary size of a trained tokenizer (default: %(default)s; "
                        "ignored with --tokenizer-path)")
    parser.add_argument("--valid-fraction", type=float, default=0.02,
                        help="fraction of documents held out for validation, chosen by a "
                        "stable hash of the document id (default: %(default)s)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="read at most this many bytes of text (default: no limit)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed for sampling tokenizer-training text (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output directory")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="tokenizer processes; the output does not depend on it (default: "
                        f"the number of CPUs available, here {default_workers()})")
    parser.add_argument("--strict", action="store_true",
                        help="stop with an error at the first bad input record (invalid JSON, "
                        "no 'text', not UTF-8), naming file and line; by default such records "
                        "are skipped and counted")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.valid_fraction < 1.0:
        raise UserError(f"--valid-fraction {args.valid_fraction} is outside (0, 1); use e.g. 0.02")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1; omit it to use every CPU")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise UserError(f"--max-bytes {args.max_bytes} must be positive; omit it for no limit")
    if args.tokenizer == "hf" and not args.tokenizer_path:
        raise UserError(
            "--tokenizer hf needs --tokenizer-path pointing at a local Hugging Face tokenizer "
            "directory (only SentencePiece tokenizers can be trained here)"
        )
    if args.tokenizer_path is None and args.vocab_size < 300:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: byte fallback alone needs "
                        "256 pieces, plus specials and common characters; use >= 400 (e.g. 4096)")
    for path in args.input or []:
        if not os.path.exists(path):
            raise UserError(f"--input path {path!r} does not exist; pass existing files or "
                            "directories (or omit --input to use the built-in stdlib corpus)")
    if args.tokenizer_path is not None and not os.path.exists(args.tokenizer_path):
        raise UserError(f"--tokenizer-path {args.tokenizer_path!r} does not exist; pass an "
                        "existing tokenizer, or omit it to train a SentencePiece model")


def _corpus(args: argparse.Namespace, bad: Optional[BadRecords] = None) -> Iterator[Document]:
    return limit_bytes(iter_documents(args.input, bad), args.max_bytes)


class _Scan(NamedTuple):
    """What the first streaming pass learns: the split, a fingerprint, bad records, and
    the input files' stamp (taken just before)."""

    split: ValidSplit
    fingerprint: str
    bad: BadRecords
    stamp: List[Dict[str, Any]]


def _fingerprint(doc_ids: Iterable[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for doc_id in doc_ids:
        digest.update(doc_id.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _scan(args: argparse.Namespace) -> _Scan:
    """Read the corpus once, keeping only constant-size state (no document list)."""
    stamp = input_stamp(args.input)
    split = ValidSplit(args.valid_fraction)
    bad = BadRecords(strict=args.strict)

    def observed() -> Iterator[str]:
        for doc_id, _ in _corpus(args, bad):
            split.observe(doc_id)
            yield doc_id

    return _Scan(split, _fingerprint(observed()), bad, stamp)


def _setup_tokenizer(args, work_dir: str, split: ValidSplit):
    """Create/copy the tokenizer into ``work_dir``; return (tokenizer, its path, meta entry)."""
    if args.tokenizer == "hf":
        path = os.path.abspath(args.tokenizer_path)
        return load_tokenizer("hf", path), path, {"kind": "hf", "path": path, "trained": False}
    model_path = os.path.join(work_dir, SP_MODEL_FILE)
    if args.tokenizer_path is None:
        _log(f"training a SentencePiece BPE tokenizer (vocab {args.vocab_size}) on the "
             f"training split ({split.count} documents in all)")
        train_texts = (text for doc_id, text in _corpus(args) if not split.is_valid(doc_id))
        trained = train_sentencepiece(
            train_texts, os.path.join(work_dir, "tokenizer"), args.vocab_size, args.seed
        )
        assert trained == model_path
        entry = {"kind": "sentencepiece", "path": SP_MODEL_FILE, "trained": True}
    else:
        shutil.copyfile(args.tokenizer_path, model_path)
        entry = {"kind": "sentencepiece", "path": SP_MODEL_FILE, "trained": False,
                 "copied_from": os.path.abspath(args.tokenizer_path)}
    return load_tokenizer("sentencepiece", model_path), model_path, entry


def _chunks(documents: Iterable[Document]) -> Iterator[List[Document]]:
    chunk: List[Document] = []
    chars = 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc[1])
        if len(chunk) == ENCODE_CHUNK_DOCS or chars >= ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _write_splits(args, work_dir: str, tokenizer: Tokenizer, tokenizer_path: str,
                  scan: _Scan) -> Dict[str, Dict[str, int]]:
    """Tokenise every document into the split it belongs to; return per-split counts.

    Also writes the validation doc ids, in corpus order, as they go by.
    """
    # Imported here, not at module level: worker processes import this module
    # as the main module and need neither torch nor megatron-core.
    from locmoe_train.data.dataset import indexed_dataset_module

    builder_cls = indexed_dataset_module().IndexedDatasetBuilder
    dtype = token_dtype(tokenizer.vocab_size)
    builders = {s: builder_cls(split_prefix(work_dir, s) + ".bin", dtype=dtype) for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    progress = _Progress(scan.split.count, f"tokenizing ({args.workers} worker(s))")
    encoder = ChunkEncoder(args.tokenizer, tokenizer_path, dtype, args.workers)
    fingerprint = hashlib.blake2b(digest_size=16)
    n_docs = 0
    with progress, encoder, open(os.path.join(work_dir, VALID_IDS_FILE), "w",
                                 encoding="utf-8") as ids_f:
        # The corpus is read again here; if it changed since the scan, the
        # split computed from the scan no longer describes it (checked below).
        for chunk in encoder.map(_chunks(_corpus(args))):
            offset = 0
            for doc_id, length in zip(chunk.doc_ids, chunk.lengths.tolist()):
                split = "valid" if scan.split.is_valid(doc_id) else "train"
                builders[split].add_document(chunk.tokens[offset:offset + length], [length])
                offset += length
                counts[split]["documents"] += 1
                counts[split]["tokens"] += length
                fingerprint.update(doc_id.encode("utf-8") + b"\0")
                if split == "valid":
                    ids_f.write(json.dumps(doc_id) + "\n")
            n_docs += len(chunk.doc_ids)
            progress.update(len(chunk.doc_ids), offset)
    if (n_docs != scan.split.count or fingerprint.hexdigest() != scan.fingerprint
            or input_stamp(args.input) != scan.stamp):
        raise UserError("the input changed while it was being prepared (its documents, sizes "
                        "or modification times differ from the first pass); rerun prepare-data "
                        "once the files are stable")
    _log(f"tokenized {n_docs} documents at {progress.tokens_per_s():,.0f} tokens/s "
         f"with {args.workers} worker(s)")
    for split in SPLITS:
        builders[split].finalize(split_prefix(work_dir, split) + ".idx")
    return counts


def prepare(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the dataset described by parsed ``args`` in ``args.output``; return its meta."""
    output = os.path.normpath(args.output)
    recorded = recorded_args(args)
    source = describe_default_corpus() if args.input is None else recorded["input"]

    _log("scanning " + (f"the Python standard library at {source}" if args.input is None
                        else "the inputs"))
    scan = _scan(args)
    if not scan.split.distinct_at_least_2:
        n_distinct = 0 if scan.split.count == 0 else 1
        raise UserError(
            f"the corpus ({source}) has {n_distinct} non-empty document(s); at least 2 "
            "are needed for a train and a validation split -- pass more text via --input"
            + (" or raise --max-bytes" if args.max_bytes is not None else "")
            + (f" ({scan.bad.summary()})" if scan.bad.skipped else "")
        )
    if scan.bad.skipped or scan.bad.replaced_text_lines:
        _log(scan.bad.summary())

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    work_dir = make_work_dir(output)
    try:
        tokenizer, tokenizer_path, tok_entry = _setup_tokenizer(args, work_dir, scan.split)
        try:
            counts = _write_splits(args, work_dir, tokenizer, tokenizer_path, scan)
        except WorkerDied as exc:  # the work directory goes below; say what is left
            state = "left as it was" if os.path.exists(output) else "not created"
            raise WorkerDied(f"{exc}. --output {output!r} was {state}; rerun with fewer --workers"
                             " (each holds a tokenizer and 2 chunks) or more memory") from exc
        meta = {"format": FORMAT_VERSION, "tokenizer": tok_entry,
                "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
                "train": counts["train"], "valid": counts["valid"],
                "bad_records": scan.bad.as_meta(), "source": source, "args": recorded,
                "inputs": scan.stamp}
        with open(os.path.join(work_dir, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        publish(work_dir, output)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``locmoe-train prepare-data``; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.workers is None:
        args.workers = default_workers()
    output = os.path.normpath(args.output)
    clear_leftovers(output, _log)
    note = existing_output_note(output, recorded_args(args), input_stamp(args.input),
                                args.force)
    if note is not None:
        refuse_bad_records_if_strict(args.strict, output)
        print(f"already prepared: {output} ({note})")
        return 0
    start = time.monotonic()
    meta = prepare(args)
    tr, va = meta["train"], meta["valid"]
    print(
        f"prepared {output} in {time.monotonic() - start:.1f}s: "
        f"train {tr['documents']} docs / {tr['tokens']} tokens, "
        f"valid {va['documents']} docs / {va['tokens']} tokens, "
        f"vocab {meta['vocab_size']} ({meta['dtype']})"
        + (f"; {meta['bad_records']['skipped']} bad record(s) skipped"
           if meta["bad_records"]["skipped"] else "")
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
