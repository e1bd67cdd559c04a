"""TensorBoard and wandb sinks: records written through them read back with the same values."""

from __future__ import annotations

import glob
import json
import os
import struct
import threading

import pytest

from locmoe_train.config import load_config
from locmoe_train.errors import UserError
from locmoe_train.sinks.trackers import TensorBoardSink, WandbSink, expert_counts, scalars
from helpers import strict_loads
from locmoe_train.sinks.base import ConsoleSink, JsonlSink, MultiSink


def train_record(step: int, loss: float) -> dict:
    """The shape ``Trainer._log_train`` writes for a 2-layer, 4-expert MoE."""
    return {
        "step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 0.5, "tokens_per_s": 2000.0,
        "step_time_s": 0.25,
        "moe": {
            "layer_0": {"tokens_per_expert": [10, 0, 30, 24], "max_over_mean": 1.875,
                        "dropped_fraction": 0.0, "unrouted_fraction": 0.0,
                        "same_node_share": 0.75, "load_balancing_loss": 1.1,
                        "capacity": 40, "capacity_target": None},
            "layer_1": {"tokens_per_expert": [16, 16, 16, 16], "max_over_mean": 1.0,
                        "dropped_fraction": 0.125, "unrouted_fraction": 0.0,
                        "same_node_share": 0.5, "load_balancing_loss": 1.0,
                        "capacity": 36, "capacity_target": None},
        },
        "moe_imbalance": 1.875, "moe_capacity": 36, "aux_loss": 0.021,
        "capacity_events": [{"layer": 0, "old": 38, "new": 40, "reason": "grow", "step": step}],
    }


EVAL = {"step": 5, "val_loss": 2.0, "val_ppl": 7.38905609893065}
RECORDS = [train_record(1, 6.25), train_record(5, 5.5), EVAL]


def test_record_names():
    names = scalars(train_record(1, 6.25))
    assert names["train/loss"] == 6.25 and names["train/lr"] == 1e-3
    assert names["moe/imbalance"] == 1.875 and names["moe/capacity"] == 36
    assert names["moe/layer_1/dropped_fraction"] == 0.125
    assert names["moe/layer_0/load_balancing_loss"] == 1.1
    # Not-yet-measured gauges (None), lists and the step are not scalars.
    assert not [k for k in names if "capacity_target" in k or "tokens_per_expert" in k
                or k.endswith("capacity_events") or k == "train/step"]
    assert scalars(EVAL) == {"val/loss": 2.0, "val/ppl": EVAL["val_ppl"]}
    assert expert_counts(train_record(1, 6.25)) == {
        "moe/layer_0/tokens_per_expert": [10, 0, 30, 24],
        "moe/layer_1/tokens_per_expert": [16, 16, 16, 16]}


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(str(tmp_path / "tensorboard"))
    for r in RECORDS:
        sink.write(r)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()

    def values(tag):
        return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]

    assert values("train/loss") == [(1, 6.25), (5, 5.5)]
    assert values("train/lr") == [(1, 1e-3), (5, 5e-3)]
    assert values("moe/layer_0/max_over_mean") == [(1, 1.875), (5, 1.875)]
    assert values("moe/layer_1/dropped_fraction") == [(1, 0.125), (5, 0.125)]
    assert values("moe/layer_0/capacity") == [(1, 40), (5, 40)]
    assert values("val/ppl") == [(5, EVAL["val_ppl"])]
    tags = acc.Tags()
    assert not [t for t in tags["scalars"] if "capacity_target" in t]
    hist = acc.Histograms("moe/layer_0/tokens_per_expert")
    assert [h.step for h in hist] == [1, 5]
    h = hist[0].histogram_value
    assert list(h.bucket) == [10, 0, 30, 24] and list(h.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    assert (h.min, h.max, h.num, h.sum) == (0, 3, 64, 0 * 10 + 2 * 30 + 3 * 24)
    assert "moe/layer_1/tokens_per_expert" in tags["histograms"]


def read_wandb_history(run_dir: str) -> list[dict]:
    """History rows of an offline run's ``.wandb`` file (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def wandb_sink(run_dir, **kw) -> WandbSink:
    return WandbSink(str(run_dir), project="test", entity=None, name=None, mode="offline",
                     config={"train": {"max_steps": 5}}, finish_timeout_s=60, **kw)


def test_wandb_offline_run_read_back(tmp_path):
    sink = wandb_sink(tmp_path)
    for r in RECORDS:
        sink.write(r)
    sink.close()
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert run.endswith(run_id) and os.path.exists(os.path.join(run, f"run-{run_id}.wandb"))
    rows = read_wandb_history(str(tmp_path))
    # Steps 1 and 5 (train and eval merged into one row).
    assert [r["_step"] for r in rows] == [1, 5]
    assert rows[0]["train/loss"] == 6.25 and rows[1]["train/loss"] == 5.5
    assert rows[1]["val/ppl"] == pytest.approx(EVAL["val_ppl"])
    assert rows[1]["moe/layer_1/dropped_fraction"] == 0.125
    # A histogram is stored as its parts.
    assert rows[0]["moe/layer_0/tokens_per_expert/_type"] == "histogram"
    assert rows[0]["moe/layer_0/tokens_per_expert/values"] == [10, 0, 30, 24]
    assert rows[0]["moe/layer_0/tokens_per_expert/bins"] == [-0.5, 0.5, 1.5, 2.5, 3.5]
    # A resumed run continues the same wandb run; a fresh one starts a new id.
    resumed = wandb_sink(tmp_path, resuming=True)
    resumed.close()
    assert resumed.run_id == run_id
    fresh = wandb_sink(tmp_path)
    fresh.close()
    assert fresh.run_id != run_id
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == fresh.run_id


def test_failing_wandb_log_does_not_stop_other_sinks(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_log(self, *args, **kwargs):
        raise ConnectionError("wandb service went away")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    sink = MultiSink([JsonlSink(str(tmp_path / "metrics.jsonl")), wandb_sink(tmp_path)])
    for r in RECORDS:
        sink.write(r)
    sink.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 5, 5]
    err = capsys.readouterr().err
    assert err.count("warning: wandb failed logging step 1 (ConnectionError: wandb service "
                     "went away); training and the other sinks continue") == 1
    assert err.count("warning:") == 1


def test_failing_wandb_init_turns_the_sink_off(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken_init)
    sink = wandb_sink(tmp_path)
    sink._thread.join(30)
    sink.write(RECORDS[0])  # after the failure: ignored, no error
    sink.close()
    err = capsys.readouterr().err
    assert "warning: wandb could not start (RuntimeError: no service); wandb logging is off" in err


def test_full_queue_drops_records_without_blocking(tmp_path, monkeypatch, capsys):
    import wandb

    release, logged = threading.Event(), []

    def slow_log(self, data, step=None, **kwargs):
        release.wait(30)  # a tracker that hangs (network)
        logged.append(step)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", slow_log)
    sink = wandb_sink(tmp_path, queue_size=2)
    for step in range(1, 11):
        sink.write(train_record(step, 1.0))  # must return at once
    release.set()
    sink.close()
    err = capsys.readouterr().err
    # One record is in the hung log call or still queued, two wait in the queue, the rest drop.
    assert err.count("dropping records") == 1
    assert len(logged) + sink._dropped == 10 and sink._dropped >= 7
    assert logged == sorted(logged) and logged[0] == 1


def test_config_keys_and_errors(monkeypatch):
    lg = load_config(None, ["logging.wandb=true", "logging.tensorboard=true"]).logging
    assert (lg.wandb_project, lg.wandb_mode, lg.wandb_entity, lg.wandb_name) == (
        "locmoe-train", "offline", None, None)
    with pytest.raises(UserError) as e:
        load_config(None, ["logging.wandb_mode=cloud"])
    assert str(e.value) == ("logging.wandb_mode='cloud' is not one of 'offline', 'online', "
                            "'disabled'.")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError) as e:
        load_config(None, ["logging.tensorboard=true"])
    assert str(e.value) == ("logging.tensorboard=true needs the 'tensorboard' package, which is "
                            "not installed: pip install 'locmoe-train[tensorboard]' (or set "
                            "logging.tensorboard=false).")
    load_config(None, ["logging.wandb=true"])  # wandb is still found


def test_tensorboard_resume_replaces_redone_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardSink(str(tmp_path))
    for step in range(1, 6):
        first.write(train_record(step, float(step)))
    first.close()
    # Resumed from a checkpoint at step 3: steps 4 and 5 are trained again.
    resumed = TensorBoardSink(str(tmp_path), purge_step=4)
    for step in (4, 5):
        resumed.write(train_record(step, 10.0 * step))
    resumed.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_online_without_credentials_warns_instead_of_prompting(tmp_path, monkeypatch, capsys):
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    sink = WandbSink(str(tmp_path), project="test", entity=None, name=None, mode="online",
                     config={}, finish_timeout_s=30)
    sink._thread.join(30)
    assert not sink._thread.is_alive()
    sink.write(RECORDS[0])
    sink.close()
    assert ("warning: wandb could not start (RuntimeError: no W&B credentials: set "
            "WANDB_API_KEY or run `wandb login`") in capsys.readouterr().err


def test_jsonl_writes_non_finite_values_as_null(tmp_path):
    # A window of skipped steps: no loss, a NaN norm; gauges and lists nested in the record.
    nan, inf = float("nan"), float("inf")
    record = train_record(3, nan)
    record["grad_norm"] = inf
    record["moe"]["layer_0"].update(max_over_mean=-inf, tokens_per_expert=[1, nan, 2.5])
    record["capacity_events"][0]["old"] = nan
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    sink.write(record)
    sink.write(EVAL)
    sink.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    got = [strict_loads(line) for line in lines]  # refuses NaN/Infinity
    want = train_record(3, None)
    want["grad_norm"] = None
    want["moe"]["layer_0"].update(max_over_mean=None, tokens_per_expert=[1, None, 2.5])
    want["capacity_events"][0]["old"] = None
    assert got == [want, EVAL]
    assert record["loss"] != record["loss"]  # the caller's record is left as it was
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_loads(json.dumps(record))  # what the sink wrote before


def test_console_sink_prints_to_the_stdout_of_the_moment():
    """Not to the one of the moment its module was imported: a run called in-process
    (helpers.run_main) under another redirection must print to its own."""
    import contextlib
    import io

    record = {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0}
    for _ in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ConsoleSink(4).write(record)
        assert "step 1/4 | loss 2.5000" in out.getvalue()
    given = io.StringIO()
    ConsoleSink(4, stream=given).write(record)
    assert "step 1/4" in given.getvalue()
