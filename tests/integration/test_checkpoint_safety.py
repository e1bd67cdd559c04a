"""Loading a checkpoint never runs code from it (issue 19), through the CLI's ``main``.

A checkpoint whose ``trainer.pt`` or RNG file holds a pickle payload (one that
creates a marker file when unpickled) is refused with exit 2 and one line
naming the file and the option, and the marker never appears: on resume,
``inspect-checkpoint``, ``export-hf`` and ``adak`` (the pre-trained checkpoint
and the stage's own). With the option the same payload does run, which shows
the payload is real. A shard whose tensor does not match meta.json is refused
with a message, not a failure inside torch. A format-1 checkpoint (the
committed fixture) loads as before, and one of its files rewritten with
pickled objects loads only with ``checkpoint.allow_pickle``.

The commands run in this process (``helpers.run_main``): what is tested is what
they decide, not process start-up, which would take most of the time. The format-1
resume that is compared with recorded metrics keeps its own process (one thread,
as when it was recorded).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from helpers import assert_records_match, read_metrics, run_cli, run_main
from locmoe_train.checkpoint_verify import file_checksum
from test_old_checkpoint import FIXTURE, _timeless

TINY = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--moe.num_experts=4", "--moe.top_k=2", "--data.seq_len=32", "--parallel.ep=1",
        "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.eval_samples=8",
        "--optim.warmup_steps=2", "--logging.log_interval=1", "--train.eval_interval=0",
        "--logging.console=false"]
STAGE = ["--adak.warm_start_steps=2", "--adak.steps=1", "--adak.log_interval=1",
         "--adak.eval_interval=0", "--adak.checkpoint_interval=2", "--adak.keep=5"]


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_data):
    """A checkpoint at step 2 of 4, topk dropless: resumable, exportable, Ada-K-able."""
    root = tmp_path_factory.mktemp("safety")
    r = run_main(["--config", "configs/quickstart_topk.yaml", *TINY, f"--data.path={tiny_data}",
                  "--train.max_steps=4", "--train.exit_at_step=2", "--checkpoint.interval=2",
                  f"--logging.run_dir={root}/run", f"--checkpoint.dir={root}/ckpt"])
    assert r.returncode == 0, r.stderr[-3000:]
    return str(root / "ckpt" / "step_00000002")


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_data, pretrained):
    """An Ada-K stage checkpoint (step 2) on ``pretrained``."""
    out = tmp_path_factory.mktemp("stage") / "adak"
    r = _adak(tiny_data, pretrained, out, [])
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


def _adak(tiny_data, ckpt, out, extra):
    return run_main(["adak", "--config", "configs/adak/quickstart.yaml", "--checkpoint", str(ckpt),
                     *TINY, f"--data.path={tiny_data}", *STAGE, f"--adak.out_dir={out}", *extra])


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(ckpt: str, name: str, obj) -> None:
    """Replace ``ckpt/name`` by ``obj`` saved with plain torch.save (which pickles
    anything) and fix meta.json's size and checksum for it, so that only the content
    is wrong (as whoever crafts a file can do: the checksum detects damage only)."""
    if name.endswith(".safetensors"):
        safetensors.torch.save_file(obj, os.path.join(ckpt, name))
    else:
        torch.save(obj, os.path.join(ckpt, name))
    meta_path = os.path.join(ckpt, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["files"][name] = os.path.getsize(os.path.join(ckpt, name))
    if "checksums" in meta:  # the format-1 fixture has none
        meta["checksums"][name] = file_checksum(os.path.join(ckpt, name))
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def _poison(ckpt: str, name: str, marker) -> None:
    """``name``, still a working file, plus an entry that runs code when unpickled."""
    obj = torch.load(os.path.join(ckpt, name), weights_only=True)
    obj["extra"] = Payload(str(marker))
    _rewrite(ckpt, name, obj)


def _refused(r, name: str, option: str) -> None:
    """Exit 2 and one line, naming the file and how to allow it."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, r.stderr
    line = errors[0]
    assert line.startswith("error: checkpoint file ") and name in line and option in line, line
    assert "holds pickled Python objects (builtins.exec)" in line, line


@pytest.mark.parametrize("name", ["trainer.pt", "rng_rank00000.pt"])
def test_resume_refuses_a_pickle_payload(tmp_path, tiny_data, pretrained, name):
    ckpt = _copy(pretrained, tmp_path / "step_00000002")
    marker = tmp_path / "marker"
    _poison(ckpt, name, marker)
    run_dir = tmp_path / "run"
    r = run_main(["--config", "configs/quickstart_topk.yaml", *TINY, f"--data.path={tiny_data}",
                  "--train.max_steps=4", f"--logging.run_dir={run_dir}",
                  f"--checkpoint.resume={ckpt}", "--checkpoint.dir=null"])
    _refused(r, name, "--checkpoint.allow_pickle=true")
    assert not marker.exists()
    assert not run_dir.exists()  # stopped before writing anything


# The RNG file goes through the same loader (checkpoint_io.load_file) on every entry point:
# resume covers it; the other commands are checked with trainer.pt (suite time).
@pytest.mark.parametrize("name", ["trainer.pt"])
def test_inspect_and_export_refuse_a_pickle_payload(tmp_path, pretrained, name):
    pytest.importorskip("transformers")
    ckpt = _copy(pretrained, tmp_path / "step_00000002")
    marker = tmp_path / "marker"
    _poison(ckpt, name, marker)
    r = run_main(["inspect-checkpoint", ckpt])
    _refused(r, name, "--allow-pickle")
    r = run_main(["export-hf", ckpt, str(tmp_path / "hf"), "--tokenizer", "none"])
    _refused(r, name, "--allow-pickle")
    assert not marker.exists() and not (tmp_path / "hf").exists()
    # export-hf --allow-pickle accepts the checkpoint but reads only the shards: still no code.
    r = run_main(["export-hf", ckpt, str(tmp_path / "hf"), "--tokenizer", "none",
                  "--allow-pickle"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accepted (--allow-pickle) and not read" in r.stderr
    assert not marker.exists()
    # The payload is real: inspect-checkpoint --allow-pickle unpickles the file, and it runs.
    r = run_main(["inspect-checkpoint", ckpt, "--allow-pickle"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: unpickling {os.path.join(ckpt, name)} (--allow-pickle)" in r.stderr
    assert marker.exists()


@pytest.mark.parametrize("name", ["trainer.pt"])
def test_adak_refuses_a_pickle_payload_in_the_pretrained_checkpoint(tmp_path, tiny_data,
                                                                    pretrained, name):
    ckpt = _copy(pretrained, tmp_path / "step_00000002")
    marker = tmp_path / "marker"
    _poison(ckpt, name, marker)
    r = _adak(tiny_data, ckpt, tmp_path / "adak", [])
    _refused(r, name, "--allow-pickle")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["state.pt", "rng_rank00000.pt"])
def test_adak_refuses_a_pickle_payload_in_its_stage_checkpoint(tmp_path, tiny_data, pretrained,
                                                               stage, name):
    out = _copy(stage, tmp_path / "adak")
    marker = tmp_path / "marker"
    _poison(os.path.join(out, "checkpoints", "step_00000002"), name, marker)
    shutil.rmtree(os.path.join(out, "checkpoints", "step_00000003"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step_00000002\n")
    r = _adak(tiny_data, pretrained, out, ["--adak.resume=auto"])
    _refused(r, name, "--allow-pickle")
    assert not marker.exists()
    # Allowed, the stage resumes from it (and the payload runs: it was allowed to).
    r = _adak(tiny_data, pretrained, out, ["--adak.resume=auto", "--allow-pickle"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout and marker.exists()


SHARD = "shards_rank00000.safetensors"


def _stored_name(ckpt: str, key: str) -> str:
    """The name ``key``'s one piece is stored under (a world-1 checkpoint: one piece)."""
    with open(os.path.join(ckpt, "meta.json")) as f:
        (entry,) = json.load(f)["tensors"][key]
    return entry["name"]


def _shard_with(ckpt: str, key: str, value: torch.Tensor) -> None:
    shards = safetensors.torch.load_file(os.path.join(ckpt, SHARD))
    shards[_stored_name(ckpt, key)] = value
    _rewrite(ckpt, SHARD, shards)


@pytest.mark.parametrize("change, message", [
    (lambda t: t[:-64].clone(), "holds model/embedding.word_embeddings.weight|0|0 with shape "
                                "[32704], but meta.json says [32768]"),
    (lambda t: t.double(), "holds model/embedding.word_embeddings.weight|0|0 as float64, but "
                           "meta.json says float32"),
], ids=["shape", "dtype"])
def test_a_shard_that_does_not_match_its_metadata_is_refused(tmp_path, tiny_data, pretrained,
                                                             change, message):
    pytest.importorskip("transformers")
    ckpt = _copy(pretrained, tmp_path / "step_00000002")
    key = "model/embedding.word_embeddings.weight"
    stored = safetensors.torch.load_file(os.path.join(ckpt, SHARD))
    _shard_with(ckpt, key, change(stored[_stored_name(ckpt, key)]))
    runs = [run_main(["--config", "configs/quickstart_topk.yaml", *TINY,
                      f"--data.path={tiny_data}", "--train.max_steps=4",
                      f"--logging.run_dir={tmp_path / 'run'}", f"--checkpoint.resume={ckpt}",
                      "--checkpoint.dir=null"]),
            run_main(["inspect-checkpoint", ckpt]),
            run_main(["export-hf", ckpt, str(tmp_path / "hf"), "--tokenizer", "none"])]
    for r in runs:
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.strip().splitlines() == [
            f"error: checkpoint {ckpt}: {SHARD} {message}: the file was altered "
            f"or belongs to another checkpoint."]


def test_a_shard_and_metadata_that_do_not_fit_the_model_are_refused(tmp_path, tiny_data,
                                                                    pretrained):
    """Shard and meta.json agree, but on a tensor shape this model does not have."""
    ckpt = _copy(pretrained, tmp_path / "step_00000002")
    key = "model/decoder.final_layernorm.weight"
    _shard_with(ckpt, key, torch.ones(63))
    meta_path = os.path.join(ckpt, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["tensors"][key][0]["shape"] = [63]
    meta["tensors"][key][0]["range"] = [0, 63]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    r = run_main(["--config", "configs/quickstart_topk.yaml", *TINY, f"--data.path={tiny_data}",
                  "--train.max_steps=4", f"--logging.run_dir={tmp_path / 'run'}",
                  f"--checkpoint.resume={ckpt}", "--checkpoint.dir=null"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"error: checkpoint {ckpt}: {key} has shape [63], this model needs [64]: it was saved "
        f"from a different model, or its meta.json was altered."]


def test_every_file_written_needs_no_unpickler(pretrained, stage):
    """What the trainer and the Ada-K stage write names no class or function that the
    weights-only unpickler does not allow, and loads with it."""
    dirs = [pretrained, os.path.join(stage, "checkpoints", "step_00000002")]
    for d in dirs:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        assert meta["format"] == 3
        pt = [f for f in meta["files"] if f.endswith(".pt")]
        assert len(pt) >= 2
        for f in pt:
            assert torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(d, f)) == []
            torch.load(os.path.join(d, f), weights_only=True)
        # The shard files are safetensors: raw tensors and a JSON header, nothing pickled.
        for f in meta["files"]:
            assert f.endswith((".pt", ".safetensors", ".json")), f
            if f.endswith(".safetensors"):
                assert safetensors.torch.load_file(os.path.join(d, f))
    rng = torch.load(os.path.join(pretrained, "rng_rank00000.pt"), weights_only=True)
    assert set(rng) == {"cpu", "cuda", "python", "numpy", "tracker"}
    assert set(rng["tracker"]) == {"data-parallel-rng", "model-parallel-rng",
                                   "expert-parallel-rng"}
    with open(os.path.join(pretrained, "meta.json")) as f:
        entries = json.load(f)["tensors"]["model/embedding.word_embeddings.weight"]
    assert entries[0]["dtype"] == "float32" and entries[0]["shape"] == [512, 64]


def test_format_1_checkpoint_loads_both_ways(tmp_path, tiny_data):
    """The committed format-1 fixture: its files hold only tensors and plain values, so it
    loads safely without the option. Rewritten as other code might have written it (NumPy
    values in trainer.pt, which only the full unpickler reads), it is refused without
    ``checkpoint.allow_pickle`` and resumes with it, matching the old code's records."""
    plain = _copy(os.path.join(FIXTURE, "step_00000002"), tmp_path / "plain" / "step_00000002")
    r = run_main(["inspect-checkpoint", plain, "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["status"] == "ok"

    old = _copy(plain, tmp_path / "old" / "step_00000002")
    trainer = torch.load(os.path.join(old, "trainer.pt"), weights_only=True)
    trainer["loader"] = {k: np.int64(v) for k, v in trainer["loader"].items()}
    _rewrite(old, "trainer.pt", trainer)
    with open(os.path.join(old, "meta.json")) as f:
        assert json.load(f)["format"] == 1
    args = ["--config", os.path.join(FIXTURE, "config.yaml"), f"--data.path={tiny_data}",
            f"--checkpoint.resume={old}", "--checkpoint.dir=null",
            "--moe.capacity.statistic=outsider_q"]
    r = run_main(args + [f"--logging.run_dir={tmp_path / 'refused'}"])
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint file {os.path.join(old, 'trainer.pt')} holds "
                           f"pickled Python objects (numpy.")
    assert line.endswith("with --checkpoint.allow_pickle=true.")
    r = run_main(["inspect-checkpoint", old])
    assert r.returncode == 2 and "--allow-pickle" in r.stderr
    r = run_main(["inspect-checkpoint", old, "--allow-pickle"])
    assert r.returncode == 0, r.stderr[-3000:]

    run_dir = tmp_path / "allowed"
    r = run_cli(args + [f"--logging.run_dir={run_dir}", "--checkpoint.allow_pickle=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: unpickling {os.path.join(old, 'trainer.pt')}" in r.stderr
    assert "at step 2" in r.stdout
    with open(os.path.join(FIXTURE, "continuation.json")) as f:
        expected = json.load(f)
    assert_records_match([_timeless(rec) for rec in read_metrics(str(run_dir))], expected)
