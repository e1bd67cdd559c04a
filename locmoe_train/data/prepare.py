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
Everything is written to a temporary sibling directory that is renamed into
place only when complete: a crash never leaves a directory that has a
``meta.json`` but partial data. Re-running with the same options is a no-op.

``load_meta(data_dir)`` validates a prepared directory for the trainer.
Run as ``locmoe-train prepare-data`` or ``python -m locmoe_train.data.prepare``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Set

import numpy as np

from locmoe_train.data.corpus import (assign_valid, describe_default_corpus, iter_documents,
                                      limit_bytes)
from locmoe_train.data.dataset import indexed_dataset_module
from locmoe_train.data.tokenizer import (TOKENIZER_KINDS, Tokenizer, load_tokenizer,
                                         train_sentencepiece)
from locmoe_train.errors import UserError

FORMAT_VERSION = 1
DEFAULT_OUTPUT = os.path.join("data", "stdlib")
SPLITS = ("train", "valid")
META_FILE = "meta.json"
SP_MODEL_FILE = "tokenizer.model"
VALID_IDS_FILE = "valid_documents.txt"
# Documents per encode_batch call: enough to keep both cores busy, small
# enough that the progress bar moves.
ENCODE_CHUNK_DOCS = 64
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
    """tqdm on stderr when available, else a line every ~10% / 10 s."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self._last_print = time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="doc", file=sys.stderr,
                             mininterval=0.5, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        if now - self._last_print > 10 or self.done // step != (self.done - n) // step:
            print(f"{self.desc}: {self.done}/{self.total} documents", file=sys.stderr, flush=True)
            self._last_print = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


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
                        help="text files, .jsonl files ({'text': ...} per line) or directories "
                        "(default: the Python standard library's source)")
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
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.valid_fraction < 1.0:
        raise UserError(f"--valid-fraction {args.valid_fraction} is outside (0, 1); use e.g. 0.02")
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


def _recorded_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The options that determine the output; what 'already prepared' compares."""
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


def _existing_output_is_current(output: str, recorded: Dict[str, Any], force: bool) -> bool:
    """True if ``output`` already holds this exact dataset; errors if it holds something else."""
    if not os.path.exists(output):
        return False
    if not os.path.isdir(output):
        raise UserError(f"--output {output!r} is a file, not a directory; choose another --output")
    if force:
        return False
    if not os.path.exists(os.path.join(output, META_FILE)):
        if not os.listdir(output):
            return False  # an empty directory is free to use
        raise UserError(
            f"--output {output!r} exists and is not a prepared dataset (no {META_FILE}); pass "
            "--force to replace its contents or choose another --output"
        )
    old = load_meta(output).get("args", {})
    if old == recorded:
        return True
    changed = ", ".join(
        f"{key}: {old.get(key)!r} -> {recorded.get(key)!r}"
        for key in sorted(set(old) | set(recorded)) if old.get(key) != recorded.get(key)
    )
    raise UserError(
        f"--output {output!r} already holds data prepared with different options ({changed}); "
        "pass --force to overwrite it or choose another --output"
    )


def _corpus(args: argparse.Namespace) -> Iterable:
    return limit_bytes(iter_documents(args.input), args.max_bytes)


def _setup_tokenizer(args, work_dir: str, valid_ids: Set[str], n_train: int):
    """Create/copy the tokenizer into ``work_dir``; return (tokenizer, meta entry)."""
    if args.tokenizer == "hf":
        path = os.path.abspath(args.tokenizer_path)
        return load_tokenizer("hf", path), {"kind": "hf", "path": path, "trained": False}
    model_path = os.path.join(work_dir, SP_MODEL_FILE)
    if args.tokenizer_path is None:
        _log(f"training a SentencePiece BPE tokenizer (vocab {args.vocab_size}) "
             f"on {n_train} training documents")
        train_texts = (text for doc_id, text in _corpus(args) if doc_id not in valid_ids)
        trained = train_sentencepiece(
            train_texts, os.path.join(work_dir, "tokenizer"), args.vocab_size, args.seed
        )
        assert trained == model_path
        entry = {"kind": "sentencepiece", "path": SP_MODEL_FILE, "trained": True}
    else:
        shutil.copyfile(args.tokenizer_path, model_path)
        entry = {"kind": "sentencepiece", "path": SP_MODEL_FILE, "trained": False,
                 "copied_from": os.path.abspath(args.tokenizer_path)}
    return load_tokenizer("sentencepiece", model_path), entry


def _write_splits(args, work_dir: str, tokenizer: Tokenizer, doc_ids: List[str],
                  valid_ids: Set[str]) -> Dict[str, Dict[str, int]]:
    """Tokenise every document into the split it belongs to; return per-split counts."""
    import torch

    builder_cls = indexed_dataset_module().IndexedDatasetBuilder
    dtype = token_dtype(tokenizer.vocab_size)
    builders = {s: builder_cls(split_prefix(work_dir, s) + ".bin", dtype=dtype) for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    progress = _Progress(len(doc_ids), "tokenizing")

    def flush(chunk: List[tuple]) -> None:
        for (doc_id, _), ids in zip(chunk, tokenizer.encode_batch([t for _, t in chunk])):
            ids_np = np.asarray(ids + [tokenizer.eod_id], dtype=np.int64)
            if ids_np.min() < 0 or ids_np.max() >= tokenizer.vocab_size:
                raise UserError(
                    f"tokenizer produced ids outside [0, {tokenizer.vocab_size}) for document "
                    f"{doc_id!r}; the {args.tokenizer!r} tokenizer is inconsistent with its own "
                    "vocab size -- use another --tokenizer-path"
                )
            split = "valid" if doc_id in valid_ids else "train"
            builders[split].add_item(torch.from_numpy(ids_np))
            builders[split].end_document()
            counts[split]["documents"] += 1
            counts[split]["tokens"] += int(ids_np.size)
        progress.update(len(chunk))

    chunk: List[tuple] = []
    for expected_id, doc in itertools.zip_longest(doc_ids, _corpus(args)):
        # The corpus is read again here; if it changed since the scan, the
        # split computed from the scan no longer describes it.
        if doc is None or doc[0] != expected_id:
            raise UserError(f"the input changed while it was being prepared (near document "
                            f"{expected_id!r}); rerun prepare-data once the files are stable")
        chunk.append(doc)
        if len(chunk) == ENCODE_CHUNK_DOCS:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    progress.close()
    for split in SPLITS:
        builders[split].finalize(split_prefix(work_dir, split) + ".idx")
    return counts


def prepare(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the dataset described by parsed ``args`` in ``args.output``; return its meta."""
    output = os.path.normpath(args.output)
    recorded = _recorded_args(args)
    source = describe_default_corpus() if args.input is None else recorded["input"]

    _log("scanning " + (f"the Python standard library at {source}" if args.input is None
                        else "the inputs"))
    doc_ids = [doc_id for doc_id, _ in _corpus(args)]
    if len(set(doc_ids)) < 2:
        raise UserError(
            f"the corpus ({source}) has {len(set(doc_ids))} non-empty document(s); at least 2 "
            "are needed for a train and a validation split -- pass more text via --input"
            + (" or raise --max-bytes" if args.max_bytes is not None else "")
        )
    valid_ids = assign_valid(doc_ids, args.valid_fraction)

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    work_dir = f"{os.path.abspath(output)}.tmp-{os.getpid()}"
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    try:
        n_train = sum(1 for d in doc_ids if d not in valid_ids)
        tokenizer, tok_entry = _setup_tokenizer(args, work_dir, valid_ids, n_train)
        counts = _write_splits(args, work_dir, tokenizer, doc_ids, valid_ids)
        with open(os.path.join(work_dir, VALID_IDS_FILE), "w", encoding="utf-8") as f:
            for doc_id in doc_ids:
                if doc_id in valid_ids:
                    f.write(json.dumps(doc_id) + "\n")
        meta = {"format": FORMAT_VERSION, "tokenizer": tok_entry,
                "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
                "train": counts["train"], "valid": counts["valid"],
                "source": source, "args": recorded}
        with open(os.path.join(work_dir, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # Swap in atomically: the old directory (--force) is moved aside first
        # and deleted only once the new one is in place.
        trash = f"{os.path.abspath(output)}.old-{os.getpid()}"
        if os.path.exists(output):
            os.rename(output, trash)
        os.rename(work_dir, output)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``locmoe-train prepare-data``; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    output = os.path.normpath(args.output)
    if _existing_output_is_current(output, _recorded_args(args), args.force):
        print(f"already prepared: {output} (same options; pass --force to rebuild)")
        return 0
    start = time.monotonic()
    meta = prepare(args)
    tr, va = meta["train"], meta["valid"]
    print(
        f"prepared {output} in {time.monotonic() - start:.1f}s: "
        f"train {tr['documents']} docs / {tr['tokens']} tokens, "
        f"valid {va['documents']} docs / {va['tokens']} tokens, "
        f"vocab {meta['vocab_size']} ({meta['dtype']})"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
