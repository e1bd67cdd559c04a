"""Data pipeline: corpus reading, tokenizer, prepare-data output, windows, step loader."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
import types

import numpy as np
import pytest
import torch

from locmoe_train.data import prepare
from locmoe_train.data.corpus import (assign_valid, describe_default_corpus, iter_documents,
                                      limit_bytes, valid_score)
from locmoe_train.data.dataset import (StepLoader, TokenWindows, eval_micro_batches,
                                       indexed_dataset_module)
from locmoe_train.data.readers import BadRecords
from locmoe_train.data.tokenizer import _training_lines, load_tokenizer, train_sentencepiece
from locmoe_train.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_BYTES = 300_000
PREP_ARGS = ["--max-bytes", str(MAX_BYTES), "--vocab-size", "512", "--valid-fraction", "0.2"]
SNIPPET = (
    "class Foo(Base):\n"
    "    \"\"\"Doc with  two  spaces.\"\"\"\n"
    "\n"
    "    def bar(self, x=12345):\n"
    "        if x:\n"
    "\t\treturn {'k': [1, 2]}  # tab-indented, naïve → ünïcode\n"
    "        return None\n"
)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """One small prepared dataset from the stdlib corpus, shared by this module."""
    out = str(tmp_path_factory.mktemp("prep") / "stdlib_small")
    assert prepare.main(["--output", out, *PREP_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    """A directory with a few real stdlib modules (fast to prepare)."""
    root = tmp_path_factory.mktemp("small") / "corpus"
    root.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "bisect.py"):
        shutil.copyfile(os.path.join(stdlib, name), root / name)
    return str(root)


def corpus_docs():
    return list(limit_bytes(iter_documents(None), MAX_BYTES))


def split_documents(prefix: str) -> list[np.ndarray]:
    """Every document of a split as its token array (EOD included)."""
    indexed = indexed_dataset_module().IndexedDataset(prefix)
    # Copy: the arrays are views of a memory map that closes with ``indexed``.
    return [np.array(indexed[i], copy=True) for i in range(len(indexed))]


class ArangeDataset:
    """Sample i is a row filled with i, so batches reveal their dataset indices."""

    def __init__(self, n: int, width: int = 3) -> None:
        self.n, self.width = n, width

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(self.width, i, dtype=np.int64)


def ids_of(micro_batches: list[torch.Tensor]) -> list[int]:
    return [int(row[0]) for mb in micro_batches for row in mb]


# -------------------------------------------------------------------- corpus
def test_corpus_reads_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n  indented\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 7}) + "\n")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "__pycache__").mkdir()
    (tree / "z.py").write_text("z = 1\n")
    (tree / "sub" / "m.md").write_text("# title\n")
    (tree / "sub" / "d.jsonl").write_text(json.dumps({"text": "in dir"}) + "\n")
    (tree / "sub" / "empty.txt").write_text("   \n")          # whitespace only: skipped
    (tree / "bin.txt").write_bytes(b"abc\x00def")              # binary: skipped
    (tree / ".hidden.txt").write_text("hidden")                # hidden: skipped
    (tree / "__pycache__" / "c.py").write_text("cached")       # __pycache__: skipped
    (tree / "data.json").write_text('{"text": "no"}')          # .json: not an input type
    (tree / "bad.\xe9.py").write_bytes(b"x = '\xff'\n")        # invalid UTF-8: replaced

    docs = list(iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tree)]))
    assert docs == [
        ("a.txt", "hello\n  indented\n"),
        ("b.jsonl:1", "first"),
        ("b.jsonl:3", "second"),
        ("tree/bad.\xe9.py", "x = '\ufffd'\n"),
        ("tree/sub/d.jsonl:1", "in dir"),
        ("tree/sub/m.md", "# title\n"),
        ("tree/z.py", "z = 1\n"),
    ]


def test_corpus_bad_records_are_counted_or_strict_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    counter = BadRecords()
    assert list(iter_documents([str(bad), str(broken)], counter)) == [("bad.jsonl:1", "ok")]
    assert (counter.skipped, counter.counts["missing_text"], counter.counts["invalid_json"]) \
        == (2, 1, 1)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: no string field 'text'.*--strict"):
        list(iter_documents([str(bad)], BadRecords(strict=True)))
    with pytest.raises(UserError, match=r"broken\.jsonl:1: not valid JSON"):
        list(iter_documents([str(broken)], BadRecords(strict=True)))
    with pytest.raises(UserError, match=r"input path .*nope.* does not exist"):
        list(iter_documents([str(tmp_path / "nope")]))


def test_limit_bytes_caps_exactly():
    docs = [("a", "x" * 10), ("b", "é" * 10), ("c", "never")]
    out = list(limit_bytes(docs, 15))
    assert out == [("a", "x" * 10), ("b", "éé")]  # 10 + 4 bytes; a 3rd é would be 16
    assert list(limit_bytes(docs, None)) == docs


def test_stdlib_default_corpus_is_large_and_deterministic():
    assert describe_default_corpus() == sysconfig.get_paths()["stdlib"]
    first = [(doc_id, len(text)) for doc_id, text in iter_documents(None)]
    second = [(doc_id, len(text)) for doc_id, text in iter_documents(None)]
    assert first == second
    ids = [doc_id for doc_id, _ in first]
    assert len(ids) > 500 and sum(n for _, n in first) > 5_000_000
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "stdlib/argparse.py" in ids and "stdlib/json/decoder.py" in ids
    assert all(i.startswith("stdlib/") and i.endswith(".py") for i in ids)
    assert not any("site-packages" in i or "__pycache__" in i for i in ids)


# ----------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_determinism(prepared, tmp_path):
    meta = prepare.load_meta(prepared)
    tok = prepare.load_data_tokenizer(prepared, meta)
    assert tok.vocab_size == meta["vocab_size"] == 512 and tok.eod_id == meta["eod_id"]
    ids = tok.encode(SNIPPET)
    assert tok.decode(ids) == SNIPPET
    assert tok.eod_id not in ids and max(ids) < tok.vocab_size
    assert tok.encode_batch([SNIPPET, "x = 1"]) == [ids, tok.encode("x = 1")]
    # Retraining on the same text gives a byte-identical model file.
    docs = corpus_docs()
    valid_ids = assign_valid([d for d, _ in docs], 0.2)
    path = train_sentencepiece((t for d, t in docs if d not in valid_ids),
                               str(tmp_path / "again"), 512, seed=1234)
    with open(path, "rb") as a, open(os.path.join(prepared, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()


def test_tokenizer_training_lines_sampling():
    texts = [f"line {i}\n\nsecond {i}\n" for i in range(50)]
    everything = _training_lines(texts, seed=1, max_lines=1000)
    assert everything == [x for i in range(50) for x in (f"line {i}", f"second {i}")]
    sample = _training_lines(texts, seed=1, max_lines=10)
    assert len(sample) == 10 and set(sample) < set(everything)
    assert sample == sorted(sample, key=everything.index)  # kept in corpus order
    assert sample == _training_lines(texts, seed=1, max_lines=10)
    assert sample != _training_lines(texts, seed=2, max_lines=10)


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="kind 'bpe'.*sentencepiece, hf"):
        load_tokenizer("bpe", str(tmp_path))
    with pytest.raises(UserError, match="missing.model.*does not exist"):
        load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a loadable SentencePiece"):
        load_tokenizer("sentencepiece", str(junk))
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install transformers"):
        load_tokenizer("hf", str(tmp_path))


def test_hf_tokenizer_adapter(tmp_path, monkeypatch):
    calls = {}

    class FakeHF:
        eos_token_id = 3

        def __len__(self):
            return 1000

        def encode(self, text, add_special_tokens=True):
            calls["add_special_tokens"] = add_special_tokens
            return [ord(c) for c in text]

        def decode(self, ids, **kwargs):
            calls["decode_kwargs"] = kwargs
            return "".join(chr(i) for i in ids)

    def from_pretrained(path, local_files_only=False):
        calls["from_pretrained"] = (path, local_files_only)
        return FakeHF()

    auto = types.SimpleNamespace(from_pretrained=from_pretrained)
    fake = types.SimpleNamespace(AutoTokenizer=auto)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    tok = load_tokenizer("hf", str(tmp_path))
    assert (tok.vocab_size, tok.eod_id) == (1000, 3)
    assert tok.decode(tok.encode("ab c")) == "ab c"
    assert calls["from_pretrained"] == (str(tmp_path), True)
    assert calls["add_special_tokens"] is False
    assert calls["decode_kwargs"]["clean_up_tokenization_spaces"] is False


# ------------------------------------------------------------- prepare-data
def test_prepared_directory_and_meta(prepared):
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "tokenizer.model",
                 "meta.json", "valid_documents.txt"):
        assert os.path.isfile(os.path.join(prepared, name)), name
    assert not [n for n in os.listdir(os.path.dirname(prepared)) if ".tmp-" in n or ".old-" in n]
    meta = prepare.load_meta(prepared)
    assert meta["format"] == 1
    assert meta["tokenizer"] == {"kind": "sentencepiece", "path": "tokenizer.model",
                                 "trained": True}
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert meta["source"] == describe_default_corpus()
    assert meta["args"] == {"input": None, "tokenizer": "sentencepiece", "tokenizer_path": None,
                            "vocab_size": 512, "valid_fraction": 0.2, "max_bytes": MAX_BYTES,
                            "seed": 1234}
    for split in ("train", "valid"):
        prefix = prepare.split_prefix(prepared, split)
        docs = split_documents(prefix)
        assert meta[split]["documents"] == len(docs) >= 1
        assert meta[split]["tokens"] == sum(len(d) for d in docs)
        assert os.path.getsize(prefix + ".bin") == 2 * meta[split]["tokens"]  # uint16
        assert all(d[-1] == meta["eod_id"] and meta["eod_id"] not in d[:-1] for d in docs)


def test_prepared_splits_are_the_corpus_disjoint_and_stable(prepared):
    tok = prepare.load_data_tokenizer(prepared)
    docs = corpus_docs()
    with open(os.path.join(prepared, "valid_documents.txt")) as f:
        listed_valid = [json.loads(line) for line in f]
    valid_ids = set(listed_valid)
    assert valid_ids and len(valid_ids) < len(docs)
    expected = {"train": [t for d, t in docs if d not in valid_ids],
                "valid": [t for d, t in docs if d in valid_ids]}
    # Every stored document decodes back to exactly its source text, in corpus
    # order: the splits partition the corpus with no overlap or loss.
    for split in ("train", "valid"):
        stored = split_documents(prepare.split_prefix(prepared, split))
        assert [tok.decode(d[:-1]) for d in stored] == expected[split]
    # Membership depends on the ids only, not on their order or on other docs.
    ids = [d for d, _ in docs]
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert assign_valid(shuffled, 0.2) == assign_valid(ids, 0.2) == valid_ids
    natural = {d for d in ids if valid_score(d) < 0.2}
    assert natural == valid_ids  # no forced doc needed at 0.2 for this corpus
    assert {d for d in ids[:5] if d in valid_ids} == assign_valid(ids[:5] + ["x", "y"],
                                                                          0.2) & set(ids[:5])
    # Both splits are non-empty whenever there are two documents.
    assert len(assign_valid(["a", "b"], 1e-12)) == 1
    assert len(assign_valid(["a", "b"], 0.999999999)) == 1


def test_prepare_is_idempotent_and_refuses_changed_args(prepared, capsys):
    stamp = os.path.getmtime(os.path.join(prepared, "train.bin"))
    start = time.monotonic()
    assert prepare.main(["--output", prepared, *PREP_ARGS]) == 0
    assert time.monotonic() - start < 2.0
    assert "already prepared" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(prepared, "train.bin")) == stamp
    with pytest.raises(UserError, match=r"different options \(vocab_size: 512 -> 600\).*--force"):
        prepare.main(["--output", prepared, *PREP_ARGS[:2], "--vocab-size", "600",
                      "--valid-fraction", "0.2"])


def test_prepare_force_custom_input_and_existing_tokenizer(prepared, small_corpus, tmp_path):
    out = str(tmp_path / "custom")
    args = ["--input", small_corpus, "--output", out, "--vocab-size", "400"]
    assert prepare.main(args) == 0
    meta = prepare.load_meta(out)
    assert meta["source"] == [os.path.abspath(small_corpus)]
    assert meta["vocab_size"] == 400
    n_docs = meta["train"]["documents"] + meta["valid"]["documents"]
    assert n_docs == 5 and meta["valid"]["documents"] >= 1
    # --force rebuilds with other options, here reusing the first dataset's tokenizer.
    sp_model = os.path.join(prepared, "tokenizer.model")
    assert prepare.main([*args, "--tokenizer-path", sp_model, "--force"]) == 0
    meta = prepare.load_meta(out)
    assert meta["vocab_size"] == 512 and meta["tokenizer"]["trained"] is False
    assert meta["args"]["tokenizer_path"] == os.path.abspath(sp_model)
    assert not [n for n in os.listdir(tmp_path) if n != "custom"]  # no temp/old dirs left


def test_prepare_crash_leaves_no_dataset(small_corpus, tmp_path, monkeypatch):
    out = tmp_path / "crash"

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while tokenizing")

    monkeypatch.setattr(prepare, "_write_splits", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare.main(["--input", small_corpus, "--output", str(out), "--vocab-size", "400"])
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary sibling


def test_prepare_user_errors(tmp_path):
    with pytest.raises(UserError, match="--input path .*missing.* does not exist"):
        prepare.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o1")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    with pytest.raises(UserError, match="0 non-empty document"):
        prepare.main(["--input", str(empty), "--output", str(tmp_path / "o2")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a prepared dataset.*--force"):
        prepare.main(["--input", str(empty), "--output", str(busy)])
    with pytest.raises(UserError, match="--valid-fraction 1.5"):
        prepare.main(["--valid-fraction", "1.5", "--output", str(tmp_path / "o3")])
    with pytest.raises(UserError, match="--tokenizer hf needs --tokenizer-path"):
        prepare.main(["--tokenizer", "hf", "--output", str(tmp_path / "o4")])
    with pytest.raises(UserError, match=r"does not exist; run `locmoe-train prepare-data --output"):
        prepare.load_meta(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"no meta.json.*prepare-data --output"):
        prepare.load_meta(str(busy))
    with pytest.raises(UserError, match=r"--vocab-size 100 is too small"):
        prepare.main(["--vocab-size", "100", "--output", str(tmp_path / "o5")])


def test_load_meta_detects_damaged_directories(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    assert prepare.load_meta(str(copy))["vocab_size"] == 512
    (copy / "valid.bin").unlink()
    with pytest.raises(UserError, match=r"valid\.bin.*missing.*prepare-data --output .* --force"):
        prepare.load_meta(str(copy))
    (copy / "meta.json").write_text('{"format": 99}')
    with pytest.raises(UserError, match="format 99"):
        prepare.load_meta(str(copy))


def test_module_entry_point_exits_2_with_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "locmoe_train.data.prepare", "--input", str(tmp_path / "nope"),
         "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("error: --input path")
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ windows
def test_token_windows_are_slices_of_the_stream(prepared):
    prefix = prepare.split_prefix(prepared, "train")
    stream = np.concatenate(split_documents(prefix)).astype(np.int64)
    ds = TokenWindows(prefix, 64)
    assert len(ds) == (len(stream) - 1) // 64 > 100
    for i in (0, 1, 7, len(ds) // 2, len(ds) - 1):
        window = ds[i]
        assert window.dtype == np.int64 and window.shape == (65,)
        assert np.array_equal(window, stream[i * 64:i * 64 + 65])
    assert ds[0][-1] == ds[1][0]  # consecutive windows share the boundary token
    with pytest.raises(IndexError):
        ds[len(ds)]
    batch = ds.batch(np.array([3, 1]))
    assert batch.dtype == torch.int64 and torch.equal(batch[1], torch.from_numpy(ds[1]))


def test_token_windows_too_short_split(prepared):
    meta = prepare.load_meta(prepared)
    seq_len = meta["valid"]["tokens"]  # needs seq_len + 1 tokens
    with pytest.raises(UserError, match=r"'valid' split .*lower data\.seq_len"):
        TokenWindows(prepare.split_prefix(prepared, "valid"), seq_len)
    assert len(TokenWindows(prepare.split_prefix(prepared, "valid"), seq_len - 1)) == 1
    with pytest.raises(UserError, match="prepare-data"):
        TokenWindows(os.path.join(prepared, "nosplit"), 8)


# -------------------------------------------------------------- step loader
def test_step_loader_is_deterministic_and_seeded():
    ds = ArangeDataset(40)

    def run(seed):
        loader = StepLoader(ds, 8, 2, 0, 1, seed)
        return [ids_of(loader.next_step()) for _ in range(6)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    loader = StepLoader(ds, 8, 2, 0, 1, 1)
    step = loader.next_step()
    assert loader.num_micro_batches == 4 and len(step) == 4
    assert all(mb.shape == (2, 3) and mb.dtype == torch.int64 for mb in step)


def test_step_loader_dp_ranks_partition_the_single_rank_step():
    ds = ArangeDataset(37)
    single = StepLoader(ds, 16, 2, 0, 1, seed=5)
    ranks2 = [StepLoader(ds, 16, 2, r, 2, seed=5) for r in range(2)]
    ranks4 = [StepLoader(ds, 16, 2, r, 4, seed=5) for r in range(4)]
    assert (single.num_micro_batches, ranks2[0].num_micro_batches,
            ranks4[0].num_micro_batches) == (8, 4, 2)
    for _ in range(5):  # crosses epoch boundaries (37 samples)
        ref = single.next_step()
        for group in (ranks2, ranks4):
            together = [mb for loader in group for mb in loader.next_step()]
            assert len(together) == len(ref)
            assert all(torch.equal(a, b) for a, b in zip(together, ref))


def test_step_loader_epochs_are_permutations_in_new_orders():
    n, seed = 30, 11
    loader = StepLoader(ArangeDataset(n), 10, 5, 0, 1, seed)
    seen = [i for _ in range(6) for i in ids_of(loader.next_step())]
    epoch0, epoch1 = seen[:n], seen[n:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 == list(np.random.default_rng([seed, 0]).permutation(n))
    # A step straddling an epoch boundary takes the tail of one permutation
    # and the head of the next.
    straddle = StepLoader(ArangeDataset(n), 8, 4, 0, 1, seed)
    steps = [ids_of(straddle.next_step()) for _ in range(4)]
    assert steps[3] == epoch0[24:30] + epoch1[0:2]
    plain = StepLoader(ArangeDataset(n), 10, 5, 0, 1, seed, shuffle=False)
    plain_ids = [i for _ in range(4) for i in ids_of(plain.next_step())]
    assert plain_ids == list(range(n)) + list(range(10))


def test_step_loader_resume_matches_uninterrupted_run():
    ds = ArangeDataset(23)
    uninterrupted = StepLoader(ds, 12, 3, 0, 1, seed=3)
    reference = [uninterrupted.next_step() for _ in range(7)]

    first = StepLoader(ds, 12, 3, 0, 1, seed=3)
    for _ in range(3):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    assert state == {"consumed_samples": 36, "seed": 3, "global_batch_size": 12}

    resumed = StepLoader(ds, 12, 3, 0, 1, seed=3)
    resumed.load_state_dict(state)
    for step in reference[3:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_step(), step))

    # Resuming the same global state with 2 or 4 data-parallel ranks continues
    # at the same global position.
    for dp, mbs in ((2, 3), (4, 1)):
        ranks = [StepLoader(ds, 12, mbs, r, dp, seed=3) for r in range(dp)]
        for loader in ranks:
            loader.load_state_dict(state)
        for step in reference[3:]:
            together = [mb for loader in ranks for mb in loader.next_step()]
            assert ids_of(together) == ids_of(step)

    with pytest.raises(UserError, match="train.seed is 4"):
        StepLoader(ds, 12, 3, 0, 1, seed=4).load_state_dict(state)


def test_step_loader_rejects_bad_batch_sizes():
    ds = ArangeDataset(10)
    with pytest.raises(UserError) as err:
        StepLoader(ds, 10, 4, 0, 1, seed=0)
    msg = str(err.value)
    assert "train.global_batch_size (10)" in msg and "train.micro_batch_size (4)" in msg
    assert "data-parallel size (1)" in msg and "8 or 12" in msg and "[1, 2, 5, 10]" in msg
    with pytest.raises(UserError, match=r"data-parallel size \(4\) = 8; .*8 or 16"):
        StepLoader(ds, 12, 2, 0, 4, seed=0)
    with pytest.raises(UserError, match="train.micro_batch_size must be a positive integer"):
        StepLoader(ds, 12, 0, 0, 1, seed=0)


def test_eval_micro_batches_split_like_training():
    ds = ArangeDataset(23)
    whole = eval_micro_batches(ds, 2, 0, 1, max_samples=100)
    assert ids_of(whole) == list(range(22))  # 23 rounded down to a multiple of 2
    ranks = [eval_micro_batches(ds, 2, r, 2, max_samples=15) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]  # 15 -> 12 samples, 3 micro-batches each
    assert ids_of(ranks[0] + ranks[1]) == list(range(12))
    with pytest.raises(UserError, match=r"train.eval_samples is 3"):
        eval_micro_batches(ds, 2, 0, 2, max_samples=3)
