"""Our SentencePiece tokenizer as a Hugging Face fast tokenizer (``tokenizer.json``).

Owns the conversion of a SentencePiece ``.model`` into a ``tokenizers``
pipeline that encodes every text to the same ids, and the check that it
does. It does not decide where the tokenizer comes from (``hf/export.py``).

Why a hand-built pipeline: our tokenizer is trained for source code
(``data/tokenizer.py``: identity normalisation, no dummy prefix, whitespace
kept verbatim, runs of spaces allowed as pieces, byte fallback). The generic
converters assume natural-language SentencePiece models (dummy prefix, one
word per space) and would split indentation differently. The pipeline here
mirrors SentencePiece's steps:

* normaliser: the model's precompiled character map (empty for ``identity``),
  whitespace collapsing and the dummy prefix only if the model uses them,
  then spaces become U+2581 (SentencePiece's whitespace symbol);
* pre-tokeniser: SentencePiece's word split (a run of U+2581 followed by
  non-space characters is one word; a word never contains a space after a
  non-space, so no piece crosses the split);
* model: BPE with merges ranked by the merged piece's score (SentencePiece
  merges the highest-scoring adjacent pair first) and byte fallback, or
  Unigram with the model's scores;
* decoder: U+2581 back to spaces, byte pieces back to UTF-8.

BOS/EOS: our data pipeline adds no BOS and appends EOS (``</s>``) after each
document, so the exported tokenizer adds no special tokens when encoding.
"""

from __future__ import annotations

from typing import Iterable

from locmoe_train.errors import UserError

WS = "\u2581"  # SentencePiece's whitespace symbol
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Texts every export is checked on, besides samples of the training data:
# indentation, trailing spaces, tabs, digits, non-ASCII and byte-fallback characters.
CHECK_TEXTS = [
    "def f(x):\n    return x + 1\n",
    "class A:\n\tpass  # tab, then two spaces\n\n\n",
    "    leading and trailing spaces   ",
    "numbers 1234567890 and 3.14159e-10",
    "héllo wörld ∑ 日本語 😀 \u00a0nbsp",
    "",
    " ",
    "x",
]


def _proto(model_path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def convert_sentencepiece(model_path: str):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model at ``model_path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _proto(model_path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.treat_whitespace_as_suffix:
        raise UserError(f"tokenizer {model_path}: SentencePiece models trained with "
                        f"treat_whitespace_as_suffix cannot be exported; only prefix whitespace "
                        f"(the default) is supported.")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), 0)
    if trainer.model_type == 2:  # BPE
        normal = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
        ranked = []
        for piece, i in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-pieces[i].score, i, left, right))
        ranked.sort()
        model = models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                           unk_token=pieces[unk].piece, byte_fallback=trainer.byte_fallback,
                           fuse_unk=True)
    elif trainer.model_type == 1:  # unigram
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=unk,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise UserError(f"tokenizer {model_path}: SentencePiece model type "
                        f"{trainer.model_type} (char/word) cannot be exported; BPE and unigram "
                        f"models are supported.")
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", WS))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(WS))
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(steps)
    if trainer.split_by_whitespace:
        word = f"{WS}*[^{WS}]+|{WS}+" if trainer.allow_whitespace_only_pieces else \
            f"{WS}?[^{WS}]+|{WS}"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    dec = [decoders.Replace(WS, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # SentencePiece matches user-defined pieces whole, before the model runs.
    user = [p.piece for p in pieces if p.type == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def special_tokens(model_path: str) -> dict[str, str]:
    """``{"eos_token": ..., "unk_token": ..., ...}`` as the SentencePiece model defines them."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    out = {}
    for name, idx in [("unk_token", sp.unk_id()), ("eos_token", sp.eos_id()),
                      ("bos_token", sp.bos_id()), ("pad_token", sp.pad_id())]:
        if idx >= 0:
            out[name] = sp.id_to_piece(idx)
    return out


def check_same_ids(model_path: str, hf_tokenizer, texts: Iterable[str]) -> int:
    """Encode ``texts`` with SentencePiece and the exported tokenizer; UserError on a difference.

    Returns the number of characters checked.
    """
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    chars = 0
    for text in list(CHECK_TEXTS) + list(texts):
        want = list(sp.encode(text))
        got = hf_tokenizer.encode(text, add_special_tokens=False)
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b),
                      min(len(want), len(got)))
            raise UserError(
                f"the exported tokenizer encodes {text[:60]!r} differently from "
                f"{model_path} (first difference at token {at}: SentencePiece "
                f"{want[at:at + 5]}, exported {got[at:at + 5]}); this SentencePiece model "
                f"uses settings the converter does not reproduce. Export without it "
                f"(--tokenizer none) and ship the .model file instead.")
        chars += len(text)
    return chars
