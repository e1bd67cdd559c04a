"""The checksum benchmark runs end to end (in-process, 2 MB) and writes its JSON, and
leaves the folder it was given as it found it."""

import importlib.util
import json
import os

from helpers import REPO


def test_bench_checksum_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_checksum", os.path.join(REPO, "scripts", "bench_checksum.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "mine.txt").write_text("kept")
    out = tmp_path / "bench.json"
    assert bench.main(["--mb", "2", "--repeats", "1", "--dir", str(tmp_path),
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["hash"]) == {"crc32", "adler32", "md5", "sha1", "sha256", "blake2b"}
    assert set(data["save_with_fsync"]) == {"plain", "crc32_during_fsync",
                                            "crc32_while_writing", "sha256_while_writing"}
    assert all(v > 0 for v in [*data["hash"].values(), *data["save_with_fsync"].values(),
                               data["verify_crc32_page_cache"]])
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "mine.txt"]
