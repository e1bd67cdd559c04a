"""Which pieces of the state each rank writes (format 3), and how a rank reads back its own.

Every tensor is stored under a layout-free key (``model/<canonical name>``,
``optim/<canonical name>/exp_avg`` ...) as *pieces*: each piece is an element
range ``[a, b)`` of one TP/EP shard, flattened. Its index entry in meta.json
says which shard (``dim``, ``rank``, ``size``, ``glu``, the shard's ``shape``
and ``dtype``, as format 2 did) and which ``range``, and where it is stored
(``file``, ``name``).

Who writes what, so that no rank writes much more than ``total / world`` and
nothing is gathered:
* Replicated tensors (the parameters and buffers, and the Adam moments of the
  non-sharded optimizer) of one data-parallel group are laid end to end in
  model order and cut into as many equal ranges as the group has ranks; group
  rank ``r`` writes the ``r``-th (dense tensors over the data-parallel group,
  experts over the expert-data-parallel group). A tensor that is replicated
  over tensor parallelism too is written from TP rank 0 only.
* The sharded optimizer's moments (``optim.distributed``) are written by the
  rank that owns them: its slice of each bucket, a piece per parameter it
  overlaps, with that parameter's element range. Nothing is gathered.
* 0-dim tensors (Adam's ``step``) are written whole by group rank 0.

Reading (``Assembler``): a run whose layout matches a tensor's saved TP/EP
split copies the ranges it needs straight from the pieces (a ZeRO rank only
its own slice); otherwise it assembles that one full tensor and cuts its own
shard. So at load no rank holds more than its own share plus one full tensor.
Format-2 entries (no ``range``: a whole shard) are read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from locmoe_train.checkpoint_pieces import PieceFiles, dtype_name
from locmoe_train.errors import UserError
from locmoe_train.parallel.sharding import ShardInfo, shard_info, take_shard


@dataclass
class Piece:
    key: str  # layout-free key, "model/<canonical>" or "optim/<canonical>/<state>"
    entry: dict  # the shard it belongs to: dim, rank, size, glu, shape, dtype
    tensor: torch.Tensor  # what is written: a flat view of the range (or a 0-dim tensor)
    range: Optional[tuple[int, int]]  # element range in the flattened shard; None: 0-dim

    @property
    def name(self) -> str:
        """The name it is stored under in its shard file (unique in the checkpoint)."""
        where = f"{self.range[0]}" if self.range is not None else "all"
        return f"{self.key}|{self.entry['rank']}|{where}"

    def index(self, file: str) -> dict:
        out = {"file": file, "name": self.name, **self.entry}
        if self.range is not None:
            out["range"] = list(self.range)
        return out


def _shard_entry(info: ShardInfo, value: torch.Tensor) -> dict:
    scalar = value.dim() == 0
    return {"dim": None if scalar else info.dim, "rank": info.rank, "size": info.size,
            "glu": info.glu, "shape": list(value.shape), "dtype": dtype_name(value.dtype)}


def _tp_replica_writes(p: torch.Tensor, expert: bool, pctx) -> bool:
    """A tensor replicated over the (expert-)TP group is written from its TP rank 0 only."""
    if getattr(p, "tensor_model_parallel", False):
        return True
    return (pctx.etp_rank if expert else pctx.tp_rank) == 0


def plan_pieces(model: torch.nn.Module, optimizer, cfg, pctx) -> list[Piece]:
    """The pieces this rank writes, in a fixed order (see the module docstring)."""
    from locmoe_train.optim.distributed import DistributedAdamW

    zero = isinstance(optimizer, DistributedAdamW)
    params = dict(model.named_parameters())
    saved_names = set(model.state_dict().keys())
    lanes: dict[bool, list] = {False: [], True: []}  # replicated, by expert or not
    scalars: dict[bool, list] = {False: [], True: []}
    infos = {}
    for name, p in list(params.items()) + list(model.named_buffers()):
        if name.endswith("_extra_state") or name not in saved_names:
            continue
        info = shard_info(name, p, cfg, pctx)
        infos[id(p)] = info
        if not _tp_replica_writes(p, info.expert, pctx):
            continue
        lanes[info.expert].append((f"model/{info.canonical}", info, p.detach()))
        if name in params and not zero and optimizer is not None:
            for k, v in optimizer.state.get(p, {}).items():
                v = torch.as_tensor(v).detach()
                target = scalars if v.dim() == 0 else lanes
                target[info.expert].append((f"optim/{info.canonical}/{k}", info, v))
    out = []
    for expert in (False, True):
        size, rank = (pctx.edp, pctx.edp_rank) if expert else (pctx.dp, pctx.dp_rank)
        out += _cut(lanes[expert], size, rank)
        if rank == 0:
            out += [Piece(k, _shard_entry(info, v), v, None) for k, info, v in scalars[expert]]
    if zero:
        out += _zero_pieces(optimizer, infos, pctx)
    return out


def _cut(lane: list, size: int, rank: int) -> list[Piece]:
    """Rank ``rank``'s share of ``lane`` laid end to end: one of ``size`` equal ranges."""
    total = sum(v.numel() for _, _, v in lane)
    chunk = -(-total // size) if size else total
    lo, hi = rank * chunk, min((rank + 1) * chunk, total)
    out, off = [], 0
    for key, info, v in lane:
        n = v.numel()
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            flat = v.reshape(-1)  # a view: parameters and states are contiguous
            out.append(Piece(key, _shard_entry(info, v), flat[a - off:b - off],
                             (a - off, b - off)))
        off += n
    return out


def _zero_pieces(optimizer, infos: dict, pctx) -> list[Piece]:
    """The sharded optimizer's state, written by the owner of each slice."""
    from locmoe_train.optim.distributed import ADAM_KEYS

    out = []
    for b in optimizer.buckets:
        state = optimizer._own_state(b)  # zeros before the first step, as AdamW would make
        group_rank = b.rank
        for pc in b.pieces:
            info = infos[id(pc.param)]
            if not _tp_replica_writes(pc.param, info.expert, pctx):
                continue
            n = pc.stop - pc.start
            for key in ADAM_KEYS:
                piece = state[key][pc.at:pc.at + n]
                entry = _shard_entry(info, pc.param)
                entry["dtype"] = dtype_name(piece.dtype)
                out.append(Piece(f"optim/{info.canonical}/{key}", entry, piece,
                                 (pc.start, pc.stop)))
        if group_rank == 0:
            for p in b.params:
                info = infos[id(p)]
                if _tp_replica_writes(p, info.expert, pctx):
                    step = state["step"].detach()
                    out.append(Piece(f"optim/{info.canonical}/step", _shard_entry(info, step),
                                     step, None))
    return out


class Assembler:
    """Reads tensors back from their pieces (``PieceFiles`` does the file access)."""

    def __init__(self, files: PieceFiles, meta: dict):
        self.files, self.meta, self.path = files, meta, files.path

    def entries(self, key: str) -> list[dict]:
        return self.meta["tensors"][key]

    def full_shape(self, key: str) -> list[int]:
        e = self.entries(key)[0]
        shape = list(e["shape"])
        if e["dim"] is not None and e["size"] > 1:
            shape[e["dim"]] *= e["size"]
        return shape

    def local(self, key: str, info: ShardInfo, lo: int = 0,
              hi: Optional[int] = None) -> torch.Tensor:
        """Elements ``[lo, hi)`` of this run's shard ``info`` of tensor ``key``, flattened
        (a 0-dim tensor whole). May be a view of a memory-mapped file: a caller that keeps
        it copies it (``copy_local`` copies straight into a destination)."""
        parts = list(self._parts(key, info, lo, hi))
        if len(parts) == 1:
            return parts[0][1]
        return torch.cat([t for _, t in parts]) if parts else torch.empty(0)

    def copy_local(self, dest: torch.Tensor, key: str, info: ShardInfo, lo: int = 0) -> None:
        """Copy elements ``[lo, lo + dest.numel())`` of this run's shard of ``key`` into the
        contiguous ``dest``, piece by piece: no buffer in between when the saved split is
        this run's (a 0-dim ``dest`` takes the 0-dim tensor)."""
        flat = dest.view(-1)
        for at, part in self._parts(key, info, lo, lo + flat.numel()):
            flat[at - lo:at - lo + part.numel()].copy_(part.reshape(-1))

    def _parts(self, key: str, info: ShardInfo, lo: int, hi: Optional[int]):
        """``(offset in the shard, flat tensor)`` pieces that make up ``[lo, hi)``. Reads only
        those ranges when the saved split is this run's, else one full tensor and cuts."""
        entries = self.entries(key)
        first = entries[0]
        if not first["shape"]:
            yield 0, self.files.read(first, key)
            return
        saved_whole = first["dim"] is None or first["size"] == 1
        run_whole = info.dim is None or info.size == 1
        if saved_whole and run_whole:
            mine = entries
        elif (first["dim"], first["size"], first["glu"]) == (info.dim, info.size, info.glu):
            mine = [e for e in entries if e["rank"] == info.rank]
        else:  # another TP/EP split: this one tensor whole, then this run's shard of it
            yield lo, take_shard(self.full(key), info).reshape(-1)[lo:hi]
            return
        numel = _numel(mine[0]["shape"]) if mine else 0
        yield from self._ranges(mine, key, numel, lo, numel if hi is None else hi)

    def _ranges(self, entries: list[dict], key: str, numel: int, lo: int, hi: int):
        """``(offset, flat view)`` pieces of ``[lo, hi)`` of one shard (``entries``);
        ``UserError`` if they leave a gap."""
        spans = sorted(((e.get("range") or [0, numel]), i) for i, e in enumerate(entries))
        done = lo
        for (a, b), i in spans:
            if b <= done or a >= hi:
                continue  # before the window, or a second copy (format 2 TP replicas)
            if a > done:
                break
            part = self.files.read(entries[i], key, done - a, min(b, hi) - a)
            yield done, part
            done += part.numel()
        if done < hi:
            raise UserError(f"checkpoint {self.path}: the pieces of {key} in meta.json leave "
                            f"elements {done}..{hi} of its shard unwritten: meta.json was "
                            f"altered or the checkpoint is incomplete.")

    def full(self, key: str) -> torch.Tensor:
        """The full tensor ``key``, assembled from every saved shard."""
        entries = self.entries(key)
        first = entries[0]
        try:
            if not first["shape"]:
                return self.files.read(first, key)
            if first["dim"] is None or first["size"] == 1:
                return self._shard(entries, key)
            parts = [self._shard([e for e in entries if e["rank"] == r], key)
                     for r in range(first["size"])]
            if first["glu"]:
                halves = [p.chunk(2, dim=first["dim"]) for p in parts]
                return torch.cat([h[0] for h in halves] + [h[1] for h in halves], first["dim"])
            return torch.cat(parts, first["dim"])
        except (RuntimeError, IndexError, KeyError, TypeError) as e:  # shards that do not fit
            raise UserError(f"checkpoint {self.path}: the shards of {key} do not fit together "
                            f"as meta.json describes them ({e}).") from None

    def _shard(self, entries: list[dict], key: str) -> torch.Tensor:
        shape = entries[0]["shape"]
        numel = _numel(shape)
        parts = [t for _, t in self._ranges(entries, key, numel, 0, numel)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
