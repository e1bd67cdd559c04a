"""The MoE layer's configuration: ``moe``, with its ``capacity`` and ``locmoe_plus`` sections.

Owns the schema of the ``moe`` section and the checks that need nothing but
it (``MoEConfig.validate``), and describes what each ``moe.impl`` does with
expert tensor parallelism (``default_etp``, ``check_etp``), so the root config
resolves ``parallel.etp`` without importing an implementation. Choices that
belong to one component are asked of that component where models are built
(``moe/impls.py``, ``check_impl``): the impl validates its dispatcher and
router choices, the router class its own settings. Checks that combine
``moe`` with other sections (experts per EP rank, expert widths per TP rank)
live in the root ``TrainConfig.validate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from locmoe_train.errors import UserError


@dataclass
class CapacityConfig:
    """LocMoE+ expert capacity C (tokens per expert per sequence), docs/locmoe_plus.md."""
    # controller: re-estimate every `interval` steps; fixed: C0 forever;
    # linear_decay: factor falls linearly factor0 -> decay_to over the first decay_fraction of steps.
    policy: Literal["controller", "fixed", "linear_decay"] = "controller"
    # What the controller re-estimates C from (moe/capacity_stats.py): best_insider_q,
    # tail_quantile, score_budget (no cut on isotropic features), or outsider_q
    # (METHOD.md's first statistic, kept for comparison: it cuts on isotropic features).
    statistic: Literal["best_insider_q", "tail_quantile", "score_budget",
                       "outsider_q"] = "tail_quantile"
    # How the controller re-estimates C. statistic: from the latest micro-batch's affinities
    # (moe.capacity.statistic). loss_probe: that micro-batch run forward again without
    # gradient at the current C and at capacities from the floor to C0, all layers alike;
    # C rises when a larger one lowers the loss by more than probe_tolerance, else falls to
    # the smallest one that raises it by at most that (moe/capacity_probe.py).
    estimator: Literal["statistic", "loss_probe"] = "statistic"
    # estimator=loss_probe: how many capacities it tries, spread evenly from the floor to C0
    # (both included); each costs one forward of one micro-batch per re-estimation.
    probe_points: int = 5
    # estimator=loss_probe: the relative change of the micro-batch loss, against the current
    # C's, that a cut may cost and a raise must gain (0.005 = 0.5%).
    probe_tolerance: float = 0.005
    # score_budget: the mass the kept candidates must hold lies rho of the way from its
    # isotropic value to all of the expert's positive affinity mass.
    rho: float = 0.5
    # C0 = ceil(factor0 * seq_len * top_k / num_experts)
    factor0: float = 1.1
    # Steps between re-estimations of C (policy=controller).
    interval: int = 100
    # No re-estimation before this optimizer step.
    warmup: int = 100
    # C never drops below ceil(min_fraction * C0).
    min_fraction: float = 0.4
    # C_ema <- ema * C_ema + (1 - ema) * C_target
    ema: float = 0.9
    # C is rounded up to a multiple of this. auto: the largest power of two <= C0 / 16,
    # between 1 and 64 (C0 = 18 -> 1, 71 -> 4, 563 -> 32, >= 1024 -> 64: GEMM tiles).
    multiple: Union[int, Literal["auto"]] = "auto"
    # Rollback guard (moe/capacity_guard.py): `rollback_window` steps after a cut, their mean
    # loss is compared with the window before it; the cut is undone when it is worse by
    # more than `rollback_sigma` standard errors (noise measured before the cut) and by
    # more than `rollback_tolerance` (relative). Then no cut for `rollback_holdoff`
    # re-estimations, doubled after each consecutive rollback.
    rollback_window: int = 50
    # Rollback guard: standard errors by which the window after a cut must be worse (see rollback_window).
    rollback_sigma: float = 3.0
    # Rollback guard: relative loss increase a cut must also exceed to be undone (see rollback_window).
    rollback_tolerance: float = 0.01
    # Rollback guard: re-estimations without a cut after a rollback, doubled after each consecutive one.
    rollback_holdoff: int = 2
    # policy=linear_decay: the capacity factor reached at the end of the decay.
    decay_to: float = 0.66
    # policy=linear_decay: the fraction of train.max_steps over which the factor falls.
    decay_fraction: float = 0.1

    def validate(self) -> None:
        for key in ("interval", "rollback_window", "rollback_holdoff"):
            if getattr(self, key) < 1:
                raise UserError(f"moe.capacity.{key}={getattr(self, key)} must be >= 1.")
        if self.multiple != "auto" and self.multiple < 1:
            raise UserError(f"moe.capacity.multiple={self.multiple} must be >= 1, or auto "
                            f"(a power of two near C0 / 16, at most 64).")
        if not 0 < self.min_fraction <= 1 or not 0 <= self.ema < 1 or self.factor0 <= 0:
            raise UserError(
                f"moe.capacity needs 0 < min_fraction <= 1, 0 <= ema < 1 and factor0 > 0 "
                f"(got min_fraction={self.min_fraction}, ema={self.ema}, factor0={self.factor0}).")
        if not 0 <= self.rho < 1:
            raise UserError(f"moe.capacity.rho={self.rho} must be in [0, 1): the fraction of "
                            f"the way from the isotropic mass share to all of it that the kept "
                            f"candidates must hold (0.5 is the default).")
        if self.probe_points < 2:
            raise UserError(f"moe.capacity.probe_points={self.probe_points} must be >= 2: the "
                            f"loss probe tries at least the floor and C0 (5 is the default).")
        if not 0 <= self.probe_tolerance < 1:
            raise UserError(f"moe.capacity.probe_tolerance={self.probe_tolerance} must be in "
                            f"[0, 1): the relative loss change a cut may cost and a raise must gain "
                            f"(0.005 is the default).")
        if self.warmup < 0:
            raise UserError(f"moe.capacity.warmup={self.warmup} must be >= 0.")
        if not self.decay_to > 0 or not 0 <= self.decay_fraction <= 1:
            raise UserError(
                f"moe.capacity needs decay_to > 0 and 0 <= decay_fraction <= 1 "
                f"(got decay_to={self.decay_to}, decay_fraction={self.decay_fraction}).")
        for key in ("rollback_sigma", "rollback_tolerance"):
            if not getattr(self, key) >= 0:
                raise UserError(f"moe.capacity.{key}={getattr(self, key)} must be >= 0 "
                                f"(0 turns that part of the rollback test off).")

    def resolved_multiple(self, c0: int) -> int:
        """``multiple``, with auto the largest power of two <= C0 / 16, clamped to [1, 64]."""
        if self.multiple != "auto":
            return self.multiple
        return 1 if c0 < 32 else min(64, 2 ** int(math.log2(c0 / 16)))


@dataclass
class LocMoEPlusConfig:
    """The affinity router (moe.router=locmoe_plus), METHOD.md sections 1-2."""
    # tcr_ecr: token choice then expert choice (LocMoE+); tcr: token choice only
    # (no capacity); ecr: expert choice only (each expert's top-C tokens).
    mode: Literal["tcr_ecr", "tcr", "ecr"] = "tcr_ecr"
    # Gate value softmax(affinity / tau). auto: 1 / sqrt(model.hidden_size), the spread
    # of the cosine affinity on isotropic features, so the logits start at unit
    # variance (tau = 1 leaves the gate near 1/E: docs/locmoe_plus.md, "The gate").
    tau: Union[float, Literal["auto"]] = "auto"
    # Learn tau (as log tau, so it stays > 0), starting from `tau`.
    learn_tau: bool = False
    # local: each rank ranks its own tokens; global: thresholds over the TP/SP group.
    ranking: Literal["local", "global"] = "local"
    # At evaluation run token choice only (ECR is non-causal).
    eval_token_choice: bool = True


@dataclass
class MoEConfig:
    # Which MoE layer the layer spec plugs in: ours, or megatron-core's MoELayer
    # (top-k router only; kept for comparisons on the same model).
    # (``locmoe`` is the deprecated spelling of ``native``.)
    impl: Literal["native", "megatron"] = "native"
    # A name from the router registry (moe/routers/): topk (Switch/GShard softmax
    # top-k), expert_choice (Zhou et al. 2022), aux_free (DeepSeek-V3 sigmoid
    # scores + load-driven bias), hash (token-id hash), locmoe_plus.
    router: str = "topk"
    # Experts per MoE layer; parallel.ep must divide it.
    num_experts: int = 8
    # Experts each token is routed to (expert_choice: average experts per token).
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
    # A name from the impl's dispatcher registry. native: alltoall (flat EP
    # all-to-all) or hierarchical (locality-aware, one message per node pair
    # across nodes); megatron: alltoall or allgather.
    dispatcher: str = "alltoall"
    # Expert FFN implementation: grouped GEMM, per-expert loop, or auto
    # (grouped on CUDA, loop on CPU).
    experts: Literal["auto", "grouped", "loop"] = "auto"
    # Weight of the load-balancing auxiliary loss (0: off).
    aux_loss_coeff: float = 0.01
    # Weight of the router z-loss on the routing logits (0: off).
    z_loss_coeff: float = 0.0
    # aux_free router: bias step per optimizer step (DeepSeek-V3's gamma).
    bias_update_rate: float = 1e-3
    # LocMoE locality loss mu * KL(D_c || D_l); active only when the experts of
    # the EP group live on more than one node (real or parallel.ranks_per_node).
    locality_loss_coeff: float = 0.0
    # Smoothing of the locality loss target D_l: (1 - eps) on the same node's experts, eps spread over all (0 to 1).
    locality_eps: float = 0.1
    # A learned per-node bias on the routing scores (topk, locmoe_plus), the term the
    # locality loss trains: a router that sees only the token cannot raise the
    # same-node share, as every rank draws the same data (docs/locality.md).
    # auto: on when the locality loss is (coeff > 0 and experts on > 1 node).
    locality_node_bias: Union[bool, Literal["auto"]] = "auto"
    # Node-limited routing: each token may use experts on at most this many
    # nodes, nodes ranked by their best expert score (DeepSeek-V3); null = no limit.
    max_nodes_per_token: Optional[int] = None
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    # (``moe.locmoe`` is the deprecated spelling of this section.)
    locmoe_plus: LocMoEPlusConfig = field(default_factory=LocMoEPlusConfig)

    def validate(self) -> "MoEConfig":
        """Checks of the ``moe`` section alone (the config is not changed)."""
        for key in ("num_experts", "top_k"):
            if getattr(self, key) < 1:
                raise UserError(f"moe.{key}={getattr(self, key)} must be a positive integer.")
        if self.top_k > self.num_experts:
            raise UserError(
                f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}: "
                f"a token cannot use more experts than exist.")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError(f"moe.capacity_factor={self.capacity_factor} must be > 0, "
                            f"or null for dropless routing.")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise UserError(f"moe.ffn_hidden_size={self.ffn_hidden_size} must be a positive "
                            f"integer (or null for model.ffn_hidden_size).")
        for key in ("aux_loss_coeff", "z_loss_coeff", "locality_loss_coeff", "bias_update_rate"):
            if not getattr(self, key) >= 0:
                raise UserError(f"moe.{key}={getattr(self, key)} must be >= 0 (0 turns it off).")
        if not 0 <= self.locality_eps <= 1:
            raise UserError(f"moe.locality_eps={self.locality_eps} must lie in [0, 1].")
        if self.max_nodes_per_token is not None and self.max_nodes_per_token < 1:
            raise UserError(f"moe.max_nodes_per_token={self.max_nodes_per_token} must be >= 1 "
                            f"(or null for no limit).")
        self.capacity.validate()
        return self

    # ---- what each impl does with expert tensor parallelism ------------------
    # native keeps whole experts on each rank (replicated over TP, sharded over EP);
    # megatron-core's MoELayer splits experts over parallel.tp unless told otherwise.
    def default_etp(self, tp: int) -> int:
        """The expert tensor-parallel size ``parallel.etp: null`` resolves to."""
        return tp if self.impl == "megatron" else 1

    def check_etp(self, etp: int) -> None:
        if self.impl == "native" and etp != 1:
            raise UserError(
                f"moe.impl=native keeps whole experts on each rank (expert tensor parallel 1), "
                f"but parallel.etp={etp}: set parallel.etp=1 (experts are then replicated over "
                f"TP ranks and sharded over parallel.ep), or use moe.impl=megatron.")
