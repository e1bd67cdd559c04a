"""The distributed optimizer on 2 gloo ranks, against torch AdamW with all-reduced gradients,
at DP=2 and at TP=2 x DP=1 (where the norm must count a TP-replicated parameter once).

A toy model with odd-sized dense, norm and expert parameters (the flat buffers
need padding) gets different gradients on each rank. The sharded optimizer
must give the same norm, the same clipped update and the same Adam state as
``GradSync`` + ``torch.optim.AdamW``, hold on each rank only its slice's state,
parameters and gradient (the bytes ``state_bytes`` states, measured by walking
the tensors the optimizer object reaches), and take the non-sharded optimizer's
per-parameter state and continue from it.
"""

import torch
import torch.distributed as dist

from harness import run_ranks
from helpers import adam_states
from locmoe_train.config import OptimConfig
from locmoe_train.optim.optimizer import (build_grad_sync, build_optimizer, held_bytes,
                                          load_param_state, state_bytes)
from locmoe_train.parallel.state import ParallelContext


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(7, 5, generator=g))
        self.norm = torch.nn.Parameter(torch.randn(3, generator=g))
        self.mlp = torch.nn.Module()
        self.mlp.experts = torch.nn.Module()
        self.mlp.experts.w1 = torch.nn.Parameter(torch.randn(2, 4, 3, generator=g))
        self.mlp.experts.w2 = torch.nn.Parameter(torch.randn(2, 3, 5, generator=g))


def _pctx(rank: int, tp: int = 1) -> ParallelContext:
    """DP=2 over both ranks; or with ``tp=2`` TP=2 x DP=1, the experts (not TP-sharded,
    as our layer's) sharded over an expert-DP group of both ranks."""
    world = dist.group.WORLD
    singles = [dist.new_group([r]) for r in range(2)]  # collective: every rank makes both
    dp, dp_rank, dp_group = (2, rank, world) if tp == 1 else (1, 0, singles[rank])
    return ParallelContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"),
                           tp=tp, ep=1, etp=1, dp=dp, edp=2, tp_rank=rank if tp > 1 else 0,
                           ep_rank=0, etp_rank=0, dp_rank=dp_rank, edp_rank=rank,
                           ranks_per_node=2, num_nodes=1, node_of_rank=[0, 0], tp_group=world,
                           dp_group=dp_group, edp_group=world)


def _train(model, optimizer, sync, rank, steps, first=0):
    norms = []
    for step in range(first, first + steps):
        optimizer.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own gradient
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        sync.reduce()
        norms.append(sync.clip(2.0))  # the norm is ~7: clipping is active
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (1 + step)
        optimizer.step()
    return torch.stack(norms)


def _clone(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(rank):
    pctx = _pctx(rank)
    plain, distributed = OptimConfig(weight_decay=0.1), OptimConfig(weight_decay=0.1,
                                                                     distributed=True)
    ref, sharded = Toy(), Toy()
    opt_ref, opt_sh = build_optimizer(ref, plain, pctx), build_optimizer(sharded, distributed, pctx)
    norms_ref = _train(ref, opt_ref, build_grad_sync(opt_ref, ref, pctx), rank, 5)
    norms_sh = _train(sharded, opt_sh, build_grad_sync(opt_sh, sharded, pctx), rank, 5)
    gathered = adam_states(opt_sh)  # collective: the slices of every rank, put together
    out = {"norms": (norms_ref, norms_sh), "ref": _clone(ref), "sharded": _clone(sharded),
           "ref_state": {n: {k: v.clone() for k, v in opt_ref.state[p].items()}
                         for n, p in ref.named_parameters()},
           "gathered": {n: gathered.get(p) for n, p in sharded.named_parameters()},
           "bytes": (state_bytes(opt_ref), held_bytes(opt_ref, ref), state_bytes(opt_sh),
                     held_bytes(opt_sh, sharded))}
    # The non-sharded optimizer's state handed to a fresh sharded one; then both go on.
    resumed = Toy()
    with torch.no_grad():
        for a, b in zip(resumed.parameters(), ref.parameters()):
            a.copy_(b)
    opt_res = build_optimizer(resumed, distributed, pctx)
    for p, q in zip(resumed.parameters(), ref.parameters()):
        load_param_state(opt_res, p, {k: v.clone() for k, v in opt_ref.state[q].items()})
    _train(ref, opt_ref, build_grad_sync(opt_ref, ref, pctx), rank, 3, first=5)
    _train(resumed, opt_res, build_grad_sync(opt_res, resumed, pctx), rank, 3, first=5)
    out["ref_after"], out["resumed_after"] = _clone(ref), _clone(resumed)
    return out


def test_sharded_adamw_matches_torch_adamw():
    out = run_ranks(_compare, 2)
    for o in out:
        norms_ref, norms_sh = o["norms"]
        torch.testing.assert_close(norms_sh, norms_ref, rtol=1e-6, atol=0)
        assert norms_ref.min() > 2.0  # clipping scaled every step
        for name, p in o["ref"].items():
            torch.testing.assert_close(o["sharded"][name], p, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(o["resumed_after"][name], o["ref_after"][name],
                                       rtol=1e-6, atol=1e-7)
        assert not torch.equal(o["ref_after"]["proj"], o["ref"]["proj"])  # it did move on
        # Stated and measured. Plain: Adam's moments, 8 bytes per parameter (92 here),
        # and a 4-byte step per stepped tensor.
        plain, plain_held, sharded, sharded_held = o["bytes"]
        assert plain == plain_held == 8 * 92 + 4 * 4
        # Sharded: buckets dense-decay (35), no-decay (3), experts (54), each padded to
        # an even length and halved; per element the moments, the fp32 slice and its
        # gradient (16 bytes), and a step per bucket.
        assert sharded == sharded_held == 16 * (18 + 2 + 27) + 3 * 4
    for name in out[0]["sharded"]:  # the all-gather left the same weights on both ranks
        assert torch.equal(out[0]["sharded"][name], out[1]["sharded"][name]), name
    for o in out:  # each rank's slices, put together, are torch AdamW's state
        for name, s in o["gathered"].items():
            want = o["ref_state"][name]
            assert set(s) == set(want) == {"step", "exp_avg", "exp_avg_sq"}
            assert float(s["step"]) == float(want["step"]) == 5
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(s[k], want[k], rtol=1e-6, atol=1e-9)


def _compare_tp(rank):
    """TP=2: ``proj`` is a TP shard (its own values per rank), the norm gain is replicated
    and sequence parallel (its gradient summed over TP): the norm counts it once."""
    pctx = _pctx(rank, tp=2)
    runs = {}
    for name, distributed in (("plain", False), ("sharded", True)):
        model = Toy()
        with torch.no_grad():
            model.proj.add_(rank)  # a different shard on each TP rank
        model.proj.tensor_model_parallel = True
        model.norm.sequence_parallel = True
        opt = build_optimizer(model, OptimConfig(distributed=distributed), pctx)
        norms = _train(model, opt, build_grad_sync(opt, model, pctx), rank, 3)
        assert state_bytes(opt) == held_bytes(opt, model)
        runs[name] = (norms, _clone(model), state_bytes(opt))
    return runs


def test_sharded_norm_and_update_under_tensor_parallel():
    for rank, o in enumerate(run_ranks(_compare_tp, 2)):
        (norms_ref, ref, plain), (norms_sh, sharded, sh_bytes) = o["plain"], o["sharded"]
        torch.testing.assert_close(norms_sh, norms_ref, rtol=1e-6, atol=0)
        for name, p in ref.items():
            torch.testing.assert_close(sharded[name], p, rtol=1e-6, atol=1e-7)
        # Dense state whole (DP=1): proj 35 + norm 3 (4 padded: none needed at size 1);
        # the experts' 54 halved over expert-DP.
        assert sh_bytes == 16 * (35 + 3 + 27) + 3 * 4 and plain == 8 * 92 + 4 * 4
