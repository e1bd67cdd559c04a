"""The run-directory lock (locmoe_train/runlock.py) without training anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from locmoe_train.errors import UserError
from locmoe_train.runlock import ENV, RunLock, acquire, check_free, held_by

HOST = socket.gethostname()
HOLD = ("import sys, time; from locmoe_train.runlock import acquire; "
        "lock = acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)")


@pytest.fixture
def holder(tmp_path):
    """Another live process that holds tmp_path/run's lock."""
    run_dir = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    yield run_dir, p
    p.kill()
    p.wait()


def test_a_live_holder_refuses_a_second_run(holder):
    run_dir, p = holder
    message = (f"{run_dir} is in use by pid {p.pid} on host {HOST}: wait for that run to end, "
               f"stop it, or give this run another logging.run_dir.")
    with pytest.raises(UserError) as e:
        acquire(run_dir)
    assert str(e.value) == message
    with pytest.raises(UserError) as e:
        check_free(run_dir)
    assert str(e.value) == message
    assert held_by(run_dir) == f"pid {p.pid} on host {HOST}"


def test_a_killed_holders_lock_is_taken_over_with_a_warning(holder, capsys):
    run_dir, p = holder
    p.kill()
    p.wait()
    assert held_by(run_dir) is None and os.path.exists(os.path.join(run_dir, ".lock"))
    lock = acquire(run_dir)
    assert capsys.readouterr().err == (f"warning: taking over the stale lock of {run_dir} "
                                       f"(pid {p.pid} on {HOST} is gone)\n")
    assert json.load(open(os.path.join(run_dir, ".lock"))) == {"pid": os.getpid(), "host": HOST}
    lock.release()
    assert os.listdir(run_dir) == []  # a clean release leaves no lock file


def test_a_lock_from_another_host_is_not_taken(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere"}))
    with pytest.raises(UserError, match=f"names pid 4242 on host elsewhere, which cannot be "
                                        f"checked from {HOST}: if no run is alive there, delete"):
        acquire(str(run_dir))


def test_a_run_refused_leaves_no_directory_behind(tmp_path):
    run_dir = str(tmp_path / "new")
    acquire(run_dir).release()
    assert not os.path.exists(run_dir)


def test_a_sweep_holds_the_lock_for_its_trainer(holder, monkeypatch):
    run_dir, p = holder
    monkeypatch.setenv(ENV, str(p.pid))  # as the sweep's child_env() says
    lock = RunLock.try_acquire(run_dir)
    assert isinstance(lock, RunLock) and not lock.owned
    lock.release()
    assert held_by(run_dir) == f"pid {p.pid} on host {HOST}"  # still the sweep's
