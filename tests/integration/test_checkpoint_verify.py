"""A damaged checkpoint file is detected, and meta.json cannot name a file outside its
checkpoint (issue 23, items 9 and 8), on checkpoints of a real run (in-process).

* Every saved file's CRC-32, taken while it was written, is in meta.json and equals
  the CRC-32 of the file's bytes.
* A shard overwritten in place with bytes of the same size (what a torn copy or bit
  rot leaves; the size check cannot see it): an explicit resume exits 2 naming the
  file, ``resume=auto`` falls back to the previous checkpoint with a warning, and
  ``inspect-checkpoint --verify`` exits 2 naming it (without ``--verify`` it reads no
  data and says the checksums were not checked).
* meta.json edited to name ``../../file`` or an absolute path (a real torch file of
  the right size, so the old code read it): refused by every reader, and no such
  path is opened or even looked at.
* On 2 ranks each rank hashes about half the bytes, and both get the same verdict.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import pytest
import torch

from harness import run_ranks
from locmoe_train import train
from locmoe_train.checkpoint import read_full_tensors, validate_checkpoint
from locmoe_train.checkpoint_pieces import PieceFiles
from locmoe_train.checkpoint_plan import Assembler
from locmoe_train.checkpoint_dirs import StepWrite
from locmoe_train.errors import UserError

TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2",
        "--model.hidden_size=64", "--model.num_attention_heads=4", "--moe.num_experts=4",
        "--moe.top_k=2", "--data.seq_len=32", "--parallel.ep=1", "--train.global_batch_size=8",
        "--train.micro_batch_size=4", "--train.eval_samples=8", "--train.eval_interval=0",
        "--optim.warmup_steps=2", "--logging.log_interval=1", "--logging.console=false",
        "--checkpoint.interval=2", "--checkpoint.keep=5"]
SHARD = "shards_rank00000.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_data):
    """A run directory with checkpoints at steps 2 and 4 (of 6)."""
    root = tmp_path_factory.mktemp("verify")
    rc = train.main([*TINY, f"--data.path={tiny_data}", "--train.max_steps=6",
                     "--train.exit_at_step=4", f"--logging.run_dir={root}/run"])
    assert rc == 0
    return root / "run"


@pytest.fixture
def run_copy(saved, tmp_path):
    """A fresh copy of ``saved`` that a test may damage."""
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def _meta(step_dir) -> dict:
    with open(os.path.join(step_dir, "meta.json")) as f:
        return json.load(f)


def _write_meta(step_dir, meta: dict) -> None:
    with open(os.path.join(step_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


def _crc32(path) -> str:
    with open(path, "rb") as f:
        return f"crc32:{zlib.crc32(f.read()):08x}"


def _rename(meta: dict, old: str, new: str) -> None:
    """meta.json's entries for file ``old`` (size, checksum) under the name ``new``."""
    meta["files"][new] = meta["files"].pop(old)
    if "checksums" in meta:
        meta["checksums"][new] = meta["checksums"].pop(old)


def _flip_middle(path) -> None:
    """Overwrite 64 bytes in the middle of ``path`` in place: same size, other bytes."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    assert os.path.getsize(path) == size


def test_every_saved_file_has_the_crc32_of_its_bytes(saved):
    for step in (2, 4):
        step_dir = saved / "checkpoints" / f"step_{step:08d}"
        meta = _meta(step_dir)
        assert sorted(meta["checksums"]) == sorted(meta["files"]) == \
            ["rng_rank00000.pt", SHARD, "trainer.pt"]
        for name, value in meta["checksums"].items():
            assert value == _crc32(step_dir / name)


def test_a_shard_overwritten_in_place_is_detected(run_copy, tiny_data, capsys):
    ckdir = run_copy / "checkpoints"
    newest, previous = ckdir / "step_00000004", ckdir / "step_00000002"
    saved_crc = _crc32(newest / SHARD)  # what the save stored (the test above)
    _flip_middle(newest / SHARD)
    problem = (f"{SHARD} does not match its checksum (meta.json: {saved_crc}, file: "
               f"{_crc32(newest / SHARD)}): it was damaged or overwritten after the save")
    assert validate_checkpoint(str(newest)) == problem
    assert validate_checkpoint(str(previous)) is None
    args = [*TINY, f"--data.path={tiny_data}", "--train.max_steps=6",
            f"--logging.run_dir={run_copy}"]

    capsys.readouterr()
    assert train.main([*args, f"--checkpoint.resume={newest}"]) == 2
    out = capsys.readouterr()
    assert out.err.strip() == f"error: checkpoint.resume='{newest}': {problem}"

    assert train.main(["inspect-checkpoint", str(newest), "--verify"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: checkpoint {newest} is not usable: {problem}"
    # Without --verify no file is read in full: the damage is not seen, and it says so.
    assert train.main(["inspect-checkpoint", str(newest)]) == 0
    assert "checksums: stored, not checked (--verify reads every file and checks it)" \
        in capsys.readouterr().out
    assert train.main(["inspect-checkpoint", str(previous), "--verify"]) == 0
    assert "checksums: all 3 files match" in capsys.readouterr().out

    assert train.main([*args, "--checkpoint.resume=auto"]) == 0
    out = capsys.readouterr()
    assert f"warning: skipping checkpoint {newest}: {problem}" in out.err
    assert f"resumed from {previous} at step 2" in out.out


def test_a_checkpoint_without_checksums_is_checked_by_size(run_copy, capsys):
    """Saved by an older version: accepted; --verify says there is nothing to verify."""
    step_dir = run_copy / "checkpoints" / "step_00000004"
    meta = _meta(step_dir)
    del meta["checksums"]
    _write_meta(step_dir, meta)
    assert validate_checkpoint(str(step_dir)) is None
    assert train.main(["inspect-checkpoint", str(step_dir), "--verify"]) == 0
    assert "checksums: none stored (saved by an older version): sizes checked only" \
        in capsys.readouterr().out


@pytest.mark.parametrize("change, problem", [
    (lambda m: m["checksums"].pop("trainer.pt"),
     "meta.json has no checksum for trainer.pt, though it has for other files"),
    (lambda m: m["checksums"].update({"extra.pt": "crc32:00000000"}),
     "meta.json has a checksum for extra.pt, which is not one of its files"),
    (lambda m: m["checksums"].update({"trainer.pt": "sha7:00"}),
     "trainer.pt has a checksum of unknown kind 'sha7:00' (this version checks crc32); a "
     "newer version saved it, or meta.json was altered"),
])
def test_checksums_that_do_not_fit_the_files_are_refused(run_copy, change, problem):
    step_dir = run_copy / "checkpoints" / "step_00000002"
    meta = _meta(step_dir)
    change(meta)
    _write_meta(step_dir, meta)
    assert validate_checkpoint(str(step_dir)) == problem


class _Opened:
    """Records every path stat'ed, opened or torch.load'ed (the calls go through)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        for module, name in ((os, "stat"), (torch, "load")):
            real = getattr(module, name)

            def spy(path, *a, _real=real, **kw):
                self._note(path)
                return _real(path, *a, **kw)
            monkeypatch.setattr(module, name, spy)
        real_open = open

        def spy_open(path, *a, **kw):
            self._note(path)
            return real_open(path, *a, **kw)
        monkeypatch.setattr("builtins.open", spy_open)

    def _note(self, path) -> None:
        if isinstance(path, (str, os.PathLike)):  # not a file descriptor or object
            self.paths.append(os.path.abspath(os.fspath(path)))


@pytest.mark.parametrize("absolute", [False, True])
def test_meta_json_cannot_name_a_file_outside_the_checkpoint(run_copy, tiny_data, tmp_path,
                                                             monkeypatch, capsys, absolute):
    step_dir = run_copy / "checkpoints" / "step_00000004"
    # A real shard file outside, of the right size: the old code checked its size and
    # read its tensors as the checkpoint's.
    outside = tmp_path / "outside.pt"
    shutil.move(step_dir / SHARD, outside)
    name = str(outside) if absolute else os.path.relpath(outside, step_dir)
    assert absolute or name.startswith("../../")
    meta = _meta(step_dir)
    _rename(meta, SHARD, name)
    for entries in meta["tensors"].values():
        for entry in entries:
            entry["file"] = name
    _write_meta(step_dir, meta)
    why = ("it is a path, not a name inside the checkpoint directory (meta.json was altered; "
           "a checkpoint's files are plain names inside its directory)")
    problem = f"meta.json names the file {name!r}, which is refused: {why}"

    opened = _Opened(monkeypatch)
    assert validate_checkpoint(str(step_dir)) == problem
    with pytest.raises(UserError) as e:
        read_full_tensors(str(step_dir))
    assert str(e.value) == f"checkpoint {step_dir} is not usable: {problem}"
    # A reader given the edited meta.json without validation refuses it too.
    with pytest.raises(UserError) as e:
        Assembler(PieceFiles(str(step_dir), meta), meta).full(next(iter(meta["tensors"])))
    assert str(e.value) == f"checkpoint {step_dir}: {problem}."
    assert train.main(["inspect-checkpoint", str(step_dir), "--verify"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: checkpoint {step_dir} is not usable: {problem}"
    assert train.main([*TINY, f"--data.path={tiny_data}", "--train.max_steps=6",
                       f"--logging.run_dir={run_copy}", f"--checkpoint.resume={step_dir}"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: checkpoint.resume='{step_dir}': {problem}"
    assert opened.paths and str(outside) not in opened.paths


@pytest.mark.parametrize("name, why", [
    ("..", "it names a directory"),
    (".", "it names a directory"),
    ("sub/trainer.pt", "it is a path, not a name inside the checkpoint directory"),
    ("..\\trainer.pt", "it is a path, not a name inside the checkpoint directory"),
    ("trainer.pt\0.x", "it contains a NUL character"),
    ("", "it is not a file name"),
])
def test_names_that_could_leave_the_directory_are_refused(run_copy, name, why):
    step_dir = run_copy / "checkpoints" / "step_00000002"
    meta = _meta(step_dir)
    _rename(meta, "trainer.pt", name)
    _write_meta(step_dir, meta)
    assert validate_checkpoint(str(step_dir)) == (
        f"meta.json names the file {name!r}, which is refused: {why} (meta.json was "
        f"altered; a checkpoint's files are plain names inside its directory)")


def _validate_on_rank(rank: int, step_dir: str) -> tuple:
    """Validate ``step_dir`` as the trainer's ranks do: the verdict, what this rank
    hashed, and the checksums every rank gathers (as the Ada-K stage's save does)."""
    from types import SimpleNamespace

    from locmoe_train import checkpoint_verify

    hashed = []
    real = checkpoint_verify.file_checksum

    def spy(path):
        hashed.append(os.path.basename(path))
        return real(path)
    checkpoint_verify.file_checksum = spy
    pctx = SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0)
    problem = validate_checkpoint(step_dir, pctx=pctx)
    # The save's gather (StepWrite, which the Ada-K stage's save uses too).
    write = StepWrite(os.path.dirname(step_dir), 99, pctx)
    sums = {}
    for rank_sums in write.gather({f"rng_rank{rank:05d}.pt": str(rank)}):
        sums.update(rank_sums)
    return problem, hashed, sums


def test_ranks_share_the_hashing_and_agree(run_copy):
    step_dir = run_copy / "checkpoints" / "step_00000004"
    _flip_middle(step_dir / "trainer.pt")  # a small file: not the shard's rank hashes it
    (p0, hashed0, sums0), (p1, hashed1, sums1) = run_ranks(_validate_on_rank, 2, str(step_dir))
    assert sorted(hashed0 + hashed1) == ["rng_rank00000.pt", SHARD, "trainer.pt"]
    assert hashed0 == [SHARD]  # the largest file alone is the heavier share
    assert p0 == p1 and p1.startswith("trainer.pt does not match its checksum")
    assert sums0 == sums1 == {"rng_rank00000.pt": "0", "rng_rank00001.pt": "1"}


def _resume_on_rank(rank: int, ckpt_dir: str, resume: str) -> tuple:
    """Find the resume point as ``Checkpointer.resolve_resume`` does on 2 ranks: rank 0
    alone runs the cheap checks, every rank verifies its share of the checksums.
    Returns the path, or the UserError's message."""
    from types import SimpleNamespace

    from locmoe_train.checkpoint_dirs import resume_point

    pctx = SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0)
    try:
        return "ok", resume_point(resume, ckpt_dir, "checkpoint.resume",
                                  lambda p: validate_checkpoint(p, verify=False), pctx,
                                  verify=lambda p: validate_checkpoint(p, pctx=pctx))
    except UserError as e:
        return "error", str(e)


def test_two_ranks_resume_past_a_damaged_checkpoint_together(run_copy):
    """The checksum check is a collective that rank 0's choice must not skip: on 2 ranks
    ``auto`` refuses the damaged newest checkpoint on both ranks, both take the previous
    one, and the damaged one is moved aside, not deleted; an explicit path to it exits 2
    on both ranks with the same message."""
    ckpt = run_copy / "checkpoints"
    _flip_middle(ckpt / "step_00000004" / SHARD)
    explicit = str(ckpt / "step_00000004")
    (k0, v0), (k1, v1) = run_ranks(_resume_on_rank, 2, str(ckpt), explicit)
    assert k0 == k1 == "error" and v0 == v1
    assert v0.startswith(f"checkpoint.resume={explicit!r}: {SHARD} does not match its checksum")
    (k0, v0), (k1, v1) = run_ranks(_resume_on_rank, 2, str(ckpt), "auto")
    assert (k0, v0) == (k1, v1) == ("ok", str(ckpt / "step_00000002"))
    assert not (ckpt / "step_00000004").exists()
    moved = [d for d in os.listdir(ckpt) if d.startswith("superseded-")]
    assert len(moved) == 1 and os.path.isfile(ckpt / moved[0] / "step_00000004" / SHARD)
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
