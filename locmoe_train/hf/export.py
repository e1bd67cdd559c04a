"""``locmoe-train export-hf CHECKPOINT OUT_DIR``: a checkpoint as a Hugging Face model.

Owns the mapping from our parameters (canonical names, ``model/init.py``) to
a ``transformers`` causal LM, the choice of architecture, and writing
``OUT_DIR`` (config, generation config, ``model.safetensors``, tokenizer,
``locmoe_export.json`` with provenance). Reading and un-sharding the
checkpoint is ``checkpoint.read_full_tensors``; the tokenizer conversion is
``hf/tokenizer.py``; the custom model is ``hf/modeling_locmoe.py``.

Architectures:
* ``mixtral``: ``MixtralForCausalLM``, no custom code. Mixtral routes every
  layer with a learned softmax top-k gate and renormalises the chosen
  gates, so it fits ``moe.router=topk`` with ``moe.renormalize=true`` and
  ``model.moe_every=1``. Weights use Mixtral's per-expert ``w1/w2/w3`` names,
  which transformers 4.x and 5.x (and other Mixtral readers) load.
* ``locmoe``: our own small model (Mixtral's attention and decoder, our
  MLP), loaded with ``trust_remote_code=True`` (transformers >= 5); covers
  LocMoE+ (fixed affinity gate, unrenormalised gate values), top-k without
  renormalisation, the aux-loss-free router and dense layers between MoE
  layers.
* ``auto`` (default): Mixtral when it fits, else ``locmoe``.
Expert choice and hash routing are refused: expert choice picks tokens
across the whole batch (not causal), hash routing needs the token ids
inside every layer.

Both exported models are dropless. Training with ``moe.capacity_factor``
dropped tokens over capacity (in evaluation too), so such a run's own
outputs differ from the export's wherever an expert overflowed: the export
says so. LocMoE+ applies its capacity only in training; evaluation and the
export route by token choice alike.

Our model in transformers' terms: pre-norm RMSNorm decoder, RoPE with
rotate-half over the whole head (megatron-core's default, ``rotary_percent``
1), softmax scale ``1/sqrt(head_dim)``, no biases, SwiGLU MLPs. The fused
QKV weight holds, per query group, that group's query heads then its key
head then its value head; SwiGLU ``fc1`` weights hold the gate rows, then
the up rows. The embedding is padded to ``model.make_vocab_size_divisible_by``;
the export keeps the tokenizer's ``model.vocab_size`` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from locmoe_train.errors import UserError
from locmoe_train.hf.plan import ARCHITECTURES, Plan, plan_export  # noqa: F401

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUSTOM_FILES = ("configuration_locmoe.py", "modeling_locmoe.py")
# Token ids of the validation split that the tokenizer check decodes and re-encodes.
CHECK_TOKENS = 50_000


# ------------------------------------------------------------------ tensors
def _qkv(w, heads: int, groups: int, head_dim: int):
    """Split megatron's fused QKV weight (per group: its query heads, key, value)."""
    per_group = heads // groups
    w = w.view(groups, per_group + 2, head_dim, -1)
    q = w[:, :per_group].reshape(heads * head_dim, -1)
    return q, w[:, per_group].reshape(groups * head_dim, -1), \
        w[:, per_group + 1].reshape(groups * head_dim, -1)


def _experts(src: dict, prefix: str, num_experts: int, take) -> tuple:
    """``(gate_up_E2FD, down_EDF)`` of one MoE layer, from either MoE implementation."""
    if f"{prefix}.experts.w13" in src:  # ours: x @ W layout, [E, D, 2F] and [E, F, D]
        return take(f"{prefix}.experts.w13").transpose(1, 2), \
            take(f"{prefix}.experts.w2").transpose(1, 2)
    fc1 = [take(f"{prefix}.experts.{e}.linear_fc1.weight") for e in range(num_experts)]
    fc2 = [take(f"{prefix}.experts.{e}.linear_fc2.weight") for e in range(num_experts)]
    return torch.stack(fc1), torch.stack(fc2)


def convert_tensors(cfg, src: dict, architecture: str, vocab_size: int) -> dict:
    """Our full tensors (canonical names) -> the exported model's state dict."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.hidden_size // heads
    used: set[str] = set()

    def take(name):
        if name not in src:
            raise UserError(f"the checkpoint has no tensor {name!r}, which a model with this "
                            f"config has: it was not saved by this version of locmoe-train.")
        used.add(name)
        return src[name]

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:vocab_size],
           "model.norm.weight": take("decoder.final_layernorm.weight")}
    if not m.tie_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")[:vocab_size]
    for i in range(m.num_layers):
        ours, hf = f"decoder.layers.{i}", f"model.layers.{i}"
        out[f"{hf}.input_layernorm.weight"] = take(f"{ours}.input_layernorm.weight")
        out[f"{hf}.post_attention_layernorm.weight"] = take(f"{ours}.pre_mlp_layernorm.weight")
        q, k, v = _qkv(take(f"{ours}.self_attention.linear_qkv.weight"), heads, groups, head_dim)
        out[f"{hf}.self_attn.q_proj.weight"] = q
        out[f"{hf}.self_attn.k_proj.weight"] = k
        out[f"{hf}.self_attn.v_proj.weight"] = v
        out[f"{hf}.self_attn.o_proj.weight"] = take(f"{ours}.self_attention.linear_proj.weight")
        mlp = f"{ours}.mlp"
        if i % m.moe_every:  # dense SwiGLU layer (custom model only)
            gate, up = take(f"{mlp}.linear_fc1.weight").chunk(2, dim=0)
            out[f"{hf}.mlp.gate_proj.weight"] = gate
            out[f"{hf}.mlp.up_proj.weight"] = up
            out[f"{hf}.mlp.down_proj.weight"] = take(f"{mlp}.linear_fc2.weight")
            continue
        gate_up, down = _experts(src, mlp, cfg.moe.num_experts, take)
        if architecture == "mixtral":
            moe = f"{hf}.block_sparse_moe"
            out[f"{moe}.gate.weight"] = take(f"{mlp}.router.weight")
            for e in range(cfg.moe.num_experts):
                w1, w3 = gate_up[e].chunk(2, dim=0)
                out[f"{moe}.experts.{e}.w1.weight"] = w1
                out[f"{moe}.experts.{e}.w3.weight"] = w3
                out[f"{moe}.experts.{e}.w2.weight"] = down[e]
            continue
        out[f"{hf}.mlp.experts.gate_up_proj"] = gate_up
        out[f"{hf}.mlp.experts.down_proj"] = down
        for name in ("weight", "tau", "expert_bias"):
            if f"{mlp}.router.{name}" in src:
                out[f"{hf}.mlp.gate.{name}"] = take(f"{mlp}.router.{name}")
        if f"{mlp}.router.log_tau" in src:  # moe.locmoe_plus.learn_tau
            out[f"{hf}.mlp.gate.tau"] = take(f"{mlp}.router.log_tau").exp()
        if f"{mlp}.router.node_bias" in src:  # per node: no place in a one-device model
            take(f"{mlp}.router.node_bias")
    left = sorted(set(src) - used)
    if left:
        raise UserError(f"the checkpoint has tensors the export does not know how to map "
                        f"({', '.join(left[:5])}{' ...' if len(left) > 5 else ''}); export it "
                        f"with the locmoe-train version that saved it.")
    return out


# ------------------------------------------------------------------- config
def hf_config(cfg, plan: Plan, vocab_size: int, eos_id: int | None, dtype: str):
    from locmoe_train.moe.routers import router_class

    m, moe = cfg.model, cfg.moe
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size,
        intermediate_size=cfg.moe_ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads, hidden_act="silu",
        max_position_embeddings=cfg.data.seq_len, initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps, bos_token_id=None, eos_token_id=eos_id, pad_token_id=None,
        tie_word_embeddings=m.tie_embeddings, sliding_window=None, attention_dropout=0.0,
        num_experts_per_tok=moe.top_k, num_local_experts=moe.num_experts,
        router_aux_loss_coef=moe.aux_loss_coeff, router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)})
    if plan.architecture == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(**kwargs)
        config.architectures = ["MixtralForCausalLM"]
    else:
        from locmoe_train.hf.configuration_locmoe import LocMoEConfig

        config = LocMoEConfig(**kwargs, router_type=router_class(moe.router).hf_export(moe).router_type,
                              renormalize=moe.renormalize,
                              moe_every=m.moe_every,
                              dense_intermediate_size=cfg.dense_ffn_hidden_size)
        config.architectures = ["LocMoEForCausalLM"]
        config.auto_map = {"AutoConfig": "configuration_locmoe.LocMoEConfig",
                           "AutoModelForCausalLM": "modeling_locmoe.LocMoEForCausalLM"}
    config.dtype = dtype
    return config


# ---------------------------------------------------------------- tokenizer
@dataclass
class TokenizerSource:
    kind: str  # "sentencepiece" or "hf"
    path: str
    data_dir: str | None = None  # the prepared data directory it came from, if any


def find_tokenizer(arg: str | None, data_path: str) -> TokenizerSource | None:
    """Where the tokenizer is: ``--tokenizer`` (a prepared data dir, a SentencePiece
    ``.model`` file or a Hugging Face tokenizer dir; ``none`` to skip), else the
    checkpoint's ``data.path``."""
    if arg is not None and arg.lower() == "none":
        return None
    path = arg if arg is not None else data_path
    if not os.path.exists(path):
        origin = (f"--tokenizer {arg!r}" if arg is not None else
                  f"the checkpoint's data.path {data_path!r} (a relative path is read from the "
                  f"current directory, {os.getcwd()})")
        raise UserError(
            f"tokenizer not found: {origin} does not exist. Pass --tokenizer with the prepared "
            f"data directory, its tokenizer.model file or a Hugging Face tokenizer directory, "
            f"or --tokenizer none to export the model without a tokenizer.")
    if os.path.isfile(path):
        return TokenizerSource("sentencepiece", path)
    from locmoe_train.data.prepare import META_FILE, load_meta, resolve_tokenizer_path

    if os.path.exists(os.path.join(path, META_FILE)):
        meta = load_meta(path)
        return TokenizerSource(meta["tokenizer"]["kind"], resolve_tokenizer_path(path, meta), path)
    return TokenizerSource("hf", path)


def _sample_texts(data_dir: str | None, sp_path: str) -> list[str]:
    """Documents of the validation split, decoded, for the tokenizer check."""
    import numpy as np
    import sentencepiece

    if data_dir is None:
        return []
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    ids = np.fromfile(os.path.join(data_dir, "valid.bin"), dtype=meta["dtype"], count=CHECK_TOKENS)
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
    docs, start = [], 0
    for end in np.flatnonzero(ids == meta["eod_id"]).tolist() + [len(ids)]:
        docs.append(sp.decode(ids[start:end].tolist()))
        start = end + 1
    return docs


def export_tokenizer(source: TokenizerSource, out_dir: str, vocab_size: int) -> dict:
    """Write the tokenizer files into ``out_dir``; return what to record about it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source.kind == "hf":
        tok = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        tok.save_pretrained(out_dir)
    else:
        from locmoe_train.hf.tokenizer import convert_sentencepiece, special_tokens

        tok = PreTrainedTokenizerFast(
            tokenizer_object=convert_sentencepiece(source.path),
            clean_up_tokenization_spaces=False, **special_tokens(source.path))
        tok.save_pretrained(out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if len(loaded) > vocab_size:
        raise UserError(f"the tokenizer ({source.path}) has {len(loaded)} tokens but the model's "
                        f"model.vocab_size is {vocab_size}: pass the tokenizer the checkpoint "
                        f"was trained with (--tokenizer).")
    info = {"kind": source.kind, "source": os.path.abspath(source.path), "size": len(loaded),
            "eos_token_id": loaded.eos_token_id}
    if source.kind == "sentencepiece":
        from locmoe_train.hf.tokenizer import check_same_ids

        info["checked_chars"] = check_same_ids(
            source.path, loaded, _sample_texts(source.data_dir, source.path))
    return info


# ------------------------------------------------------------------- export
def resolve_checkpoint(path: str) -> str:
    """A ``step_*`` directory, or a checkpoint directory with a ``latest`` pointer."""
    from locmoe_train.checkpoint import resolve

    return resolve(path)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
                mininterval=0.5)


def _converted_state(path: str, meta: dict, cfg, plan: Plan, dtype: str,
                     allow_pickle: bool = False) -> dict:
    """The exported model's tensors, read from the checkpoint and converted, in ``dtype``."""
    from locmoe_train.checkpoint import read_full_tensors

    count = sum(1 for k in meta["tensors"] if k.startswith("model/"))
    bar = _progress(count, "reading checkpoint")
    try:
        # export() has validated path, checksums included: not read twice.
        _, src = read_full_tensors(path, progress=bar.update, allow_pickle=allow_pickle,
                                   verify=False)
    finally:
        bar.close()
    state = convert_tensors(cfg, src, plan.architecture, cfg.model.vocab_size)
    bar = _progress(len(state), "converting")
    for name in state:
        # Own, contiguous storage: safetensors rejects views of one buffer (w1/w3 are
        # halves of fc1) and the sources may be memory-mapped checkpoint files.
        state[name] = state[name].to(DTYPES[dtype]).clone(memory_format=torch.contiguous_format)
        bar.update(1)
    bar.close()
    return state


def export(checkpoint: str, out_dir: str, tokenizer: str | None = None,
           architecture: str = "auto", dtype: str = "float32", force: bool = False,
           log=print, allow_pickle: bool = False) -> dict:
    """Write the Hugging Face model of ``checkpoint`` to ``out_dir``; returns the summary
    also stored as ``out_dir/locmoe_export.json``. Only the shards are read (weights-only);
    a checkpoint with another file that would need the full unpickler is refused
    unless ``allow_pickle`` (then that file is still not read)."""
    try:
        import safetensors.torch  # noqa: F401  (here: a clear error before any work)
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"export-hf needs the optional packages transformers and safetensors "
                        f"({e}); install them with `pip install 'locmoe-train[hf]'`.") from None
    from locmoe_train.checkpoint import other_files, validate_checkpoint, verify_tensors
    from locmoe_train.checkpoint_io import ALLOW_PICKLE_FLAG, check_loadable
    from locmoe_train.config import TrainConfig, from_dict, upgrade_saved

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    path = resolve_checkpoint(checkpoint)
    problem = validate_checkpoint(path)
    if problem is not None:
        raise UserError(f"checkpoint {checkpoint} is not usable: {problem}. Pass a step_* "
                        f"directory or a checkpoint directory with a 'latest' pointer.")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) \
            and not force:
        raise UserError(f"OUT_DIR {out_dir!r} exists and is not empty: choose another "
                        f"directory or pass --force to replace it.")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    # Before anything is written: no file that needs the full unpickler (unless
    # allowed; it is not read either way), every shard as meta.json describes it.
    check_loadable(path, other_files(meta), allow_pickle, ALLOW_PICKLE_FLAG)
    verify_tensors(path, meta, allow_pickle, ALLOW_PICKLE_FLAG).close()
    cfg = from_dict(TrainConfig, upgrade_saved(meta["config"]), "")
    plan = plan_export(cfg, architecture)
    vocab_size = cfg.model.vocab_size
    from locmoe_train.data.blend import data_paths

    source = find_tokenizer(tokenizer, data_paths(cfg.data)[0])  # a blend shares one tokenizer
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    for note in plan.notes:
        log(f"note: {note}")

    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        state = _converted_state(path, meta, cfg, plan, dtype, allow_pickle)
        summary = _write_model(tmp, state, cfg, plan, source, dtype)
        summary.update(checkpoint=os.path.abspath(path), step=meta["step"],
                       locmoe_config=meta["config"])
        with open(os.path.join(tmp, "locmoe_export.json"), "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remote = ", trust_remote_code=True" if summary["trust_remote_code"] else ""
    log(f"exported step {meta['step']} of {path} to {out_dir}: {summary['architecture']}, "
        f"{summary['parameters']:,} parameters, vocab {vocab_size}, {dtype}"
        + ("" if summary["tokenizer"] else ", no tokenizer") + ". Load it with "
        f"AutoModelForCausalLM.from_pretrained({out_dir!r}{remote})")
    return summary


def _write_model(tmp: str, state: dict, cfg, plan, source, dtype: str) -> dict:
    """The model files of ``state`` into ``tmp``; returns the summary's model part."""
    import safetensors.torch
    import transformers
    from transformers import GenerationConfig

    safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"),
                                metadata={"format": "pt"})
    vocab_size, eos_id, tok_info = cfg.model.vocab_size, None, None
    if source is not None:
        tok_info = export_tokenizer(source, tmp, vocab_size)
        eos_id = tok_info["eos_token_id"]
    config = hf_config(cfg, plan, vocab_size, eos_id, dtype)
    config.save_pretrained(tmp)
    if plan.architecture == "locmoe":
        here = os.path.dirname(os.path.abspath(__file__))
        for name in CUSTOM_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(tmp, name))
    GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id
                     ).save_pretrained(tmp)
    return {"checkpoint": None, "step": None, "architecture": config.architectures[0],
            "trust_remote_code": plan.architecture == "locmoe",
            "parameters": sum(t.numel() for t in state.values()),
            "vocab_size": vocab_size, "dtype": dtype, "tokenizer": tok_info,
            "warnings": plan.warnings, "notes": plan.notes,
            "transformers_version": transformers.__version__}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="locmoe-train export-hf",
        description="Write a checkpoint as a Hugging Face transformers model (config, "
                    "safetensors weights, tokenizer) that loads offline with "
                    "AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT_DIR).")
    ap.add_argument("checkpoint", help="a step_* directory, or a checkpoint directory "
                                       "(its 'latest' checkpoint is used)")
    ap.add_argument("out_dir", help="output directory (must not exist or be empty)")
    ap.add_argument("--tokenizer", default=None, metavar="PATH",
                    help="prepared data directory, SentencePiece .model file or Hugging Face "
                         "tokenizer directory; 'none' to skip (default: the checkpoint's "
                         "data.path)")
    ap.add_argument("--architecture", choices=ARCHITECTURES, default="auto",
                    help="mixtral (no custom code), locmoe (custom code, "
                         "trust_remote_code=True) or auto: mixtral when it fits "
                         "(default: %(default)s)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="weight dtype (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="accept a checkpoint with a file that the safe (weights-only) loader "
                         "refuses (pickled Python objects, which can run code); only for "
                         "checkpoints you trust")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    export(args.checkpoint, args.out_dir, args.tokenizer, args.architecture, args.dtype,
           args.force, allow_pickle=args.allow_pickle)
    return 0
