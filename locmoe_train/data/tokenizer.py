"""Tokenizers: the small interface the data pipeline and trainer rely on.

This module owns everything that turns text into token ids and back:

* ``Tokenizer`` -- the interface (``vocab_size``, ``eod_id``, ``encode``,
  ``decode``, plus a batched ``encode_batch`` with a plain default).
* ``SentencePieceTokenizer`` -- wraps a SentencePiece ``.model`` file.
* ``HFTokenizer`` -- wraps a local Hugging Face tokenizer directory; the
  ``transformers`` package is an optional extra and is imported lazily.
* ``load_tokenizer(kind, path)`` -- the one constructor the rest of the
  package uses.
* ``train_sentencepiece(...)`` -- trains the default BPE tokenizer for the
  source-code corpus, deterministically.

The end-of-document (EOD) token separates documents in the packed token
stream; every tokenizer must have one.
"""

from __future__ import annotations

import io
import os
import random
from typing import Iterable, List, Sequence

from locmoe_train.errors import UserError

TOKENIZER_KINDS = ("sentencepiece", "hf")

# SentencePiece keeps every training sentence in memory; past this many lines
# we keep a seeded uniform sample instead (reservoir sampling), so memory stays
# bounded and the sample does not favour the start of the corpus. The whole
# Python standard library is ~730k non-empty lines, so it is used in full.
MAX_TRAINING_LINES = 1_000_000
# Lines longer than this (bytes) are minified data, not code; SentencePiece
# would skip them with a log line each, so we drop them up front.
MAX_LINE_BYTES = 16_384


class Tokenizer:
    """Interface: text <-> token ids, with an end-of-document id."""

    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode several texts; implementations may parallelise this."""
        return [self.encode(text) for text in texts]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model loaded from a ``.model`` file."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        self.path = model_path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as exc:
            raise UserError(
                f"tokenizer path {model_path!r} is not a loadable SentencePiece .model file "
                f"({exc}); pass a .model file written by SentencePiece, or omit the path to "
                "train one"
            ) from exc
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod_id = int(self._sp.eos_id())
        if self.eod_id < 0:
            raise UserError(
                f"SentencePiece model {model_path!r} has no end-of-sequence piece (eos_id=-1), "
                "which is needed to separate documents; train it with eos_id set, or omit the "
                "tokenizer path to train one"
            )
        # Encoding is pure C++ and releases the GIL; use every core for batches
        # (prepare-data's worker processes set this to 1: they are the parallelism).
        self.num_threads = max(1, os.cpu_count() or 1)

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # Output is identical to per-text encode; only the work is spread.
        return [list(ids) for ids in self._sp.encode(list(texts), num_threads=self.num_threads)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer read from a local directory (no network)."""

    def __init__(self, path: str) -> None:
        try:
            import transformers
        except ImportError as exc:
            raise UserError(
                f"tokenizer kind 'hf' (path {path!r}) needs the optional 'transformers' "
                "package, which is not installed; run `pip install transformers` or use "
                "--tokenizer sentencepiece"
            ) from exc
        self.path = path
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"tokenizer path {path!r} could not be loaded as a Hugging Face tokenizer "
                f"({exc}); pass a directory containing tokenizer files (tokenizer.json or "
                "tokenizer_config.json + vocab)"
            ) from exc
        # len() counts added special tokens, which the embedding table must cover;
        # the tokenizer's own .vocab_size attribute does not.
        self.vocab_size = int(len(self._tok))
        eod = self._tok.eos_token_id
        if eod is None:
            raise UserError(
                f"Hugging Face tokenizer at {path!r} has no eos_token, which is needed to "
                "separate documents; set eos_token in its tokenizer_config.json"
            )
        self.eod_id = int(eod)

    def encode(self, text: str) -> List[int]:
        # No BOS/EOS here: the pipeline appends the EOD token itself.
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        # Clean-up would change source-code spacing (e.g. " ." -> "."); keep it raw.
        return self._tok.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


def load_tokenizer(kind: str, path: str) -> Tokenizer:
    """Load a tokenizer of ``kind`` ("sentencepiece" or "hf") from ``path``."""
    if kind not in TOKENIZER_KINDS:
        raise UserError(
            f"tokenizer kind {kind!r} is not supported; use one of {', '.join(TOKENIZER_KINDS)}"
        )
    if not path or not os.path.exists(path):
        what = "a SentencePiece .model file" if kind == "sentencepiece" else "a local directory"
        raise UserError(f"tokenizer path {path!r} does not exist; pass {what} for kind {kind!r}")
    if kind == "sentencepiece":
        if os.path.isdir(path):
            raise UserError(
                f"tokenizer path {path!r} is a directory; kind 'sentencepiece' needs the "
                ".model file itself (or use --tokenizer hf for a Hugging Face directory)"
            )
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def _training_lines(texts: Iterable[str], seed: int, max_lines: int) -> List[str]:
    """All non-empty lines of ``texts``, or a seeded uniform sample of ``max_lines``.

    Reservoir sampling keeps memory bounded without knowing the corpus size in
    advance; the kept lines are returned in corpus order, so when everything
    fits the result is independent of ``seed``.
    """
    rng = random.Random(seed)
    kept: List[tuple] = []  # (position in corpus, line)
    seen = 0
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            # Characters <= bytes <= 4 * characters: only encode when unsure.
            if len(line) > MAX_LINE_BYTES or (
                4 * len(line) > MAX_LINE_BYTES and len(line.encode("utf-8")) > MAX_LINE_BYTES
            ):
                continue
            if len(kept) < max_lines:
                kept.append((seen, line))
            else:
                slot = rng.randrange(seen + 1)
                if slot < max_lines:
                    kept[slot] = (seen, line)
            seen += 1
    kept.sort(key=lambda item: item[0])
    return [line for _, line in kept]


def train_sentencepiece(
    texts: Iterable[str], out_prefix: str, vocab_size: int, seed: int = 1234
) -> str:
    """Train a byte-fallback BPE SentencePiece model on ``texts``; return the .model path.

    Tuned for source code: whitespace and indentation are kept verbatim
    (identity normalisation, no whitespace collapsing, no dummy prefix, runs
    of spaces may become pieces), digits are split, and byte fallback means
    any text encodes. The same input and seed give a byte-identical model:
    one training thread (SentencePiece's result depends on the thread count)
    and no SentencePiece-side shuffling.
    """
    import sentencepiece

    lines = _training_lines(texts, seed, MAX_TRAINING_LINES)
    if not lines:
        raise UserError(
            f"no text to train the tokenizer on (output {out_prefix!r}); the training split "
            "is empty or whitespace-only -- pass more input text"
        )
    out_dir = os.path.dirname(out_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    model_path = out_prefix + ".model"
    model_bytes = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            # Returning the model instead of passing model_prefix keeps the
            # output path out of the stored trainer spec, so the .model file
            # is byte-identical wherever it is written.
            model_writer=model_bytes,
            model_type="bpe",
            vocab_size=vocab_size,
            # Characters outside the most frequent 99.95% of occurrences fall
            # back to bytes instead of each costing a vocabulary slot.
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # Lines are fed without their newline, and mid-document lines are
            # encoded after a "\n", not a space: a dummy "▁" prefix would make
            # training and use disagree.
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            # unk=0, EOD (SentencePiece's eos)=1; no BOS/PAD pieces.
            unk_id=0,
            eos_id=1,
            bos_id=-1,
            pad_id=-1,
            input_sentence_size=len(lines) + 1,
            shuffle_input_sentence=False,
            max_sentence_length=MAX_LINE_BYTES,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise UserError(
            f"SentencePiece could not train a tokenizer with vocab size {vocab_size} "
            f"({exc}); choose a different --vocab-size: it must cover 256 byte pieces, the "
            "special pieces and the corpus's common characters (~400 for code), and a tiny "
            "corpus cannot support a large one"
        ) from exc
    with open(model_path, "wb") as f:
        f.write(model_bytes.getvalue())
    return model_path

