"""Typed run configuration: the root ``TrainConfig``, ``load_config`` and the cross-section checks.

Owns the root of a run's schema and the small sections (data, optim, train,
checkpoint, logging); the others live beside their components, each with its
own ``validate()``: ``model/config.py``, ``moe/config.py`` (with ``capacity``
and ``locmoe_plus``), ``parallel/config.py``, ``adak/config.py``. Reading
YAML and overrides is ``config_load.py``. ``TrainConfig.validate`` runs the
checks that span sections and never changes the config (derived values such
as ``expert_tp`` are properties). Checks that need the world size live in
``parallel/state.py``.

Imports run one way: nothing here imports an MoE implementation (router,
dispatcher, layer, runtime). The checks that ask the implementation chosen by
``moe.impl`` and ``moe.router`` (``moe/impls.py``, ``check_impl``) run where
models are built and where the entry points load a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from locmoe_train.adak.config import AdaKConfig
from locmoe_train.config_load import (RENAMED_KEYS, RENAMED_VALUES, _noted,  # noqa: F401
                                      _read_yaml, apply_override, config_yaml, dump_config,
                                      from_dict, parse_override_args, public_key,
                                      upgrade_saved)
from locmoe_train.data.layout import check_batch_layout
from locmoe_train.errors import UserError
from locmoe_train.model.config import ModelConfig
from locmoe_train.moe.config import CapacityConfig, LocMoEPlusConfig, MoEConfig  # noqa: F401
from locmoe_train.parallel.config import ParallelConfig


@dataclass
class BlendSource:
    """One part of ``data.blend``: a prepared directory and its share of the samples."""
    # A directory written by `locmoe-train prepare-data`.
    path: str = ""
    # Its share of the samples (weights are normalised over the blend).
    weight: float = 1.0
    # Its name in logs (val/<name>/loss, data/<name>/samples); default: the directory's name.
    name: Optional[str] = None


@dataclass
class DataConfig:
    # Directory written by `locmoe-train prepare-data`.
    path: str = "data/stdlib"
    # Tokens per training sample (sequence length).
    seq_len: int = 128
    # Shuffle the training samples each epoch (seeded by train.seed).
    shuffle: bool = True
    # Several prepared directories mixed by weight, [{path: A, weight: 0.3}, {path: B,
    # weight: 0.7}] (weights are normalised); when set, data.path is not read.
    blend: Optional[list[BlendSource]] = None


@dataclass
class OptimConfig:
    # Peak learning rate (AdamW), reached after the warmup.
    lr: float = 1e-3
    # Learning rate at the end of the schedule; in [0, optim.lr].
    min_lr: float = 1e-4
    # Steps of linear warmup from 0 to optim.lr.
    warmup_steps: int = 20
    # Decay from optim.lr to optim.min_lr after the warmup.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # AdamW weight decay (0: none).
    weight_decay: float = 0.1
    # AdamW beta1.
    beta1: float = 0.9
    # AdamW beta2.
    beta2: float = 0.95
    # AdamW epsilon.
    eps: float = 1e-8
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 1.0
    # ZeRO-1: shard Adam's state over the data-parallel ranks (experts over the
    # expert-data-parallel ones); optim/distributed.py.
    distributed: bool = False


@dataclass
class TrainingConfig:
    # Optimizer steps of the run (the LR schedule spans them).
    max_steps: int = 200
    # Sequences per optimizer step, over all data-parallel ranks.
    global_batch_size: int = 16
    # Sequences per forward/backward on one rank; gradients accumulate to the global batch.
    micro_batch_size: int = 4
    # Seed of initialisation, data order and routing randomness.
    seed: int = 1234
    # Validation loss every N steps (0: only at the end).
    eval_interval: int = 50
    # Validation samples per evaluation.
    eval_samples: int = 64
    # auto = bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto = cuda if available, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop cleanly (saving a checkpoint when enabled) after this global step,
    # keeping max_steps' schedule: for splitting a run into jobs.
    exit_at_step: Optional[int] = None
    # Activation recompute (model/recompute.py): selective = core attention and
    # expert FFN, full = whole transformer layers; trades compute for memory.
    recompute: Literal["none", "selective", "full"] = "none"
    # A step whose loss or gradient norm is NaN/inf on any rank is skipped (no
    # update). skip: stop after nonfinite_patience such steps in a row; stop: at the
    # first. Either way the exit status is 3 and the last checkpoint is kept.
    nonfinite: Literal["skip", "stop"] = "skip"
    # train.nonfinite=skip: non-finite steps in a row before the run stops.
    nonfinite_patience: int = 5


@dataclass
class CheckpointConfig:
    # Where checkpoints go; null = <logging.run_dir>/checkpoints.
    dir: Optional[str] = None
    # Save every N steps (0: no periodic saves). With a checkpoint.dir or
    # interval set, a save also happens when the run ends or is stopped.
    interval: int = 0
    # How many complete checkpoints to keep (oldest deleted first; never one newer
    # than the checkpoint just written).
    keep: int = 2
    # null = start fresh; "auto" = the one `latest` names (else the newest valid one;
    # fresh if there is none); or a path. Checkpoints in dir newer than the one resumed
    # from are moved aside into <dir>/superseded-<UTC time>/.
    resume: Optional[str] = None
    # When a fresh start (or a resume from a checkpoint elsewhere) finds another run's
    # checkpoints in dir: "refuse" (exit 2) or "move_aside" (into
    # <dir>/superseded-<UTC time>/; nothing is deleted).
    existing: Literal["refuse", "move_aside"] = "refuse"
    # Checkpoint files are read with torch's weights-only unpickler: tensors and plain
    # values, no code from the file runs. true: a file it refuses (written by other
    # code, e.g. an older or patched version) is unpickled in full, which can run any
    # code the file names. Only for checkpoints you trust.
    allow_pickle: bool = False
    # Write checkpoints in the background: a save copies this rank's share of the state
    # to host memory (pinned on a GPU) and a thread writes it while training goes on;
    # it is published (meta.json, rename, `latest`) at the first step after every rank
    # has written, and the next save waits for it. A crash before that leaves the
    # previous checkpoint as `latest`. (Key `checkpoint.async`; `async` is a Python
    # keyword, so the field is named async_.)
    async_: bool = False


@dataclass
class LoggingConfig:
    # Directory of the run's outputs (config.yaml, metrics.jsonl, checkpoints, lock).
    run_dir: str = "runs/default"
    # Log metrics every N steps (metrics are reduced once per interval).
    log_interval: int = 10
    # Print metrics to the console.
    console: bool = True
    # Write metrics to <run_dir>/metrics.jsonl.
    jsonl: bool = True
    # Event files in <run_dir>/tensorboard (pip install 'locmoe-train[tensorboard]').
    tensorboard: bool = False
    # A wandb run in <run_dir>/wandb (pip install 'locmoe-train[wandb]'); offline
    # needs no network or account: `wandb sync <run_dir>/wandb/offline-run-*` later.
    wandb: bool = False
    # The wandb project (logging.wandb=true).
    wandb_project: str = "locmoe-train"
    # The wandb entity (team or user); null: wandb's default.
    wandb_entity: Optional[str] = None
    # null: the run directory's name.
    wandb_name: Optional[str] = None
    # offline: write locally, sync later; online: upload while training; disabled: no wandb run.
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    # Take over a run lock that names another host: only when no run is alive there
    # (launch/slurm.sbatch sets it on a requeue). A held lock is never taken.
    take_over_lock: bool = False


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
        m.validate()
        _positive(self, ["parallel.tp", "parallel.ep",
                         "data.seq_len", "train.max_steps", "train.global_batch_size",
                         "train.micro_batch_size", "logging.log_interval", "checkpoint.keep",
                         "parallel.timeout_minutes", "train.eval_samples",
                         "train.nonfinite_patience"])
        _in_range(self, RANGES)
        groups = m.num_query_groups or m.num_attention_heads
        moe.validate()
        self.adak.validate(moe)
        if p.etp is not None and p.etp < 1:
            raise UserError(f"parallel.etp={p.etp} must be >= 1 (or null for the default).")
        etp = self.expert_tp
        moe.check_etp(etp)
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
        check_batch_layout(t.global_batch_size, t.micro_batch_size, 1)
        if not 0 <= o.min_lr <= o.lr:
            raise UserError(f"optim.min_lr={o.min_lr} must lie in [0, optim.lr={o.lr}].")
        if o.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
        if self.checkpoint.interval < 0:
            raise UserError(f"checkpoint.interval={self.checkpoint.interval} must be >= 0 "
                            f"(0: save only when the run ends or is stopped).")
        if self.data.blend is not None:
            from locmoe_train.data.blend import check_blend_config

            check_blend_config(self.data.blend)
        if t.exit_at_step is not None and t.exit_at_step < 1:
            raise UserError(f"train.exit_at_step={t.exit_at_step} must be >= 1 or null.")
        if t.recompute != "none" and moe.impl != "native":
            raise UserError(
                f"train.recompute={t.recompute} needs moe.impl=native: megatron-core's MoELayer "
                f"would count a recomputed forward's tokens and aux losses twice. Use "
                f"moe.impl=native or train.recompute=none.")
        if self.logging.wandb and not self.logging.wandb_project.strip():
            raise UserError("logging.wandb_project is empty: give the wandb project name "
                            "(default locmoe-train).")
        from locmoe_train.sinks.trackers import check_installed

        check_installed(self.logging)
        return self

    # ---- derived values ---------------------------------------------------
    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size: ``parallel.etp``, or the impl's default for null."""
        if self.parallel.etp is not None:
            return self.parallel.etp
        return self.moe.default_etp(self.parallel.tp)

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
        return dataclasses.asdict(self, dict_factory=lambda items: {
            public_key(k): v for k, v in items})




def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Build a validated config from an optional YAML file plus dotted overrides.

    The implementation's own checks (router and dispatcher names, router
    settings) are ``moe.impls.check_impl``, run by whoever builds a model.
    """
    raw = _read_yaml(path, []) if path is not None else {}
    cfg = from_dict(TrainConfig, raw, "")
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()



def _get(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# The valid range of each number in the root's own sections that no other check
# covers: key -> (test, the message's tail). Components check their own sections.
RANGES = {
    "optim.lr": (lambda v: v > 0, "must be > 0."),
    "optim.weight_decay": (lambda v: v >= 0, "must be >= 0 (0: no weight decay)."),
    "optim.beta1": (lambda v: 0 <= v < 1, "must lie in [0, 1)."),
    "optim.beta2": (lambda v: 0 <= v < 1, "must lie in [0, 1)."),
    "optim.eps": (lambda v: v > 0, "must be > 0."),
    "optim.grad_clip": (lambda v: v >= 0, "must be >= 0 (0 disables clipping)."),
    "train.seed": (lambda v: v >= 0, "must be >= 0."),
    "train.eval_interval": (lambda v: v >= 0, "must be >= 0 (0: validate only at the end)."),
}


def _in_range(cfg: TrainConfig, ranges: dict) -> None:
    for key, (ok, must) in ranges.items():
        v = _get(cfg, key)
        if not ok(v):  # NaN fails every test
            raise UserError(f"{key}={v} {must}")


def _positive(cfg: TrainConfig, keys: list[str]) -> None:
    for key in keys:
        v = _get(cfg, key)
        if v < 1:
            raise UserError(f"{key}={v} must be a positive integer.")

