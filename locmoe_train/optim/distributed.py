"""The distributed optimizer (ZeRO-1, ``optim.distributed: true``): AdamW whose state is
sharded over the ranks that hold replicas of the same parameters.

Owns the flat buffers, who owns which slice of them, the gradient
reduce-scatter, the all-gather of updated parameters, the gradient norm over
the shards, and the conversion of the sharded state to and from per-parameter
tensors (what checkpoints store: each rank writes and reads only its own slices). Does not own the AdamW math: each rank runs
torch's own ``AdamW`` (fused on CUDA, as the non-sharded optimizer) on its
slices, so the update is the same elementwise arithmetic as without sharding.

Layout: trainable parameters are split into buckets by reduction group (dense
parameters over the data-parallel group, experts over the expert-data-parallel
group) and by weight decay. A bucket's parameters, flattened in model order,
form one fp32 vector, zero-padded to a multiple of the group size (gloo wants
equal pieces); group rank ``r`` owns the ``r``-th contiguous piece. Per step:

1. the gradients are flattened and ``reduce_scatter_tensor``'d: each rank
   receives the summed gradient of its piece only, scaled by ``1/dp`` like
   the all-reduce of ``parallel/grads.py``;
2. the norm sums each rank's pieces (a replicated-over-TP tensor only on TP
   rank 0) in the one all-reduce over the world that ``GradSync`` makes;
3. AdamW updates the piece (a copy of the parameters' fp32 values there), and
   ``all_gather_into_tensor`` puts the updated vector back into every replica.

Memory per rank, for P parameters and a group of G ranks. The parameters are
fp32 (bf16 is autocast), so every replica (4P) is a master copy. Between steps
this optimizer holds (``state_parts``) Adam's ``exp_avg`` and ``exp_avg_sq`` of
its slice (8P/G), the slice ``shard_S`` itself, an fp32 copy of the parameters
there that AdamW steps (4P/G), and the slice's gradient, kept from the
reduce-scatter to the next ``zero_grad`` (4P/G): 16P/G. The non-sharded AdamW
holds 8P, and the model keeps its full gradients (4P) between steps, which
this one drops after the reduce-scatter. The full gradients exist during
backward (ZeRO-1, not ZeRO-2); at G > 1 the reduce-scatter's flat copy of them
and the all-gather's flat vector (4P each) exist only during those collectives.

Legend: ``_N`` a bucket's flat (padded) length, ``_S`` one rank's piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from locmoe_train.parallel.grads import GradSync
from locmoe_train.parallel.sharding import is_expert_param
from locmoe_train.parallel.state import ParallelContext

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class _Piece:
    """The part of one parameter that falls in this rank's slice of its bucket."""
    param: torch.Tensor
    start: int  # offset in the flattened parameter
    stop: int
    at: int  # offset in the rank's slice


class _Bucket:
    """Parameters of one reduction group and weight decay, as one flat vector."""

    def __init__(self, params: list[torch.Tensor], counted: list[bool], group, size: int,
                 rank: int):
        self.params, self.group, self.size, self.rank = params, group, size, rank
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        self.shard_numel = -(-n // size)  # ceil: every rank gets the same length
        lo = rank * self.shard_numel
        hi = lo + self.shard_numel
        self.pieces: list[_Piece] = []
        self.norm_ranges: list[tuple[int, int]] = []  # slice ranges that count in the norm
        for p, off, count in zip(params, self.offsets, counted):
            a, b = max(off, lo), min(off + p.numel(), hi)
            if a < b:
                self.pieces.append(_Piece(p, a - off, b - off, a - lo))
                if count:
                    self.norm_ranges.append((a - lo, b - lo))
        p0 = params[0]
        # The rank's slice of the parameters: what AdamW steps (a leaf tensor).
        self.shard_S = torch.zeros(self.shard_numel, dtype=p0.dtype, device=p0.device)

    def _flat_N(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        pad = self.shard_numel * self.size - self.numel
        parts = [t.reshape(-1) for t in tensors]
        if pad:
            parts.append(tensors[0].new_zeros(pad))
        return torch.cat(parts)

    def reduce_scatter_grads(self, scale: float) -> None:
        flat_N = self._flat_N([p.grad for p in self.params])
        if self.size > 1:
            grad_S = torch.empty_like(self.shard_S)
            dist.reduce_scatter_tensor(grad_S, flat_N, group=self.group)
        else:
            grad_S = flat_N
        if scale != 1.0:
            grad_S.mul_(scale)
        self.shard_S.grad = grad_S
        for p in self.params:
            p.grad = None  # from here on only the slice's gradient is used

    def load_shard(self) -> None:
        """Copy the parameters' current values in this rank's slice into ``shard_S``."""
        for pc in self.pieces:
            self.shard_S[pc.at:pc.at + pc.stop - pc.start].copy_(
                pc.param.detach().reshape(-1)[pc.start:pc.stop])

    def all_gather_params(self) -> None:
        if self.size > 1:
            flat_N = torch.empty(self.shard_numel * self.size, dtype=self.shard_S.dtype,
                                 device=self.shard_S.device)
            dist.all_gather_into_tensor(flat_N, self.shard_S, group=self.group)
        else:
            flat_N = self.shard_S
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                p.copy_(flat_N[off:off + p.numel()].view_as(p))


class DistributedAdamW:
    """AdamW with its state sharded over data-parallel (and expert-data-parallel) ranks.

    Offers what the train step and the checkpoints use of an optimizer:
    ``param_groups`` (to set the learning rate), ``zero_grad``, ``step``;
    ``grad_sync(model)`` replaces ``GradSync``; checkpoints write each rank's slices
    where they are (``checkpoint_plan.py``) and load them with ``load_param_ranges``
    (``load_param_state`` takes a parameter's full state).
    """

    def __init__(self, model: torch.nn.Module, groups: list[dict], pctx: ParallelContext, *,
                 lr: float, betas: tuple[float, float], eps: float, fused: bool | None):
        self.pctx = pctx
        names = {id(p): n for n, p in model.named_parameters()}
        self.buckets: list[_Bucket] = []
        inner_groups = []
        for g in groups:
            for expert in (False, True):
                params = [p for p in g["params"] if is_expert_param(names[id(p)]) == expert]
                if not params:
                    continue
                if expert:
                    group, size, rank, tp_rank = pctx.edp_group, pctx.edp, pctx.edp_rank, pctx.etp_rank
                else:
                    group, size, rank, tp_rank = pctx.dp_group, pctx.dp, pctx.dp_rank, pctx.tp_rank
                counted = [bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0
                           for p in params]
                b = _Bucket(params, counted, group, size, rank)
                self.buckets.append(b)
                inner_groups.append({"params": [b.shard_S], "weight_decay": g["weight_decay"]})
        self._pieces = {}  # id(param) -> [(bucket, piece)]
        for b in self.buckets:
            for pc in b.pieces:
                self._pieces.setdefault(id(pc.param), []).append((b, pc))
        self.inner = torch.optim.AdamW(inner_groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.shard_S.grad = None
            for p in b.params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for b in self.buckets:
            b.load_shard()
        self.inner.step()
        for b in self.buckets:
            b.all_gather_params()

    def grad_sync(self, model: torch.nn.Module) -> "ShardedGradSync":
        return ShardedGradSync(model, self.pctx, self)

    def state_parts(self) -> dict[str, int]:
        """Bytes this rank holds between steps: ``adam``, the AdamW state of its slices
        (once stepped), and ``slices``, the slices themselves and their gradients."""
        return {"adam": adam_state_bytes(self.inner),
                "slices": sum(2 * b.shard_S.numel() * b.shard_S.element_size()
                              for b in self.buckets)}

    # ---- per-parameter state (checkpoints) --------------------------------------------
    def load_param_state(self, param: torch.Tensor, state: dict) -> None:
        """Keep this rank's slice of one parameter's full ``state`` (as the non-sharded AdamW stores it)
        gives it, or as the non-sharded AdamW stores it)."""
        for b, pc in self._pieces.get(id(param), []):
            own = self._own_state(b)
            n = pc.stop - pc.start
            for key in ADAM_KEYS:
                if key in state:
                    own[key][pc.at:pc.at + n].copy_(state[key].reshape(-1)[pc.start:pc.stop])
            if "step" in state:
                own["step"].copy_(torch.as_tensor(state["step"]))

    def load_param_ranges(self, param: torch.Tensor, fill, step) -> None:
        """Fill this rank's slice of ``param``'s state: ``fill(key, dest, start)`` copies
        elements ``[start, start + dest.numel())`` of the flattened state ``key`` into
        ``dest`` (a saved state only); ``step`` is Adam's step (None if not saved). Only the
        ranges this rank owns are asked for."""
        for b, pc in self._pieces.get(id(param), []):
            own = self._own_state(b)
            n = pc.stop - pc.start
            for key in ADAM_KEYS:
                fill(key, own[key][pc.at:pc.at + n], pc.start)
            if step is not None:
                own["step"].copy_(torch.as_tensor(step))

    def _own_state(self, b: _Bucket) -> dict:
        """The bucket's AdamW state, created as AdamW itself would on its first step."""
        state = self.inner.state[b.shard_S]
        if not state:
            group = next(g for g in self.inner.param_groups if g["params"][0] is b.shard_S)
            on_device = group["fused"] or group["capturable"]
            state["step"] = torch.zeros((), dtype=torch.float32,
                                        device=b.shard_S.device if on_device else "cpu")
            for key in ADAM_KEYS:
                state[key] = torch.zeros_like(b.shard_S)
        return state


class ShardedGradSync(GradSync):
    """``GradSync`` for the distributed optimizer: the data-parallel step is a
    reduce-scatter into the optimizer's slices, and norm and clipping work on them."""

    def __init__(self, model: torch.nn.Module, pctx: ParallelContext, optimizer: DistributedAdamW):
        super().__init__(model, pctx)
        self.optimizer = optimizer

    def reduce_data_parallel(self) -> None:
        for b in self.optimizer.buckets:
            b.reduce_scatter_grads(1.0 / self.pctx.dp)

    def local_sq_norm(self) -> torch.Tensor:
        sq = [b.shard_S.grad[a:z].float().pow(2).sum()
              for b in self.optimizer.buckets for a, z in b.norm_ranges]
        if not sq:
            return torch.zeros((), dtype=torch.float32, device=self.pctx.device)
        return torch.stack(sq).sum()

    def scale_grads(self, coeff: torch.Tensor) -> None:
        for b in self.optimizer.buckets:
            b.shard_S.grad.mul_(coeff)


def adam_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What torch's Adam(W) allocates for its parameters: exp_avg and exp_avg_sq like
    each parameter, and a 0-dim fp32 step."""
    return sum(2 * p.numel() * p.element_size() + 4
               for g in optimizer.param_groups for p in g["params"])
