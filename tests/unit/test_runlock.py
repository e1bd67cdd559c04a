"""The run-directory lock (locmoe_train/runlock.py) without training anything."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

from locmoe_train import runlock
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


def _foreign_lock(run_dir) -> str:
    """A lock file left by a killed run on another host (nobody holds its flock here)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    with open(path, "w") as f:
        json.dump({"pid": 4242, "host": "elsewhere"}, f)
    return path


def test_a_lock_from_another_host_is_taken_only_when_told(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    path = _foreign_lock(run_dir)
    message = (f"{path} names pid 4242 on host elsewhere, which cannot be checked from {HOST}. "
               f"If no run is alive there (a killed or requeued job), start again with "
               f"--logging.take_over_lock=true (launch/slurm.sbatch passes it on a requeue), "
               f"or delete {path}.")
    for refuse in (lambda: acquire(run_dir), lambda: check_free(run_dir)):
        with pytest.raises(UserError) as e:
            refuse()
        assert str(e.value) == message
    assert json.load(open(path)) == {"pid": 4242, "host": "elsewhere"}  # left as it was
    check_free(run_dir, take_over=True)
    lock = acquire(run_dir, take_over=True)
    assert capsys.readouterr().err == (
        f"warning: taking over the lock of {run_dir} left by pid 4242 on host elsewhere "
        f"(logging.take_over_lock=true: no run is alive there)\n")
    assert json.load(open(path)) == {"pid": os.getpid(), "host": HOST}
    lock.release()
    assert not os.path.exists(path)


# A holder whose lock file names another host, as a shared file system shows it.
HOLD_AS_ELSEWHERE = (
    "import json, sys, time; from locmoe_train.runlock import acquire; "
    "lock = acquire(sys.argv[1]); lock.file.seek(0); lock.file.truncate(); "
    "lock.file.write(json.dumps({'pid': 7, 'host': 'elsewhere'})); lock.file.flush(); "
    "print('held', flush=True); time.sleep(60)")


def test_a_held_lock_is_never_taken_over(tmp_path):
    """As on a file system that passes flock between hosts: the holder's flock is seen
    here while its file names the other host. The override must not take it."""
    run_dir = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", HOLD_AS_ELSEWHERE, run_dir],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "held\n"
        message = (f"{run_dir} is in use by pid 7 on host elsewhere: wait for that run to end, "
                   f"stop it, or give this run another logging.run_dir.")
        for refuse in (lambda: acquire(run_dir, take_over=True),
                       lambda: check_free(run_dir, take_over=True)):
            with pytest.raises(UserError) as e:
                refuse()
            assert str(e.value) == message
    finally:
        p.kill()
        p.wait()


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


def _mount_of(path) -> str:
    """The file system that holds ``path``, as util-linux's findmnt names it."""
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,TARGET", "--target", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    return f"{out[0]} at {out[1]}"


@pytest.fixture
def flock_fails(monkeypatch):
    """Make the flock syscall fail with a given errno, as a file system would; records
    the operations asked for."""
    calls = []

    def set_errno(code):
        def flock(f, op):
            calls.append(op)
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(runlock.fcntl, "flock", flock)
        monkeypatch.setattr(runlock, "_warned", set(), raising=False)
        return calls

    return set_errno


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_runs_with_a_warning(tmp_path, flock_fails, capsys, code):
    calls = flock_fails(code)
    fresh, stale = str(tmp_path / "fresh"), str(tmp_path / "stale")
    warning = ("warning: the run lock {}/.lock is not enforced: its file system ({}) does not "
               "support flock ({}: {}); this run goes on, but nothing stops a second run on {}: "
               "make sure only one run uses it.\n")
    lock = acquire(fresh)
    assert capsys.readouterr().err == warning.format(
        fresh, _mount_of(tmp_path), errno.errorcode[code], os.strerror(code), fresh)
    assert held_by(fresh) is None
    check_free(fresh)
    again = acquire(fresh)  # nothing can refuse it here: the warning said so, once
    assert capsys.readouterr().err == ""
    again.release()
    lock.release()
    assert not os.path.exists(fresh)  # the file and directory it made are gone again
    # A killed run's lock file, from another host: not "in use", and left as it was.
    path = _foreign_lock(stale)
    check_free(stale)
    acquire(stale).release()
    assert json.load(open(path)) == {"pid": 4242, "host": "elsewhere"}
    assert capsys.readouterr().err == warning.format(
        stale, _mount_of(tmp_path), errno.errorcode[code], os.strerror(code), stale)
    assert set(calls) == {fcntl.LOCK_EX | fcntl.LOCK_NB}  # never an unlock of a lock not held


@pytest.mark.parametrize("code", [errno.EWOULDBLOCK, errno.EACCES])
def test_flock_busy_still_refuses_naming_the_holder(tmp_path, flock_fails, code):
    flock_fails(code)
    run_dir = str(tmp_path / "run")
    _foreign_lock(run_dir)
    assert held_by(run_dir) == "pid 4242 on host elsewhere"
    for refuse in (lambda: acquire(run_dir, take_over=True), lambda: check_free(run_dir)):
        with pytest.raises(UserError, match=f"^{run_dir} is in use by pid 4242 on host elsewhere: "):
            refuse()


def test_another_flock_error_is_named_not_taken_for_in_use(tmp_path, flock_fails):
    flock_fails(errno.EIO)
    run_dir = str(tmp_path / "run")
    path = _foreign_lock(run_dir)
    message = (f"cannot lock {path}: flock failed with EIO (Input/output error) on "
               f"{_mount_of(tmp_path)}; check that file system, or give this run a "
               f"logging.run_dir on another one.")
    for call in (lambda: acquire(run_dir), lambda: check_free(run_dir), lambda: held_by(run_dir)):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == message


def test_the_override_does_not_make_a_sweep_run_changed():
    """A sweep re-run with logging.take_over_lock=true (to clear a stale lock) continues
    its runs instead of calling them "changed": the key alters nothing they compute."""
    from locmoe_train.config import TrainConfig
    from locmoe_train.sweep.runner import config_changes

    started, now = TrainConfig().to_dict(), TrainConfig().to_dict()
    now["logging"]["take_over_lock"] = True
    assert config_changes(started, now) == []
    now["logging"]["log_interval"] = 5  # while a key that matters still counts
    assert config_changes(started, now) == ["logging.log_interval: 10 -> 5"]
