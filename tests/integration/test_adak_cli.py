"""``locmoe-train adak`` end to end on a tiny pre-trained checkpoint: metrics, the
evaluation against top-K, and a resumed stage ending with the same allocators as an
uninterrupted one; unsupported setups exit 2 with one message.
"""

import json
import os

import pytest
import torch

from helpers import read_metrics, run_cli, run_main

TINY = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--moe.num_experts=4", "--moe.top_k=2", "--data.seq_len=32", "--parallel.ep=1",
        "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.eval_samples=8",
        "--optim.warmup_steps=2", "--logging.log_interval=5", "--train.eval_interval=0"]
STAGE = ["--adak.warm_start_steps=2", "--adak.log_interval=1", "--adak.eval_interval=0",
         "--adak.checkpoint_interval=2", "--adak.keep=5", "--adak.lr=0.05"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("pre")
    r = run_main(["--config", "configs/quickstart_topk.yaml", *TINY, f"--data.path={tiny_data}",
                  "--train.max_steps=6", f"--logging.run_dir={root}/run",
                  f"--checkpoint.dir={root}/ckpt"])
    assert r.returncode == 0, r.stderr[-3000:]
    return str(root / "ckpt")


def _stage(tiny_data, ckpt, out, extra):
    return run_cli(["adak", "--config", "configs/adak/quickstart.yaml", "--checkpoint", ckpt,
                    *TINY, f"--data.path={tiny_data}", *STAGE, f"--adak.out_dir={out}", *extra])


def _allocators(out, step):
    state = torch.load(os.path.join(out, "checkpoints", f"step_{step:08d}", "state.pt"),
                       weights_only=False)
    return state["allocators"], state["optimizer"]["state"]


def test_adak_stage_runs_and_resume_equals_uninterrupted(tmp_path, tiny_data, pretrained):
    full, split = tmp_path / "full", tmp_path / "split"
    r = _stage(tiny_data, pretrained, full, ["--adak.steps=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: Ada-K after 5 steps" in r.stdout
    records = read_metrics(str(full))
    train = [x for x in records if "phase" in x]
    assert [(x["step"], x["phase"]) for x in train] == [
        (1, "warm_start"), (2, "warm_start"), (3, "ppo"), (4, "ppo"), (5, "ppo")]
    for x in train[:2]:
        # p* makes the mean top-p count of each layer as close to top_k = 2 as the grid allows.
        assert all(abs(v - 2.0) < 0.05 for v in x["target_mean_k"].values())
    for x in train[2:]:
        hist = x["k_hist"]["layer_0"]
        assert len(hist) == 4 and sum(hist) == 8 * 32  # every token of the step got a k
        mean_k = sum((i + 1) * c for i, c in enumerate(hist)) / sum(hist)
        assert x["mean_k"]["layer_0"] == pytest.approx(mean_k)
        assert x["expert_flops_ratio"]["layer_0"] == pytest.approx(mean_k / 2)
        assert 0.0 <= x["clip_fraction"] <= 1.0
        assert x["advantage"] == pytest.approx(x["reward"] - x["reward_topk"])
    # At lr 0.05 the second PPO epoch moves the policy past the clip range for some tokens.
    assert max(x["clip_fraction"] for x in train[2:]) > 0
    (ev,) = [x for x in records if x.get("eval") == "argmax"]
    assert ev["step"] == 5
    assert ev["val_loss_change"] == pytest.approx(ev["val_loss"] - ev["val_loss_topk"])
    assert sum(ev["val_k_hist"]["layer_1"]) == 8 * 32  # eval_samples x seq_len
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["val_loss"] == ev["val_loss"]

    # The same stage in two jobs: 3 steps, then resumed (auto) to 5.
    r = _stage(tiny_data, pretrained, split, ["--adak.steps=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _stage(tiny_data, pretrained, split, ["--adak.steps=3", "--adak.resume=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed Ada-K stage from" in r.stdout and "at step 3" in r.stdout
    w_full, opt_full = _allocators(full, 5)
    w_split, opt_split = _allocators(split, 5)
    assert w_full.keys() == w_split.keys() == {0, 1}
    for layer in w_full:
        assert torch.equal(w_full[layer], w_split[layer])
        assert w_full[layer].abs().sum() > 0  # the allocators moved from their zero init
    for i in opt_full:
        assert torch.equal(opt_full[i]["exp_avg_sq"], opt_split[i]["exp_avg_sq"])
    split_train = [x for x in read_metrics(str(split)) if "phase" in x]
    assert [x["step"] for x in split_train] == [1, 2, 3, 4, 5]
    assert split_train[-1]["ppo_loss"] == train[-1]["ppo_loss"]
    # A fresh start into a directory with stage checkpoints is refused, not mixed with them.
    r = _stage(tiny_data, pretrained, full, ["--adak.steps=3"])
    assert r.returncode == 2
    assert "already holds Ada-K checkpoints: continue them with --adak.resume=auto" in r.stderr


def test_adak_refuses_megatron_impl(tmp_path, tiny_data):
    r = run_main(["adak", "--config", "configs/adak/quickstart.yaml", "--checkpoint",
                  str(tmp_path), f"--data.path={tiny_data}", "--moe.impl=megatron"])
    assert r.returncode == 2
    assert r.stderr.startswith("error: locmoe-train adak needs moe.impl=native")


def test_adak_rejects_a_missing_checkpoint(tmp_path, tiny_data):
    r = run_main(["adak", "--config", "configs/adak/quickstart.yaml", "--checkpoint",
                  str(tmp_path / "nope"), f"--data.path={tiny_data}"])
    assert r.returncode == 2
    assert "is not a usable pre-trained checkpoint: no such directory" in r.stderr


def test_adak_stage_stops_cleanly_on_sigterm_and_resumes(tmp_path, tiny_data, pretrained):
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "locmoe_train.train", "adak", "--config",
           "configs/adak/quickstart.yaml", "--checkpoint", pretrained, *TINY,
           f"--data.path={tiny_data}", *STAGE, "--adak.checkpoint_interval=0",
           "--adak.steps=100000", f"--adak.out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"]
    assert summary["outcome"] == "SIGTERM" and step >= 3
    assert f"stopped by SIGTERM after step {step} (saved)" in stdout
    # The stop saved the step it ended on (no periodic checkpoints were asked for)...
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert read_metrics(str(out))[-1]["step"] == step
    # ...and the stage continues from it (one more step here).
    r = _stage(tiny_data, pretrained, out, ["--adak.resume=auto",
                                             f"--adak.steps={step - 2 + 1}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed Ada-K stage from" in r.stdout and f"at step {step}" in r.stdout
    assert f"done: Ada-K after {step + 1} steps" in r.stdout
