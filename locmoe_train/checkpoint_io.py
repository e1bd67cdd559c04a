"""What a checkpoint file may hold, and how it is read: no code from it ever runs.

Every ``.pt`` file of a checkpoint (shards, RNG states, trainer and Ada-K state)
holds only tensors and plain values: dicts, lists, tuples, str, int, float,
bool, None (``check_plain``, applied on save). Such a file is read with torch's
weights-only unpickler (``load_file``), which rebuilds nothing else; no class
is allow-listed. A file that unpickler refuses names pickled classes or
functions: it was written by other code, or crafted to run code when loaded.
It stops the command (``UserError``, exit 2, naming the file and the option)
unless the user set ``checkpoint.allow_pickle`` (``--allow-pickle`` on the
subcommands); only then is it unpickled in full (``_unpickle``, the one
unrestricted ``torch.load``). The RNG states of Python and NumPy are stored as
tensors and numbers, so that they need no pickle either.

Not owned: the checkpoint layout, meta.json and the shard index
(``checkpoint.py``).
"""

from __future__ import annotations

import os
import pickle
import random
import sys
from typing import Optional

import torch

from locmoe_train.checkpoint_verify import bad_name
from locmoe_train.errors import UserError

# How the user allows unpickling (named in the refusal): the config key for training,
# the flag on the subcommands.
ALLOW_PICKLE_KEY = "--checkpoint.allow_pickle=true"
ALLOW_PICKLE_FLAG = "--allow-pickle"

_PLAIN = (bool, int, float, str, type(None))


def check_plain(obj, where: str) -> None:
    """TypeError unless ``obj`` is built only of tensors and plain values: what
    ``torch.load(weights_only=True)`` reads back without allow-listing any class."""
    if type(obj) in _PLAIN or type(obj) is torch.Tensor:  # not subclasses: numpy.float64
        return
    if type(obj) in (list, tuple):
        for v in obj:
            check_plain(v, where)
        return
    if type(obj) is dict:
        for k, v in obj.items():
            check_plain(k, where)
            check_plain(v, where)
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not a "
                    f"tensor or plain value; checkpoint files hold only those, so that they "
                    f"load with torch.load(weights_only=True)")


def _unsafe_globals(path: str) -> list[str]:
    """The classes and functions the pickle in ``path`` names that the weights-only
    unpickler does not allow (read from its opcodes; nothing is executed)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint at all: reported as unreadable
        return []


def load_file(ckpt: str, name: str, allow_pickle: bool = False,
              option: str = ALLOW_PICKLE_KEY, mmap: bool = False):
    """The object in the checkpoint file ``ckpt/name``, read with torch's weights-only
    unpickler (tensors and plain values only: no code from the file runs).

    A file that unpickler refuses raises ``UserError`` naming the file and ``option``,
    unless ``allow_pickle`` is set; then (an explicit choice to trust the checkpoint,
    e.g. one written by other code) it is unpickled in full. A file that cannot be
    read at all raises ``UserError`` too: never a traceback from inside torch. So does a
    ``name`` (from meta.json) that is not a plain name inside ``ckpt``: nothing is opened."""
    full = _inside(ckpt, name)
    try:
        return torch.load(full, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(full)
        if not unsafe:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {ckpt}: {name} cannot be read ({reason})") from None
        if not allow_pickle:
            raise _refusal(full, unsafe, f"Load it only if you trust where it comes from, "
                                         f"with {option}.") from None
        print(f"warning: unpickling {full} ({option}): it holds {', '.join(unsafe)}, and "
              f"unpickling runs whatever code the file names", file=sys.stderr, flush=True)
        return _unpickle(full, mmap)
    except Exception as e:  # truncated, not a zip archive, I/O error...
        raise UserError(f"checkpoint {ckpt}: {name} cannot be read ({e})") from None


def _inside(ckpt: str, name: str) -> str:
    """``ckpt/name``; ``UserError`` if ``name`` could lead outside ``ckpt``."""
    problem = bad_name(name)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt}: {problem}.")
    return os.path.join(ckpt, name)


def _refusal(full: str, unsafe: list[str], advice: str) -> UserError:
    shown = ", ".join(unsafe[:4]) + (", ..." if len(unsafe) > 4 else "")
    return UserError(f"checkpoint file {full} holds pickled Python objects ({shown}) that the "
                     f"safe loader refuses: unpickling them could run code from the file. "
                     f"{advice}")


def _unpickle(full: str, mmap: bool):
    """The one unrestricted ``torch.load``: reached only with ``checkpoint.allow_pickle``
    (``--allow-pickle``), for a file the weights-only unpickler refused."""
    return torch.load(full, map_location="cpu", mmap=mmap, weights_only=False)


def check_loadable(ckpt: str, names, allow_pickle: bool = False,
                   option: str = ALLOW_PICKLE_KEY) -> None:
    """Refuse (``UserError``, as ``load_file`` does) a checkpoint where one of the files
    ``names`` would need the full unpickler, without reading or unpickling any: for
    commands that do not need those files' content (``export-hf`` reads only shards)."""
    for name in names:
        full = _inside(ckpt, name)
        unsafe = _unsafe_globals(full)
        if not unsafe:
            continue
        if not allow_pickle:
            raise _refusal(full, unsafe, f"Use the checkpoint only if you trust where it "
                                         f"comes from, with {option}.")
        if full not in _ACCEPTED:  # once per file and process
            _ACCEPTED.add(full)
            print(f"warning: {full} holds pickled Python objects ({', '.join(unsafe)}); "
                  f"accepted ({option}) and not read", file=sys.stderr, flush=True)


_ACCEPTED: set[str] = set()


# ---- RNG states: tensors and plain values, no pickled objects -----------------------

def rng_state() -> dict:
    """This process's RNG states: torch CPU (and CUDA), Python's ``random``, NumPy's
    global generator and megatron's tensor-parallel tracker, as tensors and plain values."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": {"version": int(version),
                       "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"bit_generator": str(bit_generator),
                      "key": torch.from_numpy(key.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "tracker": _tracker_states()}


def _tracker():
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return None
    return get_cuda_rng_tracker()


def _tracker_states() -> Optional[dict]:
    """megatron's named RNG states (attention dropout under TP forks them), if they are
    plain state tensors (a CUDA-graph-safe tracker keeps generators: not saved)."""
    tracker = _tracker()
    states = tracker.get_states() if tracker is not None else {}
    if not states or not all(type(s) is torch.Tensor for s in states.values()):
        return None
    return {str(name): s.detach().cpu().clone() for name, s in states.items()}


def set_rng_state(rng, where: str) -> None:
    """Restore what ``rng_state`` saved (a format-1 file has only ``cpu`` and ``cuda``;
    what it lacks is left as seeded). ``UserError`` if ``rng`` is not such a state."""
    import numpy as np

    try:
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        py = rng.get("python")
        if py is not None:
            random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()),
                             py["gauss_next"]))
        npy = rng.get("numpy")
        if npy is not None:
            np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32),
                                 int(npy["pos"]), int(npy["has_gauss"]),
                                 float(npy["cached_gaussian"])))
        states = rng.get("tracker")
        tracker = _tracker()
        if states is not None and tracker is not None:
            current = tracker.get_states()
            if set(states) == set(current) and all(type(s) is torch.Tensor
                                                   for s in current.values()):
                tracker.set_states({name: s.clone() for name, s in states.items()})
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UserError(f"{where} is not an RNG state file of this program ({e})") from None
