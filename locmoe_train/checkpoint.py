"""Checkpoints: atomic, resumable exactly, reshardable by parameter name, safe to load.

Owns the on-disk format, saving, finding the latest valid checkpoint and
loading it into a (possibly differently laid out) run. Does not own when to
save (the trainer calls ``save`` every ``checkpoint.interval`` steps and on a
clean stop).

Format 3: ``<checkpoint.dir>/step_00000300/``
* ``shards_rank00003.safetensors``: the pieces this rank writes, each an
  element range of one TP/EP shard of a tensor, stored under a layout-free
  name (``model/<name>``, ``optim/<name>/exp_avg`` ...). Every rank writes
  about ``total / world``: replicated tensors are cut into equal ranges over
  their data-parallel group, ZeRO-1 moments are written by their owners
  (``checkpoint_plan.py``); the file is streamed, one piece at a time
  (``checkpoint_pieces.py``);
* ``rng_rank00003.pt``: every rank's RNG states (torch CPU and CUDA, Python,
  NumPy, megatron's tensor-parallel tracker), as tensors and plain values;
* ``trainer.pt``: step, data loader position, MoE router/capacity states;
* ``meta.json``: written last: step, resolved config, layout, package version,
  the size of every file, every tensor's pieces (file, stored name, shard
  layout, shape, dtype, element range), and each file's checksum, taken as it
  was saved (``checkpoint_verify.py``).
With ``checkpoint.async`` the files are written by a background thread and
published at a later step (``checkpoint_async.py``).

Loading never runs code from a checkpoint: shard files are raw bytes under a
checked JSON header, every ``.pt`` file holds only tensors and plain values
and is read weights-only; a file that needs the full unpickler is refused
unless ``checkpoint.allow_pickle`` (``checkpoint_io.py``). Every piece is
checked against its ``meta.json`` entry (shape, dtype) before it is used
(``PieceFiles``), every file against its checksum when the checkpoint is
validated, and no file name from meta.json may lead outside the checkpoint's
directory. Formats 1 and 2 (``shards_rank*.pt``, one writer per data-parallel
group) still load; what format 1 lacks (Python/NumPy/tracker RNG states,
dtypes) is not restored.

Because every piece is stored with its shard layout under a layout-free
name, a run with the same TP/EP split copies the ranges it keeps straight
from the files; a run with other TP / EP sizes rebuilds one full tensor at a
time and keeps its own slice: model *and* Adam state reshard, across DP and
ZeRO on or off too. Only the RNG streams are per rank; after a layout change
they are re-seeded (stated in the log), the rest continues exactly.

Atomicity: everything is written into ``step_N.tmp``, files are fsynced,
rank 0 writes ``meta.json``, renames the directory, then replaces the
``latest`` pointer; a crash at any point leaves the previous checkpoint
intact, and an incomplete directory is never taken for a checkpoint. Which step
directories make up the run's history, pruning, moving aside and a failed save
are ``checkpoint_dirs.py``'s.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch

# The step-directory functions (the history of a checkpoint directory) live in
# checkpoint_dirs.py; imported here under their old names for existing callers.
from locmoe_train.checkpoint_dirs import (StepWrite, barrier, checkpoint_dir,  # noqa: F401
                                          find_resume, on_main, publish_step_dir, resolve,
                                          resume_point)
from locmoe_train.checkpoint_io import (ALLOW_PICKLE_FLAG, ALLOW_PICKLE_KEY, check_loadable,
                                        check_plain, load_file, rng_state, set_rng_state)
from locmoe_train.checkpoint_async import (BackgroundWrite, RankFiles, UnsyncedStepWrite,
                                           remove_unfinished)
from locmoe_train.checkpoint_pieces import PieceFiles
from locmoe_train.checkpoint_plan import Assembler, plan_pieces
from locmoe_train.checkpoint_verify import agree, check_files, sync_and_checksum
from locmoe_train.config import TrainConfig, upgrade_saved
from locmoe_train.errors import UserError
from locmoe_train.optim.distributed import ADAM_KEYS, DistributedAdamW
from locmoe_train.optim.optimizer import load_param_state
from locmoe_train.parallel.sharding import shard_info
from locmoe_train.parallel.state import ParallelContext

# 2: RNG states of Python, NumPy and megatron's tracker; shard dtypes in meta.json.
# 3: every rank writes its own pieces (safetensors shard files, element ranges).
FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
# Config sections that must match for a checkpoint to load (the model's shape).
STRUCTURAL = {"model": ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                        "ffn_hidden_size", "moe_every", "vocab_size", "tie_embeddings"],
              "moe": ["impl", "router", "num_experts", "top_k", "ffn_hidden_size"]}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("locmoe-train")
    except Exception:  # pragma: no cover - not installed as a package
        return "unknown"


def save_synced(obj, path: str) -> str:
    """``torch.save`` and fsync; ``obj`` must be tensors and plain values (``check_plain``).
    Returns the file's checksum, taken during the fsync (``sync_and_checksum``)."""
    check_plain(obj, os.path.basename(path))
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        return sync_and_checksum(f, path)


def other_files(meta: dict) -> list[str]:
    """A checkpoint's ``.pt`` files other than the shards (trainer, RNG, Ada-K state)."""
    return [f for f in meta["files"] if f.endswith(".pt") and not f.startswith("shards_")]


def verify_tensors(path: str, meta: dict, allow_pickle: bool = False,
                   option: str = ALLOW_PICKLE_FLAG) -> PieceFiles:
    """Every tensor ``meta.json`` indexes, checked in its shard file (memory-mapped: no
    tensor data is read); ``UserError`` on the first that is missing or does not match.
    Returns the reader, with the shard files it opened."""
    files = PieceFiles(path, meta, allow_pickle, option)
    for key, entries in meta["tensors"].items():
        for entry in entries:
            files.check(entry, key)
    return files


class Checkpointer:
    """Saves and loads a dict of stateful parts: ``model`` (with its ``optimizer``,
    whose state is stored per parameter) and any others with ``state_dict()`` /
    ``load_state_dict()`` (the data ``loader``, the MoE runtime as ``moe``).
    ``load`` restores only the parts it is given."""

    def __init__(self, cfg: TrainConfig, pctx: ParallelContext, hooks=(),
                 pickle_option: str = ALLOW_PICKLE_KEY):
        self.cfg, self.pctx, self.hooks = cfg, pctx, list(hooks)
        # How the refusal of a file that needs the full unpickler names the way to allow it.
        self.pickle_option = pickle_option
        self.dir = checkpoint_dir(cfg)
        self.pending: Optional[BackgroundWrite] = None  # a save being written in the background
        self.staging: dict = {}  # background saves: host buffers, reused by the next one
        self.started = False  # resolve_resume ran: no unfinished step_N.tmp is left

    # ---- save -------------------------------------------------------------
    def save(self, step: int, parts: dict) -> Optional[str]:
        """Save a checkpoint of ``step``: every rank writes its own pieces (no gather).
        Returns its path once published; with ``checkpoint.async`` returns None and the
        write goes on in the background (``writing`` says whether this rank's part still
        is; ``wait`` waits for it and publishes it).
        A save first waits for a pending one. Collective: every rank calls it."""
        self.wait()
        pctx, cfg = self.pctx, self.cfg
        snapshot = cfg.checkpoint.async_
        # A failed write: SaveFailed on every rank. No barrier at a background save's start
        # once resolve_resume has removed unfinished step directories.
        write = (UnsyncedStepWrite if snapshot and self.started else StepWrite)(
            self.dir, step, pctx)
        trainer = None
        if pctx.is_main:  # layout-free parts, identical on every rank (format 1 keys: loader, moe)
            trainer = {"step": step, **{name: part.state_dict() for name, part in parts.items()
                                        if name not in ("model", "optimizer")}}
            if snapshot:
                trainer = copy.deepcopy(trainer)
        pieces = plan_pieces(parts["model"], parts["optimizer"], cfg, pctx)
        files = RankFiles(write, pieces, rng_state(), trainer, save_synced, self.hooks,
                          snapshot=snapshot, staging=self.staging)
        if snapshot:
            self.pending = BackgroundWrite(files)
            return None
        files.write_all()
        return self._publish(files)

    def writing(self) -> bool:
        """True while this rank's part of a background save is still being written."""
        return self.pending is not None and not self.pending.done()

    def wait(self) -> Optional[str]:
        """Wait for the pending background save and publish it (its path; None if none).
        ``SaveFailed`` on every rank if any rank's write failed."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.join()
        return self._publish(pending.files)

    def _publish(self, files: RankFiles) -> str:
        write = files.write
        gathered = write.gather((files.index, files.sums), files.nbytes)
        meta = None
        if self.pctx.is_main:
            checksums, tensors = {}, {}
            for index, rank_sums in gathered:
                checksums.update(rank_sums)
                for key, entry in index:
                    tensors.setdefault(key, []).append(entry)
            pctx = self.pctx
            meta = {"format": FORMAT, "step": write.step, "version": _version(),
                    "config": self.cfg.to_dict(), "layout": pctx.describe(),
                    "world_size": pctx.world_size, "tp": pctx.tp, "ep": pctx.ep,
                    "dp": pctx.dp, "tensors": tensors, "checksums": dict(sorted(checksums.items()))}
        return write.publish(meta, self.cfg.checkpoint.keep)

    # ---- find ---------------------------------------------------------------
    def resolve_resume(self) -> Optional[str]:
        """The checkpoint to resume from, or None for a fresh start; checkpoints newer than
        it are moved aside (``checkpoint_dirs.roll_back``). Rank 0 finds it with the cheap
        checks (sizes, names); then every rank verifies its share of the checksums."""
        # Saves a crash interrupted go first: a background save's ranks then create
        # step_N.tmp without waiting for rank 0 (UnsyncedStepWrite).
        on_main(self.pctx, lambda: remove_unfinished(self.dir))
        self.started = True
        return resume_point(self.cfg.checkpoint.resume, self.dir, "checkpoint.resume",
                            lambda path: validate_checkpoint(path, verify=False), self.pctx,
                            verify=self.validate)

    def validate(self, path: str) -> Optional[str]:
        """``validate_checkpoint`` shared by the ranks: each checksums a part of the
        files, all get the same answer. Every rank must call it, in the same order."""
        return validate_checkpoint(path, pctx=self.pctx)

    # ---- load ---------------------------------------------------------------
    def load(self, path: str, parts: dict) -> int:
        """Load ``path`` into this run's layout: the given parts only (the optimizer
        state only when ``optimizer`` is given); returns the step to continue from.
        Every file is read with the weights-only unpickler (``load_file``)."""
        cfg, pctx = self.cfg, self.pctx
        allow, option = cfg.checkpoint.allow_pickle, self.pickle_option
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        check_compatible(meta["config"], cfg.to_dict(), path)
        # The small files first: a refused one stops the run before any shard is read.
        trainer = load_file(path, "trainer.pt", allow, option)
        try:
            step = int(trainer["step"])
        except (TypeError, KeyError, ValueError, IndexError):
            raise UserError(f"checkpoint {path}: trainer.pt holds no step: it is not a "
                            f"trainer state of this program.") from None
        rng_name = f"rng_rank{pctx.rank:05d}.pt"
        same_layout = (meta["world_size"], meta["tp"], meta["ep"]) == (pctx.world_size, pctx.tp,
                                                                       pctx.ep)
        rng = None
        if same_layout and os.path.exists(os.path.join(path, rng_name)):
            rng = load_file(path, rng_name, allow, option)
        files = PieceFiles(path, meta, allow, option)
        _load_tensors(Assembler(files, meta), parts["model"], parts.get("optimizer"), cfg, pctx)
        files.close()
        for name, part in parts.items():
            if name not in ("model", "optimizer") and trainer.get(name):
                part.load_state_dict(trainer[name])
        if rng is not None:
            set_rng_state(rng, f"checkpoint file {os.path.join(path, rng_name)}")
        elif pctx.is_main:
            print(f"note: layout changed ({meta['layout']} -> {pctx.describe()}): model, "
                  f"optimizer and data position are resharded; RNG streams restart from "
                  f"train.seed.", flush=True)
        return step


def _load_tensors(pieces: Assembler, model, optimizer, cfg, pctx) -> None:
    """Copy every parameter and buffer (and, with ``optimizer``, its state) from the
    checkpoint into this rank's shards, reading only the ranges this rank keeps when the
    saved split is its own (``Assembler.local``)."""
    path = pieces.path
    params = dict(model.named_parameters())
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, p in list(params.items()) + list(model.named_buffers()):
            if name not in state or name.endswith("_extra_state"):
                continue
            info = shard_info(name, p, cfg, pctx)
            key = f"model/{info.canonical}"
            if key not in pieces.meta["tensors"]:
                raise UserError(f"checkpoint {path} has no tensor {info.canonical!r}: it "
                                f"was saved from a different model.")
            shape = pieces.full_shape(key)
            if tuple(shape) != tuple(info.full_shape):
                raise UserError(f"checkpoint {path}: {key} has shape {shape}, this "
                                f"model needs {list(info.full_shape)}: it was saved from a "
                                f"different model, or its meta.json was altered.")
            pieces.copy_local(p, key, info)
            if name in params and optimizer is not None:
                _load_state(pieces, optimizer, p, info)


def _load_state(pieces: Assembler, optimizer, p, info) -> None:
    """``p``'s Adam state: only this rank's slice of it for the sharded optimizer."""
    keys = {k: f"optim/{info.canonical}/{k}" for k in ("step", *ADAM_KEYS)}
    saved = {k: key for k, key in keys.items() if key in pieces.meta["tensors"]}
    if not saved:
        return
    step = pieces.local(saved["step"], info).clone() if "step" in saved else None
    if isinstance(optimizer, DistributedAdamW):
        optimizer.load_param_ranges(
            p, lambda k, dest, a: pieces.copy_local(dest, saved[k], info, a) if k in saved
            else None, step)
        return
    current = optimizer.state.get(p, {})
    if all(k in current and (k == "step" or current[k].shape == p.shape) for k in saved):
        for k, key in saved.items():  # the state exists (a step was taken): fill it in place
            if k == "step":
                current[k].copy_(step)
            else:
                pieces.copy_local(current[k], key, info)
        return
    # A copy: the pieces may be views of a memory-mapped file. The optimizer places it.
    opt_state = {k: pieces.local(key, info).view_as(p).clone() for k, key in saved.items()
                 if k != "step"}
    if step is not None:
        opt_state["step"] = step
    load_param_state(optimizer, p, opt_state)


def read_full_tensors(path: str, prefix: str = "model/", progress=None,
                      allow_pickle: bool = False, option: str = ALLOW_PICKLE_FLAG,
                      verify: bool = True) -> tuple[dict, dict]:
    """``(meta, {canonical name: full tensor})`` of a checkpoint, whatever layout saved it.

    Reads every tensor whose key starts with ``prefix`` (default: the model's
    parameters and buffers, without the optimizer state), assembled from its
    TP/EP shards; names lose the prefix and are the names in a TP=1, EP=1
    model. ``progress(n)``, if given, is called once per assembled tensor.
    Raises ``UserError`` if ``path`` is not a complete checkpoint, if a shard does
    not match meta.json, or if one of its other ``.pt`` files would need the full
    unpickler (they are not read; ``allow_pickle`` accepts them, see ``check_loadable``).
    ``verify=False`` skips the checksums (for a caller that has just validated ``path``).
    """
    problem = validate_checkpoint(path, verify=verify)
    if problem is not None:
        raise UserError(f"checkpoint {path} is not usable: {problem}")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    check_loadable(path, other_files(meta), allow_pickle, option)
    pieces = Assembler(PieceFiles(path, meta, allow_pickle, option), meta)
    out = {}
    for key in meta["tensors"]:
        if key.startswith(prefix):
            out[key[len(prefix):]] = pieces.full(key)
            if progress is not None:
                progress(1)
    return meta, out


def validate_checkpoint(path: str, kind: Optional[str] = None, verify: bool = True,
                        pctx: Optional[ParallelContext] = None) -> Optional[str]:
    """None if ``path`` is a complete checkpoint of ``kind`` (None: pre-training,
    "adak": an Ada-K stage), else what is wrong with it: a file missing, of another
    size, named outside the directory, or (``verify``, the default) whose bytes do not
    match the checksum in meta.json. Verifying reads every file once.

    With ``pctx`` of more than one rank this is a collective: every rank must call it
    for the same path; each reads only its share of the files, and all return the
    same answer (the first problem any rank found)."""
    world = pctx.world_size if pctx is not None else 1
    problem = _local_problem(path, kind, verify, pctx.rank if world > 1 else 0, world)
    return agree(problem) if world > 1 else problem


def _local_problem(path: str, kind: Optional[str], verify: bool, rank: int,
                   world: int) -> Optional[str]:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        return "no such directory"
    if not os.path.exists(meta_path):
        return "meta.json is missing (the save did not finish)"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json is unreadable ({e})"
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        return (f"unknown checkpoint format {found!r} (this version reads "
                f"{', '.join(map(str, READABLE_FORMATS))})")
    if meta.get("kind") != kind:
        return {None: "an Ada-K stage checkpoint, not a pre-training one (give it as adak.resume)",
                "adak": "not an Ada-K stage checkpoint (pre-training checkpoints go to "
                        "--checkpoint)"}.get(kind, f"not a {kind} checkpoint")
    return check_files(path, meta, verify, rank, world)


def check_compatible(saved: dict, current: dict, path: str) -> None:
    saved = upgrade_saved(saved)  # checkpoints from before a key or value was renamed
    diffs = [f"{section}.{key}: checkpoint has {saved[section].get(key)!r}, this run has "
             f"{current[section].get(key)!r}"
             for section, keys in STRUCTURAL.items() for key in keys
             if saved[section].get(key) != current[section].get(key)]
    if diffs:
        raise UserError(f"checkpoint {path} was saved from an incompatible model: "
                        + "; ".join(diffs) + ". Resume with the same model settings, or start "
                        "a fresh run (checkpoint.resume=null) in another logging.run_dir.")
