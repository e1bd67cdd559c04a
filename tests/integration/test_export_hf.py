"""export-hf: checkpoints (trained through the CLI, and saved in-process) exported to
transformers, loaded offline; logits equal ours within 1e-4 (fp32) on the same tokens, the
tokenizer gives our ids, and checkpoints transformers cannot express are refused by name."""

import json
import math
import os
import shutil
import types

import pytest
import torch

from helpers import run_cli

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TOL = 1e-4  # max |logit difference| in fp32; same math, other kernels and summation order
TINY = ["--config", "configs/quickstart_topk.yaml", "--model.num_layers=2", "--model.hidden_size=64",
        "--model.num_attention_heads=4", "--moe.num_experts=4", "--moe.top_k=2",
        "--data.seq_len=32", "--train.global_batch_size=4", "--train.micro_batch_size=2",
        "--train.max_steps=2", "--train.eval_interval=0", "--train.eval_samples=4",
        "--optim.warmup_steps=1", "--optim.lr=5e-3", "--logging.log_interval=1",
        "--logging.console=false", "--checkpoint.interval=2"]
SAMPLE = "def main(argv):\n    return 0  # exit 1234\n\n\tx = 'héllo'\n"


def _train(tmp_path_factory, tiny_data, name, extra, nproc):
    run_dir = tmp_path_factory.mktemp(name)
    r = run_cli(TINY + [f"--data.path={tiny_data}", f"--logging.run_dir={run_dir}", *extra],
                nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return str(run_dir / "checkpoints")


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory, tiny_data):
    """Top-2 of 4 renormalised, dropless: Mixtral (saved in-process: 20 s less than training)."""
    run_dir = tmp_path_factory.mktemp("mixtral")
    _save_in_process(run_dir, tiny_data, ["moe.renormalize=true"])
    return str(run_dir / "ckpt")  # the checkpoint dir: export follows its 'latest' pointer


@pytest.fixture(scope="module")
def locmoe_plus_ckpt(tmp_path_factory, tiny_data):
    """LocMoE+ with dense layers between MoE ones, GQA, tied embeddings, saved at TP=2 x EP=2."""
    return _train(tmp_path_factory, tiny_data, "locmoe_plus",
                  ["--parallel.tp=2", "--parallel.ep=2", "--moe.router=locmoe_plus",
                   "--moe.locmoe_plus.tau=0.5", "--model.moe_every=2", "--model.num_query_groups=2",
                   "--model.tie_embeddings=true"], 2)


def our_logits(ckpt: str, ids_bs: torch.Tensor) -> torch.Tensor:
    """Our model rebuilt from the checkpoint on 1 CPU rank in fp32, in evaluation mode."""
    from locmoe_train.checkpoint import read_full_tensors
    from locmoe_train.config import TrainConfig, from_dict
    from locmoe_train.hf.export import resolve_checkpoint
    from locmoe_train.model.gpt import build_model, causal_mask
    from locmoe_train.parallel.state import destroy_parallel, init_parallel

    meta, full = read_full_tensors(resolve_checkpoint(ckpt))
    cfg = from_dict(TrainConfig, meta["config"], "")
    cfg.parallel.tp = cfg.parallel.ep = cfg.parallel.etp = 1
    try:
        pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
        model = build_model(cfg, pctx, cfg.model.vocab_size).eval()
        state = model.state_dict()
        for name, value in full.items():
            state[name.replace(".experts.", ".experts.local_experts.")
                  if name not in state else name].copy_(value)
        s = ids_bs.shape[1]
        with torch.no_grad():
            logits = model(ids_bs, torch.arange(s)[None].expand(ids_bs.shape[0], -1),
                           causal_mask(s, "cpu"))
        return logits[..., :cfg.model.vocab_size]
    finally:
        destroy_parallel()


def sample_ids(tiny_data) -> torch.Tensor:
    """Two 32-token windows of the validation split."""
    import numpy as np

    meta = json.load(open(os.path.join(tiny_data, "meta.json")))
    ids = np.fromfile(os.path.join(tiny_data, "valid.bin"), dtype=meta["dtype"], count=96)
    return torch.from_numpy(ids.astype("int64")).view(3, 32)[1:]


def hf_logits(out_dir, ids_bs, remote=False):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=remote,
                                              local_files_only=True).eval()
    with torch.no_grad():
        return hf, hf(ids_bs).logits


def test_mixtral_export_matches_ours(mixtral_ckpt, tiny_data, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from locmoe_train.hf.export import main

    out = str(tmp_path / "hf")
    assert main([mixtral_ckpt, out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "locmoe_export.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    summary = json.load(open(os.path.join(out, "locmoe_export.json")))
    assert (summary["step"], summary["architecture"], summary["warnings"]) == (
        1, "MixtralForCausalLM", [])
    ids = sample_ids(tiny_data)
    hf, theirs = hf_logits(out, ids)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert hf.config.num_local_experts == 4 and hf.config.num_experts_per_tok == 2
    ours = our_logits(mixtral_ckpt, ids)
    assert theirs.shape == ours.shape == (2, 32, 512)
    assert (theirs - ours).abs().max().item() < TOL

    # Tokenizer: our SentencePiece ids, no BOS/EOS added (the pipeline appends EOD itself).
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(tiny_data, "tokenizer.model"))
    text = SAMPLE + sp.decode(ids[0].tolist())
    assert tok(text)["input_ids"] == sp.encode(text)
    assert tok.decode(sp.encode(SAMPLE)) == SAMPLE
    assert tok.eos_token_id == hf.config.eos_token_id == sp.eos_id() == 1
    assert hf.generation_config.eos_token_id == 1


@pytest.mark.slow  # a 2-rank training run
def test_locmoe_plus_export_from_tp2_ep2(locmoe_plus_ckpt, tiny_data, tmp_path):
    out = str(tmp_path / "hf")
    r = run_cli(["export-hf", locmoe_plus_ckpt, out])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trust_remote_code=True" in r.stdout
    assert "reading checkpoint" in r.stderr  # the progress bar
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_locmoe.LocMoEForCausalLM"
    assert (config["router_type"], config["moe_every"], config["num_key_value_heads"],
            config["tie_word_embeddings"]) == ("locmoe_plus", 2, 2, True)
    ids = sample_ids(tiny_data)
    hf, theirs = hf_logits(out, ids, remote=True)
    assert hf.model.layers[0].mlp.gate.tau.item() == 0.5
    assert type(hf.model.layers[1].mlp).__name__ == "LocMoEDenseMLP"
    assert (theirs - our_logits(locmoe_plus_ckpt, ids)).abs().max().item() < TOL
    # Generation with the KV cache picks what a full forward without cache picks.
    with torch.no_grad():
        gen = hf.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
        assert gen.shape == (1, 12)
        assert gen[0, -1] == hf(gen[:, :-1], use_cache=False).logits[0, -1].argmax()


def _save_in_process(tmp_path, tiny_data, overrides, tweak=None) -> str:
    """A checkpoint of a freshly initialised model (no training), saved by Checkpointer."""
    from locmoe_train.checkpoint import Checkpointer
    from locmoe_train.config import load_config
    from locmoe_train.model.gpt import build_model
    from locmoe_train.parallel.state import destroy_parallel, init_parallel

    cfg = load_config("configs/quickstart_topk.yaml", [
        "model.num_layers=2", "model.hidden_size=64", "moe.num_experts=4", "parallel.ep=1",
        "data.seq_len=32", f"data.path={tiny_data}", "model.vocab_size=512",
        f"checkpoint.dir={tmp_path / 'ckpt'}", *overrides])
    try:
        pctx = init_parallel(cfg.parallel, cfg.expert_tp, "cpu", cfg.train.seed)
        model = build_model(cfg, pctx, 512)
        if tweak is not None:
            with torch.no_grad():
                tweak(model)
        loader = types.SimpleNamespace(state_dict=lambda: {})
        return Checkpointer(cfg, pctx).save(1, {"model": model, "loader": loader,
                                                "optimizer": types.SimpleNamespace(state={})})
    finally:
        destroy_parallel()


def _random_bias(model):
    model.decoder.layers[0].mlp.router.expert_bias.normal_(0.0, 0.5)


def _learned_tau(model):
    model.decoder.layers[0].mlp.router.log_tau.fill_(math.log(0.3))


@pytest.mark.parametrize("overrides, tweak, architecture", [
    (["moe.impl=megatron", "moe.renormalize=true"], None, "MixtralForCausalLM"),
    (["moe.router=aux_free"], _random_bias, "LocMoEForCausalLM"),
    # The learned tau is saved as log tau; the export writes tau itself.
    (["moe.router=locmoe_plus", "moe.top_k=1", "moe.locmoe_plus.learn_tau=true"], _learned_tau,
     "LocMoEForCausalLM"),
    (["moe.renormalize=false", "model.moe_every=2"], None, "LocMoEForCausalLM"),
], ids=["megatron-impl", "aux_free", "locmoe_plus-learned-tau", "topk-unnormalised-dense"])
def test_other_routers_match_ours(tmp_path, tiny_data, overrides, tweak, architecture):
    from locmoe_train.hf.export import export

    ckpt = _save_in_process(tmp_path, tiny_data, overrides, tweak)
    out = str(tmp_path / "hf")
    assert export(ckpt, out, tokenizer="none", log=lambda msg: None)["architecture"] \
        == architecture
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))
    ids = sample_ids(tiny_data)
    _, theirs = hf_logits(out, ids, remote=architecture != "MixtralForCausalLM")
    assert (theirs - our_logits(ckpt, ids)).abs().max().item() < TOL


def _with_config(ckpt_dir: str, tmp_path, **moe) -> str:
    """A copy of the latest checkpoint whose saved config has other moe.* values."""
    from locmoe_train.hf.export import resolve_checkpoint

    dst = str(tmp_path / "edited")
    shutil.copytree(resolve_checkpoint(ckpt_dir), dst)
    meta = json.load(open(os.path.join(dst, "meta.json")))
    meta["config"]["moe"].update(moe)
    json.dump(meta, open(os.path.join(dst, "meta.json"), "w"))
    return dst


def test_refusals_and_warnings(mixtral_ckpt, locmoe_plus_ckpt, tmp_path, capsys):
    from locmoe_train.errors import UserError
    from locmoe_train.hf.export import export

    with pytest.raises(UserError) as e:
        export(locmoe_plus_ckpt, str(tmp_path / "a"), architecture="mixtral")
    assert str(e.value) == (
        "--architecture mixtral cannot express this checkpoint: moe.router=locmoe_plus "
        "(Mixtral routes with a learned softmax top-k gate: moe.router=topk); "
        "model.moe_every=2 (every Mixtral layer is an MoE layer: model.moe_every=1). Use "
        "--architecture auto (or locmoe) to export the custom locmoe model, loaded with "
        "trust_remote_code=True.")
    with pytest.raises(UserError) as e:
        export(mixtral_ckpt, str(tmp_path / "b"), tokenizer=str(tmp_path / "nowhere"))
    assert str(e.value).startswith(f"tokenizer not found: --tokenizer "
                                   f"'{tmp_path / 'nowhere'}' does not exist. Pass --tokenizer")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")

    # Through the CLI: exit status 2 and one error line naming the setting.
    edited = _with_config(mixtral_ckpt, tmp_path, router="expert_choice")
    r = run_cli(["export-hf", edited, str(tmp_path / "c")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: moe.router=expert_choice cannot be exported to transformers: each expert "
        "picks its tokens from the whole batch, which a causal language model cannot "
        "reproduce token by token. Exportable routers: topk (as Mixtral, or as the custom "
        "locmoe model), aux_free and locmoe_plus (custom locmoe model).")

    # Trained with a capacity factor: exported (dropless), with a warning.
    shutil.rmtree(edited)
    edited = _with_config(mixtral_ckpt, tmp_path, capacity_factor=1.25)
    summary = export(edited, str(tmp_path / "d"), tokenizer="none")
    assert summary["architecture"] == "MixtralForCausalLM"
    assert "warning: moe.capacity_factor=1.25: the training run dropped tokens" in \
        capsys.readouterr().err
    assert len(summary["warnings"]) == 1
