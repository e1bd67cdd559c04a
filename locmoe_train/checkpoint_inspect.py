"""``locmoe-train inspect-checkpoint PATH [--verify]``: a checkpoint's summary and its
integrity check, from the outside.

Owns the command's options and what it prints. Reads a checkpoint only through
``checkpoint.py`` (validation, the weights-only loader, the tensor index); does not
own the format.
"""

from __future__ import annotations

import json
import os

from locmoe_train.checkpoint import other_files, validate_checkpoint, verify_tensors
from locmoe_train.checkpoint_pieces import SafetensorsFile
from locmoe_train.checkpoint_dirs import resolve
from locmoe_train.checkpoint_io import ALLOW_PICKLE_FLAG, load_file
from locmoe_train.errors import UserError


def main(argv: list[str]) -> int:
    """``locmoe-train inspect-checkpoint PATH [--verify]``: summary and integrity check
    (every file's size and index; with ``--verify`` every byte against its checksum)."""
    import argparse

    ap = argparse.ArgumentParser(prog="locmoe-train inspect-checkpoint",
                                 description="Print a checkpoint's step, config summary, layout "
                                             "and sizes, and check that it is complete "
                                             "and that every tensor is where meta.json "
                                             "says.")
    ap.add_argument("path", help="a step_* directory, or a checkpoint dir (uses 'latest')")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--verify", action="store_true",
                    help="also read every file in full and compare it with the checksum "
                         "taken when it was saved (exit status 2 naming a file that does "
                         "not match)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="unpickle a file that the safe (weights-only) loader refuses: it can "
                         "run code from the checkpoint; only for checkpoints you trust")
    args = ap.parse_args(argv)
    path = resolve(args.path)
    problem = validate_checkpoint(path, verify=args.verify)
    if problem is not None:
        raise UserError(f"checkpoint {path} is not usable: {problem}")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    # Read every file back (weights-only) and every indexed tensor against meta.json:
    # a corrupt or altered file fails here, not at resume time.
    for file in other_files(meta):
        load_file(path, file, args.allow_pickle, ALLOW_PICKLE_FLAG)
    shards = verify_tensors(path, meta, args.allow_pickle, ALLOW_PICKLE_FLAG)
    tensors = sum(len(obj.keys()) for obj in shards.files.values())
    for file in meta["files"]:  # a shard file that meta.json indexes nothing in
        if file.startswith("shards_") and file not in shards.files:
            if file.endswith(".safetensors"):
                tensors += len(SafetensorsFile(path, file).keys())
                continue
            obj = load_file(path, file, args.allow_pickle, ALLOW_PICKLE_FLAG, mmap=True)
            tensors += len(obj) if isinstance(obj, dict) else 0
    cfg = meta["config"]
    m, moe = cfg["model"], cfg["moe"]
    params = sum(_numel(entries[0]) for key, entries in meta["tensors"].items()
                 if key.startswith("model/"))
    summary = {"path": path, "step": meta["step"], "version": meta["version"],
               "layout": meta["layout"], "files": len(meta["files"]),
               "bytes": sum(meta["files"].values()), "tensors": tensors,
               "model_parameters": params,
               "model": f"{m['num_layers']} layers, hidden {m['hidden_size']}, "
                        f"{m['num_attention_heads']} heads, vocab {m['vocab_size']}",
               "moe": f"impl={moe['impl']} router={moe['router']} experts={moe['num_experts']} "
                      f"top_k={moe['top_k']}",
               "checksums": _checksum_status(meta, args.verify), "status": "ok"}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>17}: {value}")
    return 0


def _checksum_status(meta: dict, verified: bool) -> str:
    if "checksums" not in meta:
        return "none stored (saved by an older version): sizes checked only"
    if verified:
        return f"all {len(meta['files'])} files match"
    return "stored, not checked (--verify reads every file and checks it)"


def _numel(entry: dict) -> int:
    """Elements of the whole tensor that ``entry`` is a shard (or a piece of a shard) of."""
    n = entry["size"] if entry.get("dim") is not None else 1
    for d in entry["shape"]:
        n *= d
    return n
