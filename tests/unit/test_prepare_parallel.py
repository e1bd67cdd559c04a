"""prepare-data at scale: parallel workers, streaming readers, input formats, bad records."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from locmoe_train.data import prepare, readers
from locmoe_train.data.corpus import iter_documents
from locmoe_train.data.encode_pool import bounded_ordered_map
from locmoe_train.data.readers import BadRecords, iter_jsonl, iter_text
from locmoe_train.errors import UserError

STDLIB = sysconfig.get_paths()["stdlib"]
RECORDS = [{"text": f"def f{i}(x):\n    return x * {i}  # é\n"} for i in range(150)]


def write_jsonl(path, records, opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def tree_bytes(root: str) -> dict:
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> list:
    """A directory of stdlib modules, a .jsonl.gz and a .jsonl with bad lines."""
    root = tmp_path_factory.mktemp("mixed")
    code = root / "code"
    code.mkdir()
    for name in ("argparse.py", "textwrap.py", "shlex.py", "fnmatch.py"):
        shutil.copyfile(os.path.join(STDLIB, name), code / name)
    gz = write_jsonl(root / "funcs.jsonl.gz", RECORDS, opener=gzip.open)
    plain = root / "notes.jsonl"
    plain.write_bytes(b'{"text": "first note"}\n{broken\n{"body": 1}\n{"text": "bad \xff byte"}\n'
                      b'{"text": "last note"}\n')
    return [str(code), gz, str(plain)]


# ------------------------------------------------------------ workers
def test_workers_2_output_is_byte_identical_to_workers_1(mixed_inputs, tmp_path):
    common = ["--input", *mixed_inputs, "--vocab-size", "400", "--valid-fraction", "0.1"]
    assert prepare.main([*common, "--output", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert prepare.main([*common, "--output", str(tmp_path / "w2"), "--workers", "2"]) == 0
    one, two = tree_bytes(str(tmp_path / "w1")), tree_bytes(str(tmp_path / "w2"))
    assert sorted(one) == sorted(two) == ["meta.json", "tokenizer.model", "train.bin",
                                          "train.idx", "valid.bin", "valid.idx",
                                          "valid_documents.txt"]
    for name in one:  # meta.json included: --workers is not recorded
        assert one[name] == two[name], name
    meta = json.loads(one["meta.json"])
    # 150 + 2 good records and 4 files, many chunks of 64 documents.
    assert meta["train"]["documents"] + meta["valid"]["documents"] == 156
    notes = mixed_inputs[2]
    assert meta["bad_records"] == {
        "skipped": 3, "invalid_json": 1, "missing_text": 1, "undecodable": 1, "too_long": 0,
        "replaced_text_lines": 0,
        "examples": [
            f"{notes}:2: not valid JSON (Expecting property name enclosed in double quotes); "
            f"{readers.JSONL_HINT}",
            f"{notes}:3: no string field 'text' in this line; {readers.JSONL_HINT}",
            f"{notes}:4: bytes that are not UTF-8 (at byte 14 of the line)"]}
    # Re-running with another worker count is "already prepared", not a rebuild.
    assert prepare.main([*common, "--output", str(tmp_path / "w1"), "--workers", "2"]) == 0
    # ... but --strict does not accept a dataset that was built by skipping records.
    with pytest.raises(UserError, match=r"w1' was prepared from these inputs with 3 bad record\(s\) "
                       r"\(first: .*notes\.jsonl:2: not valid JSON.*--strict refuses"):
        prepare.main([*common, "--output", str(tmp_path / "w1"), "--strict"])


def test_strict_stops_at_first_bad_record_with_file_and_line(mixed_inputs, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(UserError) as info:
        prepare.main(["--input", *mixed_inputs, "--output", str(out), "--strict",
                      "--vocab-size", "400"])
    assert str(info.value) == (
        f"{mixed_inputs[2]}:2: not valid JSON (Expecting property name enclosed in double "
        f"quotes); {readers.JSONL_HINT} (--strict stops at the first bad record; drop --strict "
        "to skip and count them)")
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary directory
    proc = subprocess.run(
        [sys.executable, "-m", "locmoe_train.data.prepare", "--input", mixed_inputs[2],
         "--output", str(out), "--strict"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"error: {mixed_inputs[2]}:2: not valid JSON " \
        f"(Expecting property name enclosed in double quotes); {readers.JSONL_HINT} (--strict " \
        "stops at the first bad record; drop --strict to skip and count them)"
    with pytest.raises(UserError, match=r"^--workers 0 must be at least 1"):
        prepare.main(["--workers", "0", "--output", str(out)])


def test_bounded_ordered_map_keeps_order_and_a_bounded_window():
    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield i

    with ThreadPoolExecutor(3) as pool:
        out = []
        for result in bounded_ordered_map(pool, lambda x: x * x, items(), window=4):
            out.append(result)
            # Submitted but not yet consumed: never more than the window.
            assert len(pulled) - len(out) <= 4 - 1
    assert out == [i * i for i in range(40)]


# ------------------------------------------------------------- formats
def test_jsonl_gz_and_zst_read_like_jsonl(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", RECORDS[:5])
    gz = write_jsonl(tmp_path / "a.jsonl.gz", RECORDS[:5], opener=gzip.open)
    expected = [(f"{{}}:{i}", r["text"]) for i, r in enumerate(RECORDS[:5], start=1)]
    for path in (plain, gz):
        name = os.path.basename(path)
        assert list(iter_documents([path])) == [(i.format(name), t) for i, t in expected]
    # Compressed JSONL is found in directories too, in sorted order.
    assert [d for d, _ in iter_documents([str(tmp_path)])][:2] == [
        f"{tmp_path.name}/a.jsonl:1", f"{tmp_path.name}/a.jsonl:2"]
    txt_gz = tmp_path / "notes.txt.gz"
    txt_gz.write_bytes(gzip.compress(b"hello\n"))
    with pytest.raises(UserError, match=r"notes\.txt\.gz.* compressed but not JSONL"):
        list(iter_documents([str(txt_gz)]))


def test_jsonl_zst(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "a.jsonl.zst"
    data = "".join(json.dumps(r) + "\n" for r in RECORDS[:5]).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    assert list(iter_documents([str(path)])) == [
        (f"a.jsonl.zst:{i}", r["text"]) for i, r in enumerate(RECORDS[:5], start=1)]


def test_jsonl_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)  # import fails
    with pytest.raises(UserError) as info:
        list(iter_documents([str(path)]))
    assert str(info.value) == (
        f"input file {str(path)!r} is zstd-compressed, which needs the optional 'zstandard' "
        "package; run `pip install zstandard` (or decompress the file to .jsonl)")


def test_undecodable_and_too_long_records(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 40)
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"text": "short"}\n{"text": "' + b"x" * 100 + b'"}\n{"text": "\xe9"}\n'
                     b'{"text": "after"}')  # no final newline
    bad = BadRecords()
    assert list(iter_jsonl(str(path), bad)) == [(1, "short"), (4, "after")]
    assert bad.counts == {"invalid_json": 0, "missing_text": 0, "undecodable": 1, "too_long": 1}
    # Plain text: bad bytes are replaced (the document stays whole) and counted by line.
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"ok\nbad \xff here\nok\n")
    bad = BadRecords()
    assert list(iter_text(str(txt), bad, skip_binary=False)) == ["ok\nbad \ufffd here\nok\n"]
    assert bad.replaced_text_lines == 1 and bad.examples == [f"{txt}:2: bytes that are not UTF-8"]
    with pytest.raises(UserError, match=r"^.*t\.txt:2: bytes that are not UTF-8 \(--strict"):
        list(iter_text(str(txt), BadRecords(strict=True), skip_binary=False))


# ----------------------------------------------------------- streaming
def test_big_text_file_is_cut_at_line_breaks(tmp_path, monkeypatch):
    block, soft, hard = 64, 200, 300
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", block)
    monkeypatch.setattr(readers, "TEXT_DOC_BYTES", soft)
    monkeypatch.setattr(readers, "TEXT_DOC_MAX_BYTES", hard)
    lines = "".join(f"line {i} {'é' * (i % 7)}\n" for i in range(80))
    text = lines + "z" * 700  # ends with one line longer than the hard limit
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(iter_documents([str(path)]))
    assert "".join(t for _, t in docs) == text  # nothing lost, multi-byte chars intact
    assert [d for d, _ in docs] == ["big.txt"] + [f"big.txt#{k}" for k in range(2, len(docs) + 1)]
    sizes = [len(t.encode()) for _, t in docs]
    assert all(soft - block < s <= hard + block for s in sizes[:-1]), sizes
    line_docs = [t for _, t in docs if "z" not in t]
    assert len(line_docs) >= 3 and all(t.endswith("\n") for t in line_docs)
    assert any(set(t) == {"z"} and len(t) > hard for _, t in docs)  # the hard cut
    small = tmp_path / "small.txt"
    assert len(lines[:150].encode()) <= soft
    small.write_text(lines[:150])  # up to TEXT_DOC_BYTES: one document, as before
    assert list(iter_documents([str(small)])) == [("small.txt", lines[:150])]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_jsonl_reader_yields_before_the_file_is_complete(tmp_path):
    """Read from a pipe whose writer waits for the first document: no whole-file read."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    first_seen = threading.Event()
    wrote_rest = []

    def writer():
        with open(fifo, "w") as f:
            f.write(json.dumps({"text": "one"}) + "\n")
            f.flush()
            wrote_rest.append(first_seen.wait(timeout=30))
            f.write(json.dumps({"text": "two"}) + "\n")

    thread = threading.Thread(target=writer)
    thread.start()
    docs = iter_documents([str(fifo)])
    assert next(docs) == ("stream.jsonl:1", "one")
    first_seen.set()
    assert list(docs) == [("stream.jsonl:2", "two")]
    thread.join(timeout=30)
    assert wrote_rest == [True]  # the first document came out before the rest was written
