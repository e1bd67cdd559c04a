"""prepare-data under faults, made for real: a tokenizer worker SIGKILLed mid-chunk, a run
SIGKILLed mid-write (its work directory left behind), a second run on the same output, and
an input edited after the dataset was prepared."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from locmoe_train.data import prepare
from locmoe_train.data.encode_pool import STALL_ENV
from locmoe_train.errors import UserError

N_RECORDS = 400  # chunks of 64 documents: 7 chunks


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "c.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N_RECORDS):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n")
    return str(path)


def args(corpus: str, out: str, tiny_data: str, workers: int) -> list:
    return ["--input", corpus, "--output", out, "--workers", str(workers),
            "--tokenizer-path", os.path.join(tiny_data, "tokenizer.model")]


def wait_for_pid(path: str, proc=None, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and not proc.is_alive():
            pytest.fail(f"prepare-data ended before the hook (exit code {proc.exitcode})")
        if time.monotonic() > deadline:
            pytest.fail(f"no process reached the stall hook within {timeout} s")
        time.sleep(0.05)
    with open(path) as f:
        return int(f.read())


def test_a_sigkilled_worker_fails_the_run_within_seconds_naming_the_chunk(
        tmp_path, corpus, tiny_data, monkeypatch):
    """multiprocessing.Pool lost the dead worker's chunk and waited for it forever."""
    out, pid_file = str(tmp_path / "out"), str(tmp_path / "worker.pid")
    monkeypatch.setenv(STALL_ENV, f"2:{pid_file}")  # the worker of chunk 2 (docs 129-192)
    outcome = {}

    def run():
        try:
            outcome["rc"] = prepare.main(args(corpus, out, tiny_data, workers=2))
        except BaseException as exc:  # noqa: BLE001 -- examined below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)  # daemon: a hang fails, not blocks
    thread.start()
    pid = wait_for_pid(pid_file)
    assert pid != os.getpid()  # a real worker process, mid-chunk
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=30)  # a guard against a hang, not a speed assertion
    assert not thread.is_alive(), "prepare-data still waits for the killed worker after 30 s"
    error = outcome.get("error")
    assert isinstance(error, UserError), outcome  # exit status 2 from the CLI
    match = re.fullmatch(
        r"a tokenizer worker process died while the workers were on the input from document "
        r"'c\.jsonl:(\d+)' to document 'c\.jsonl:(\d+)' \(chunks? (\d+)(?:-(\d+))?\): it was "
        r"killed \(often by the out-of-memory killer; see `dmesg`\) or it crashed\. --output "
        + re.escape(repr(out)) + r" was not created; rerun with fewer --workers \(each holds "
        r"a tokenizer and 2 chunks\) or more memory", str(error))
    assert match, str(error)
    first_doc, last_doc, first_chunk = (int(g) for g in match.groups()[:3])
    last_chunk = int(match.group(4) or first_chunk)
    # The named documents are exactly the named chunks, and they hold the killed one.
    assert first_doc == 64 * (first_chunk - 1) + 1
    assert last_doc == min(64 * last_chunk, N_RECORDS)
    assert first_doc <= 129 and last_doc >= 192
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "worker.pid"]  # no out, no out.tmp-*


def test_a_killed_run_is_refused_while_it_runs_and_cleaned_after(tmp_path, corpus, tiny_data,
                                                                  capsys, monkeypatch):
    """The run is a forked copy of this process (torch and megatron-core already imported,
    so it starts in well under a second), SIGKILLed where it stalls at the test hook."""
    out, pid_file = str(tmp_path / "out"), str(tmp_path / "main.pid")
    monkeypatch.setenv(STALL_ENV, f"1:{pid_file}")  # --workers 1: the main process stalls
    proc = multiprocessing.get_context("fork").Process(
        target=prepare.main, args=(args(corpus, out, tiny_data, workers=1),))
    proc.start()
    monkeypatch.delenv(STALL_ENV)
    try:
        pid = wait_for_pid(pid_file, proc)
        assert pid == proc.pid
        work = f"{out}.tmp-{pid}"
        assert os.path.isfile(os.path.join(work, "tokenizer.model"))  # mid-write
        # A second run on the same output while the first one runs: refused, untouched.
        with pytest.raises(UserError) as info:
            prepare.main(args(corpus, out, tiny_data, workers=1))
        assert str(info.value) == (
            f"another prepare-data (pid {pid}) is writing --output {out!r} (work directory "
            f"{work!r}); wait for it to finish or choose another --output (if pid {pid} is "
            f"not a prepare-data run, delete {work!r})")
        assert os.path.isdir(work)
        os.kill(pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert os.path.isdir(work) and not os.path.exists(out)  # the real leftover
    capsys.readouterr()
    assert prepare.main(args(corpus, out, tiny_data, workers=1)) == 0
    assert (f"prepare-data: removed {work}: the incomplete work directory of a run that was "
            f"killed (pid {pid} no longer runs)") in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "main.pid", "out"]
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.model", "train.bin", "train.idx",
                                       "valid.bin", "valid.idx", "valid_documents.txt"]


def test_work_directories_of_another_host_or_a_reused_pid(tmp_path):
    from locmoe_train.data import output_dir

    out = str(tmp_path / "out")
    logged = []
    # Another host's run: its pid means nothing here, so it is named and left alone.
    other = f"{out}.tmp-{os.getpid() + 1}"
    os.makedirs(other)
    with open(os.path.join(other, output_dir.OWNER_FILE), "w") as f:
        json.dump({"host": socket.gethostname() + "-elsewhere", "pid": 1}, f)
    # A live process whose pid names a directory last written before it started: the
    # pid was reused, so the directory's run is gone.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        reused = f"{out}.tmp-{sleeper.pid}"
        os.makedirs(reused)
        an_hour_ago = time.time() - 3600
        os.utime(reused, (an_hour_ago, an_hour_ago))
        output_dir.clear_leftovers(out, logged.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not os.path.exists(reused) and os.path.isdir(other)
    # The order follows the directory names (pids as text): compare without it.
    assert sorted(logged) == sorted([
        f"leaving {other} alone: it belongs to a run on host {socket.gethostname()}-elsewhere "
        f"(pid {os.getpid() + 1}), which cannot be checked from here; delete it once that run "
        "is gone",
        f"removed {reused}: the incomplete work directory of a run that was killed (pid "
        f"{sleeper.pid} no longer runs)"])


def test_an_edited_input_is_not_already_prepared(tmp_path, corpus, tiny_data, capsys):
    out = str(tmp_path / "out")
    cmd = args(corpus, out, tiny_data, workers=1)
    assert prepare.main(cmd) == 0
    capsys.readouterr()
    assert prepare.main(cmd) == 0
    assert capsys.readouterr().out == (f"already prepared: {out} (same options and inputs; "
                                       "pass --force to rebuild)\n")
    size = os.path.getsize(corpus)
    with open(corpus, "a", encoding="utf-8") as f:  # one more record: new size and mtime
        f.write(json.dumps({"text": "def added():\n    return 'new'\n"}) + "\n")
    with pytest.raises(UserError) as info:
        prepare.main(cmd)
    assert str(info.value) == (
        f"--output {out!r} was prepared from inputs that have changed since ({corpus}: "
        f"{size} -> {os.path.getsize(corpus)} bytes); pass --force to prepare it again from "
        "the current inputs (the old dataset is replaced only once the new one is complete), "
        "or choose another --output")
    # The same size with other bytes (a later mtime) is a change too.
    assert prepare.main(cmd + ["--force"]) == 0
    meta = prepare.load_meta(out)
    assert meta["train"]["documents"] + meta["valid"]["documents"] == N_RECORDS + 1
    with open(corpus, "r+", encoding="utf-8") as f:
        f.write('{"text": "def g0(x):')  # was {"text": "def f0(x):
    with pytest.raises(UserError, match=re.escape(f"({corpus}: modified (same size))")):
        prepare.main(cmd)
    # A dataset from before the stamp was recorded: accepted as before, with a warning.
    del meta["inputs"]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    capsys.readouterr()
    assert prepare.main(cmd) == 0
    assert capsys.readouterr().out == (
        f"already prepared: {out} (same options; prepared by a version that did not record "
        "its inputs' sizes and times, so changed inputs go unnoticed: pass --force to "
        "rebuild)\n")
