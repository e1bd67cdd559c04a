"""Typed run configuration: dataclasses per section, YAML load/dump, overrides.

Owns the schema of a run (``TrainConfig`` and its sections), turning YAML and
``--section.key=value`` overrides into it with type checks that name the key
path, and the cross-field checks that need no process group
(``TrainConfig.validate``). Checks that need the world size live in
``parallel/state.py``. Components read their section; nothing else parses
config files.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from locmoe_train.errors import UserError


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    # Grouped-query attention; null means one KV head per query head.
    num_query_groups: Optional[int] = None
    # Dense (non-MoE) layers' SwiGLU width; null = 8/3 * hidden rounded up to 64.
    ffn_hidden_size: Optional[int] = None
    # Every k-th layer is an MoE layer (1: every layer; 2: layers 2, 4, ...).
    moe_every: int = 1
    # Vocabulary size; null takes it from the prepared data's tokenizer.
    vocab_size: Optional[int] = None
    # Embedding/output rows are padded to a multiple of this (independent of TP
    # so that layouts with different TP sizes build the same model).
    make_vocab_size_divisible_by: int = 128
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = False
    # Core attention: sdpa = torch's scaled_dot_product_attention (flash /
    # memory-efficient kernels on GPU); megatron = megatron-core's unfused
    # DotProductAttention (materialises the [b, h, s, s] scores).
    attention: Literal["sdpa", "megatron"] = "sdpa"


@dataclass
class CapacityConfig:
    """LocMoE+ expert capacity C (tokens per expert per sequence), METHOD.md section 3."""
    # controller: re-estimate every `interval` steps; fixed: C0 forever;
    # linear_decay: factor falls linearly factor0 -> decay_to over the first decay_fraction of steps.
    policy: Literal["controller", "fixed", "linear_decay"] = "controller"
    # C0 = ceil(factor0 * seq_len * top_k / num_experts)
    factor0: float = 1.1
    interval: int = 100
    # No re-estimation before this optimizer step.
    warmup: int = 100
    # C never drops below ceil(min_fraction * C0).
    min_fraction: float = 0.4
    # C_ema <- ema * C_ema + (1 - ema) * C_target
    ema: float = 0.9
    # C is rounded up to a multiple of this (8 on CPU, 64 on GPU suit the hardware).
    multiple: int = 8
    # Roll C back when the mean training loss over the `rollback_window` steps
    # after a cut exceeds the window before it by more than `rollback_tolerance` (relative).
    rollback_window: int = 50
    rollback_tolerance: float = 0.02
    decay_to: float = 0.66
    decay_fraction: float = 0.1


@dataclass
class LocMoEPlusConfig:
    """The affinity router (moe.router=locmoe_plus), METHOD.md sections 1-2."""
    # tcr_ecr: token choice then expert choice (LocMoE+); tcr: token choice only
    # (no capacity); ecr: expert choice only (each expert's top-C tokens).
    mode: Literal["tcr_ecr", "tcr", "ecr"] = "tcr_ecr"
    # Gate value softmax(affinity / tau).
    tau: float = 1.0
    learn_tau: bool = False
    # local: each rank ranks its own tokens; global: thresholds over the TP/SP group.
    ranking: Literal["local", "global"] = "local"
    # At evaluation run token choice only (ECR is non-causal).
    eval_token_choice: bool = True


@dataclass
class MoEConfig:
    # Which MoE layer the layer spec plugs in: ours, or megatron-core's MoELayer
    # (top-k router only; kept for comparisons on the same model).
    impl: Literal["locmoe", "megatron"] = "locmoe"
    # topk: Switch/GShard softmax top-k; expert_choice: Zhou et al. 2022;
    # aux_free: DeepSeek-V3 sigmoid scores + load-driven bias; hash: token-id hash.
    router: Literal["topk", "expert_choice", "aux_free", "hash", "locmoe_plus"] = "topk"
    num_experts: int = 8
    top_k: int = 2
    # Per-expert SwiGLU width; null = model.ffn_hidden_size.
    ffn_hidden_size: Optional[int] = None
    # topk: rescale the chosen experts' probabilities to sum to 1.
    renormalize: bool = False
    # null = dropless; a number = capacity factor with token dropping
    # (expert_choice: average experts per token, default top_k).
    capacity_factor: Optional[float] = None
    # Which tokens an over-full expert keeps: highest probability, or earliest.
    drop_policy: Literal["probs", "position"] = "probs"
    # Give every expert exactly its capacity (static shapes, no host sync).
    pad_to_capacity: bool = False
    # alltoall: flat EP all-to-all; hierarchical: locality-aware, one message per
    # node pair across nodes (ours only); allgather: megatron only.
    dispatcher: Literal["alltoall", "hierarchical", "allgather"] = "alltoall"
    # Expert FFN implementation: grouped GEMM, per-expert loop, or auto
    # (grouped on CUDA, loop on CPU).
    experts: Literal["auto", "grouped", "loop"] = "auto"
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    # aux_free router: bias step per optimizer step (DeepSeek-V3's gamma).
    bias_update_rate: float = 1e-3
    # LocMoE locality loss mu * KL(D_c || D_l); active only when the experts of
    # the EP group live on more than one node (real or parallel.ranks_per_node).
    locality_loss_coeff: float = 0.0
    locality_eps: float = 0.1
    # Node-limited routing: each token may use experts on at most this many
    # nodes, nodes ranked by their best expert score (DeepSeek-V3); null = no limit.
    max_nodes_per_token: Optional[int] = None
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    locmoe: LocMoEPlusConfig = field(default_factory=LocMoEPlusConfig)


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    # Expert tensor parallel size; null resolves to 1 for moe.impl=locmoe (whole
    # experts per rank, replicated over TP) and to tp for moe.impl=megatron.
    etp: Optional[int] = None
    # Simulate nodes of this many ranks on one machine (locality tests and
    # benchmarks); null = real nodes from torchrun's LOCAL_WORLD_SIZE.
    ranks_per_node: Optional[int] = None
    # auto = nccl with CUDA, gloo without.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: int = 10


@dataclass
class DataConfig:
    # Directory written by `locmoe-train prepare-data`.
    path: str = "data/stdlib"
    seq_len: int = 128
    shuffle: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 1.0


@dataclass
class TrainingConfig:
    max_steps: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seed: int = 1234
    # Validation loss every N steps (0: only at the end).
    eval_interval: int = 50
    eval_samples: int = 64
    # auto = bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto = cuda if available, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop cleanly (saving a checkpoint when enabled) after this global step,
    # keeping max_steps' schedule: for splitting a run into jobs.
    exit_at_step: Optional[int] = None


@dataclass
class CheckpointConfig:
    # Where checkpoints go; null = <logging.run_dir>/checkpoints.
    dir: Optional[str] = None
    # Save every N steps (0: no periodic saves). With a checkpoint.dir or
    # interval set, a save also happens when the run ends or is stopped.
    interval: int = 0
    # How many complete checkpoints to keep (oldest deleted first).
    keep: int = 2
    # null = start fresh; "auto" = latest valid one in dir (fresh if none); or a path.
    resume: Optional[str] = None


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    console: bool = True
    jsonl: bool = True
    # Event files in <run_dir>/tensorboard (pip install 'locmoe-train[tensorboard]').
    tensorboard: bool = False
    # A wandb run in <run_dir>/wandb (pip install 'locmoe-train[wandb]'); offline
    # needs no network or account: `wandb sync <run_dir>/wandb/offline-run-*` later.
    wandb: bool = False
    wandb_project: str = "locmoe-train"
    wandb_entity: Optional[str] = None
    # null: the run directory's name.
    wandb_name: Optional[str] = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class AdaKConfig:
    """The Ada-K post-training stage (`locmoe-train adak`), METHOD.md section 7."""
    # PPO steps (one batch of train.global_batch_size sequences each), after the warm start.
    steps: int = 100
    # Warm-start steps before PPO (0: none): cross-entropy of pi(k|s) to the top-p count.
    warm_start_steps: int = 0
    # Mean expert count the warm start's top-p threshold p* aims at; null = moe.top_k.
    warm_start_mean_k: Optional[float] = None
    # AdamW on the allocators only (constant learning rate).
    lr: float = 1e-3
    weight_decay: float = 0.1
    # Max global gradient norm of the allocators; 0 disables clipping.
    grad_clip: float = 1.0
    # PPO: epochs over each rollout batch, ratio clip, per-layer discount, and
    # lambda of the expected-k penalty lambda * sum_n n P(n).
    ppo_epochs: int = 2
    clip: float = 0.2
    gamma: float = 1.0
    k_penalty: float = 3e-3
    # Validation (argmax k against top-K) every N steps (0: only at the end).
    eval_interval: int = 50
    log_interval: int = 10
    # Stage checkpoints (allocators, optimizer, step, data position, RNG) every N
    # steps (0: only at the end) under <out_dir>/checkpoints, keeping the last `keep`.
    checkpoint_interval: int = 50
    keep: int = 2
    # null = start fresh; "auto" = latest valid stage checkpoint in out_dir (fresh if none); or a path.
    resume: Optional[str] = None
    out_dir: str = "runs/adak"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    adak: AdaKConfig = field(default_factory=AdaKConfig)

    # ---- cross-field checks that need no process group -------------------
    def validate(self) -> "TrainConfig":
        m, moe, p, t, o = self.model, self.moe, self.parallel, self.train, self.optim
        _positive(self, ["model.num_layers", "model.hidden_size", "model.num_attention_heads",
                         "model.moe_every", "model.make_vocab_size_divisible_by",
                         "moe.num_experts", "moe.top_k", "parallel.tp", "parallel.ep",
                         "data.seq_len", "train.max_steps", "train.global_batch_size",
                         "train.micro_batch_size", "logging.log_interval", "checkpoint.keep",
                         "parallel.timeout_minutes"])
        if m.hidden_size % m.num_attention_heads:
            raise UserError(
                f"model.hidden_size={m.hidden_size} is not divisible by "
                f"model.num_attention_heads={m.num_attention_heads}: pick a head count "
                f"that divides the hidden size (e.g. {_divisor_near(m.hidden_size, m.num_attention_heads)}).")
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_attention_heads % groups:
            raise UserError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}: use a divisor of the head count.")
        if m.moe_every > m.num_layers:
            raise UserError(
                f"model.moe_every={m.moe_every} is larger than model.num_layers={m.num_layers}, "
                f"so the model would have no MoE layer: use a value between 1 and {m.num_layers}.")
        if moe.top_k > moe.num_experts:
            raise UserError(
                f"moe.top_k={moe.top_k} exceeds moe.num_experts={moe.num_experts}: "
                f"a token cannot use more experts than exist.")
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            raise UserError(f"moe.capacity_factor={moe.capacity_factor} must be > 0, "
                            f"or null for dropless routing.")
        if p.etp is None:
            p.etp = p.tp if moe.impl == "megatron" else 1
        etp = p.etp
        if etp < 1:
            raise UserError(f"parallel.etp={p.etp} must be >= 1 (or null for the default).")
        self._validate_moe_impl()
        self._validate_adak()
        if moe.num_experts % p.ep:
            raise UserError(
                f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}: "
                f"each expert-parallel rank must hold the same number of experts; use a "
                f"parallel.ep that divides {moe.num_experts}.")
        if m.num_attention_heads % p.tp or groups % p.tp:
            raise UserError(
                f"parallel.tp={p.tp} must divide model.num_attention_heads="
                f"{m.num_attention_heads} and the number of query groups ({groups}).")
        for name, width, size in [("model.ffn_hidden_size", self.dense_ffn_hidden_size, p.tp),
                                  ("moe.ffn_hidden_size", self.moe_ffn_hidden_size, etp)]:
            if width % size:
                raise UserError(f"{name}={width} is not divisible by the tensor-parallel size "
                                f"{size}: choose a width that is a multiple of it.")
        if p.tp > 1 and self.data.seq_len % p.tp:
            raise UserError(
                f"data.seq_len={self.data.seq_len} is not divisible by parallel.tp={p.tp}: "
                f"MoE with tensor parallelism uses sequence parallelism, which splits the "
                f"sequence across TP ranks.")
        if self.make_vocab_multiple % p.tp:
            raise UserError(
                f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} is not "
                f"divisible by parallel.tp={p.tp}; use a multiple of {p.tp}.")
        if p.ranks_per_node is not None and p.ranks_per_node < 1:
            raise UserError(f"parallel.ranks_per_node={p.ranks_per_node} must be >= 1 or null.")
        if t.global_batch_size % t.micro_batch_size:
            raise UserError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size}.")
        if not 0 <= o.min_lr <= o.lr:
            raise UserError(f"optim.min_lr={o.min_lr} must lie in [0, optim.lr={o.lr}].")
        if o.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
        for key in ["model.hidden_dropout", "model.attention_dropout"]:
            v = _get(self, key)
            if not 0.0 <= v < 1.0:
                raise UserError(f"{key}={v} must lie in [0, 1).")
        if self.checkpoint.interval < 0:
            raise UserError(f"checkpoint.interval={self.checkpoint.interval} must be >= 0 "
                            f"(0: save only when the run ends or is stopped).")
        if t.exit_at_step is not None and t.exit_at_step < 1:
            raise UserError(f"train.exit_at_step={t.exit_at_step} must be >= 1 or null.")
        if self.logging.wandb and not self.logging.wandb_project.strip():
            raise UserError("logging.wandb_project is empty: give the wandb project name "
                            "(default locmoe-train).")
        from locmoe_train.loggers import check_installed

        check_installed(self.logging)
        return self

    def _validate_moe_impl(self) -> None:
        moe, p = self.moe, self.parallel
        if moe.impl == "megatron":
            if moe.dispatcher == "hierarchical":
                raise UserError("moe.dispatcher=hierarchical needs moe.impl=locmoe.")
            if moe.router != "topk":
                raise UserError(f"moe.router={moe.router!r} needs moe.impl=locmoe; megatron-core's "
                                f"MoELayer is compared with the topk router only.")
            return
        if moe.dispatcher == "allgather":
            raise UserError(f"moe.dispatcher={moe.dispatcher!r} is only available with "
                            f"moe.impl=megatron; moe.impl=locmoe uses alltoall or hierarchical.")
        if p.etp != 1:
            raise UserError(
                f"moe.impl=locmoe keeps whole experts on each rank (expert tensor parallel 1), "
                f"but parallel.etp={p.etp}: set parallel.etp=1 (experts are then replicated over "
                f"TP ranks and sharded over parallel.ep), or use moe.impl=megatron.")
        if moe.router == "hash" and moe.top_k != 1:
            raise UserError(f"moe.router=hash sends each token to one expert: set moe.top_k=1 "
                            f"(got {moe.top_k}).")
        if moe.pad_to_capacity and not (
                (moe.router == "topk" and moe.capacity_factor is not None)
                or (moe.router == "locmoe_plus" and moe.locmoe.mode != "tcr")):
            raise UserError("moe.pad_to_capacity=true needs a capacity to pad to: moe.router=topk "
                            "with a moe.capacity_factor, or moe.router=locmoe_plus with "
                            "moe.locmoe.mode tcr_ecr or ecr (dropless routing has none).")
        if moe.router == "locmoe_plus" and moe.capacity_factor is not None:
            raise UserError(
                f"moe.capacity_factor={moe.capacity_factor} does not apply to "
                f"moe.router=locmoe_plus, whose capacity starts at moe.capacity.factor0 and is "
                f"managed by moe.capacity.policy: remove moe.capacity_factor.")
        c = moe.capacity
        for key, value in [("interval", c.interval), ("multiple", c.multiple),
                           ("rollback_window", c.rollback_window)]:
            if value < 1:
                raise UserError(f"moe.capacity.{key}={value} must be >= 1.")
        if not 0 < c.min_fraction <= 1 or not 0 <= c.ema < 1 or c.factor0 <= 0:
            raise UserError(
                f"moe.capacity needs 0 < min_fraction <= 1, 0 <= ema < 1 and factor0 > 0 "
                f"(got min_fraction={c.min_fraction}, ema={c.ema}, factor0={c.factor0}).")
        if moe.locmoe.tau <= 0:
            raise UserError(f"moe.locmoe.tau={moe.locmoe.tau} must be > 0.")
        if moe.max_nodes_per_token is not None and moe.max_nodes_per_token < 1:
            raise UserError(f"moe.max_nodes_per_token={moe.max_nodes_per_token} must be >= 1 "
                            f"(or null for no limit).")
        if moe.router == "aux_free" and moe.bias_update_rate < 0:
            raise UserError(f"moe.bias_update_rate={moe.bias_update_rate} must be >= 0.")

    def _validate_adak(self) -> None:
        a, E = self.adak, self.moe.num_experts
        for key, value, low in [("steps", a.steps, 1), ("ppo_epochs", a.ppo_epochs, 1),
                                ("log_interval", a.log_interval, 1), ("keep", a.keep, 1),
                                ("warm_start_steps", a.warm_start_steps, 0),
                                ("eval_interval", a.eval_interval, 0),
                                ("checkpoint_interval", a.checkpoint_interval, 0)]:
            if value < low:
                raise UserError(f"adak.{key}={value} must be >= {low}.")
        for key, value in [("lr", a.lr), ("clip", a.clip)]:
            if value <= 0:
                raise UserError(f"adak.{key}={value} must be > 0.")
        for key, value in [("weight_decay", a.weight_decay), ("k_penalty", a.k_penalty),
                           ("grad_clip", a.grad_clip)]:
            if value < 0:
                raise UserError(f"adak.{key}={value} must be >= 0.")
        if not 0 < a.gamma <= 1:
            raise UserError(f"adak.gamma={a.gamma} must lie in (0, 1] (1: no discount over layers).")
        if a.warm_start_mean_k is not None and not 1 <= a.warm_start_mean_k <= E:
            raise UserError(f"adak.warm_start_mean_k={a.warm_start_mean_k} must lie in "
                            f"[1, moe.num_experts={E}] (or null for moe.top_k).")

    # ---- derived values ---------------------------------------------------
    @property
    def dense_ffn_hidden_size(self) -> int:
        if self.model.ffn_hidden_size is not None:
            return self.model.ffn_hidden_size
        return -(-(8 * self.model.hidden_size // 3) // 64) * 64

    @property
    def moe_ffn_hidden_size(self) -> int:
        return self.moe.ffn_hidden_size or self.dense_ffn_hidden_size

    @property
    def make_vocab_multiple(self) -> int:
        return self.model.make_vocab_size_divisible_by

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Build a validated config from an optional YAML file plus dotted overrides."""
    raw = _read_yaml(path, []) if path is not None else {}
    cfg = from_dict(TrainConfig, raw, "")
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def _read_yaml(path: str, chain: list[str]) -> dict:
    """Read a config file; a top-level ``base: other.yaml`` (relative to this file) is
    loaded first and this file's sections are merged over it key by key."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist: pass --config with the path "
                        f"of a YAML file (see configs/).")
    if os.path.abspath(path) in chain:
        raise UserError(f"config file {path!r} includes itself through 'base:'.")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path!r} must hold a mapping of sections, "
                        f"got {type(raw).__name__}.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"'base' in {path!r} must be a file path, got {base!r}.")
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), chain + [os.path.abspath(path)])
    return _merge(merged, raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override_args(argv: list[str]) -> list[str]:
    """Turn ``--a.b=v`` and ``--a.b v`` into ``a.b=v`` strings."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unrecognised argument {arg!r}: overrides look like "
                            f"--section.key=value (e.g. --train.max_steps=50).")
        body = arg[2:]
        if "=" not in body:
            if i + 1 >= len(argv):
                raise UserError(f"override {arg!r} has no value: write {arg}=VALUE.")
            body = f"{body}={argv[i + 1]}"
            i += 1
        out.append(body)
        i += 1
    return out


def apply_override(cfg: TrainConfig, item: str) -> None:
    key, _, text = item.partition("=")
    parts = key.split(".")
    obj: Any = cfg
    for depth, name in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if not dataclasses.is_dataclass(obj):
            raise UserError(f"override {key!r}: {'.'.join(parts[:depth])} is not a section.")
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            raise UserError(_unknown_key_message(path, name, list(fields)))
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, name)):
                raise UserError(f"override {key!r} names a whole section; set one of its keys, "
                                f"e.g. --{key}.{dataclasses.fields(getattr(obj, name))[0].name}=...")
            try:
                value = yaml.safe_load(text) if text != "" else ""
            except yaml.YAMLError:
                value = text
            hint = typing.get_type_hints(type(obj))[name]
            setattr(obj, name, _coerce(value, hint, path))
        else:
            obj = getattr(obj, name)


def from_dict(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(_unknown_key_message(path, str(key), names))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against a type hint; ints and numeric strings widen to floats, nothing else converts."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UserError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported config type {hint} at {path}")
    expected = getattr(hint, "__name__", str(hint))
    raise UserError(f"{path}={value!r} has the wrong type: expected {expected}, "
                    f"got {type(value).__name__}.")


def _unknown_key_message(path: str, name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {path!r}.{hint} Valid keys here: {', '.join(choices)}."


def _get(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _positive(cfg: TrainConfig, keys: list[str]) -> None:
    for key in keys:
        v = _get(cfg, key)
        if v < 1:
            raise UserError(f"{key}={v} must be a positive integer.")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def dump_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
