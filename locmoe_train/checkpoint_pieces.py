"""Shard files of format 3: safetensors files written one tensor at a time, read by range.

Each rank writes its pieces (``checkpoint_plan.py``) into one
``shards_rankNNNNN.safetensors`` file. The file is a standard safetensors file
(an 8-byte header length, a JSON header naming every tensor's dtype, shape and
byte range, then the raw bytes), so any safetensors reader opens it. We write
it ourselves because ``safetensors.torch.save_file`` takes every tensor at
once: a rank would have to copy all of its pieces (views into parameters and
optimizer slices) before writing, and that copy is the memory a checkpoint must
not cost. Here the header is computed from shapes alone, then each piece's bytes
go straight from its tensor to the file (a GPU piece through one host copy at a
time).

Reading (``SafetensorsFile``) checks the header, memory-maps the file and hands
out views of it: copying a range into a parameter or an optimizer slice reads
only those bytes, with no buffer in between; nothing is unpickled. A format-2
checkpoint's ``.pt`` shard files are read with the weights-only unpickler,
memory-mapped too (``checkpoint_io.load_file``). The tests read our files with
the ``safetensors`` library itself, so they stay standard.

Not owned: which pieces a rank writes and how they are put back together
(``checkpoint_plan.py``), meta.json (``checkpoint.py``).
"""

from __future__ import annotations

import json
import os
import struct

import torch

from locmoe_train.checkpoint_io import ALLOW_PICKLE_KEY, load_file
from locmoe_train.checkpoint_verify import bad_name, sync_and_checksum
from locmoe_train.errors import UserError

# torch dtype -> the safetensors header's name for it.
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_NAMES = {v: k for k, v in ST_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how meta.json names a tensor's dtype."""
    return str(dtype).removeprefix("torch.")


def write_pieces(path: str, pieces: list[tuple[str, torch.Tensor]]) -> str:
    """Write ``pieces`` (name, tensor: any device, contiguous or not) as a safetensors file
    at ``path``, one tensor at a time, fsync it and return its checksum."""
    header, offset = {}, 0
    for name, t in pieces:
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in a shard file")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in pieces:
            f.write(_bytes(t))
        f.flush()
        return sync_and_checksum(f, path)


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` in row-major order; copies only what is not a contiguous
    CPU tensor already (a GPU piece: one host copy, freed once written)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class PieceFiles:
    """Opens a checkpoint's shard files as they are needed and reads stored tensors, or
    element ranges of them, checked against ``meta.json`` (shape, dtype): a file that
    lacks a listed tensor, or holds one of another shape or dtype, is refused with a
    ``UserError`` that names it, never a failure inside torch or safetensors."""

    def __init__(self, path: str, meta: dict, allow_pickle: bool = False,
                 option: str = ALLOW_PICKLE_KEY):
        self.path, self.meta = path, meta
        self.allow_pickle, self.option = allow_pickle, option
        self.files: dict[str, object] = {}

    def _refuse(self, file: str, what: str) -> UserError:
        return UserError(f"checkpoint {self.path}: {file} {what}: the file was altered or "
                         f"belongs to another checkpoint.")

    def _open(self, file, key: str):
        if not isinstance(file, str) or file not in self.meta.get("files", {}):
            raise UserError(f"checkpoint {self.path}: meta.json puts {key} in {file!r}, which "
                            f"is not one of its files.")
        if file not in self.files:
            if file.endswith(".safetensors"):
                self.files[file] = _open_safetensors(self.path, file)
            else:  # format 2: a torch.save'd dict, weights-only and memory-mapped
                obj = load_file(self.path, file, self.allow_pickle, self.option, mmap=True)
                if type(obj) is not dict:
                    raise self._refuse(file, f"holds a {type(obj).__name__}, not a dict of "
                                             f"tensors")
                self.files[file] = obj
        return self.files[file]

    def check(self, entry: dict, key: str) -> None:
        """``UserError`` unless the stored tensor of ``entry`` is there as meta.json says;
        reads no tensor data."""
        self._stored(entry, key, None)

    def read(self, entry: dict, key: str, lo: int = 0, hi=None) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the stored tensor of ``entry`` (flattened; a 0-dim
        tensor is returned whole), as a view of the memory-mapped file: copying it out
        reads only those bytes. The caller copies what it keeps."""
        return self._stored(entry, key, (lo, hi))

    def _stored(self, entry: dict, key: str, span):
        file = entry.get("file")
        handle = self._open(file, key)
        name = entry.get("name", key)  # format 2 stores each tensor under its key
        want = entry.get("range")
        want_shape = [want[1] - want[0]] if want is not None else entry.get("shape")
        dtype = entry.get("dtype")  # dtype: format 2 on
        value = None
        if isinstance(handle, dict):
            value = handle.get(name)
            if not isinstance(value, torch.Tensor):
                raise self._refuse(file, f"has no tensor {name}, which meta.json lists")
            shape, got = list(value.shape), dtype_name(value.dtype)
        else:
            if name not in handle.keys():
                raise self._refuse(file, f"has no tensor {name}, which meta.json lists")
            shape, got_dtype = handle.describe(name)
            got = dtype_name(got_dtype)
        if want_shape is not None and shape != list(want_shape):
            raise self._refuse(file, f"holds {name} with shape {shape}, but meta.json says "
                                     f"{list(want_shape)}")
        if dtype is not None and got != dtype:
            raise self._refuse(file, f"holds {name} as {got}, but meta.json says {dtype}")
        if span is None:
            return None
        lo, hi = span
        flat = value.reshape(-1) if value is not None else handle.flat(name)
        if not shape or entry.get("shape") == []:  # a 0-dim tensor (stored with 1 element)
            return flat.reshape(())
        return flat[lo:hi]

    def close(self) -> None:
        self.files.clear()


_MAX_HEADER = 100_000_000  # bytes: safetensors' own limit


class SafetensorsFile:
    """A safetensors file, memory-mapped (privately: nothing is written back), whose
    tensors are zero-copy views of the mapping: copying a range out of one reads only
    those pages, and the pages stay file-backed memory the kernel can drop. The header is
    checked before any view is made (dtypes, shapes, and byte ranges inside the file
    that match them); a file that fails is refused with ``UserError``.

    ``safetensors.safe_open`` reads the same files, but returns a fresh copy of every
    slice it is asked for: at load that would be a second buffer per tensor."""

    def __init__(self, ckpt: str, file: str):
        self.where = f"checkpoint {ckpt}: {file}"
        path = os.path.join(ckpt, file)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
                if n is None or n > min(_MAX_HEADER, size - 8):
                    raise ValueError("no safetensors header")
                header = json.loads(f.read(n))
            self.data = n + 8
            self.entries = self._check(header, size - self.data)
            self.buf = (torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
                        if size else torch.empty(0, dtype=torch.uint8))
        except (OSError, ValueError, struct.error, TypeError, KeyError) as e:
            raise UserError(f"{self.where} cannot be read ({e})") from None

    @staticmethod
    def _check(header, data_len: int) -> dict:
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            dtype = _NAMES.get(e["dtype"])
            shape = [int(d) for d in e["shape"]]
            lo, hi = (int(x) for x in e["data_offsets"])
            numel = 1
            for d in shape:
                numel *= d
            if dtype is None or min(shape, default=0) < 0 or not 0 <= lo <= hi <= data_len or \
                    hi - lo != numel * torch.empty(0, dtype=dtype).element_size():
                raise ValueError(f"the header entry of {name} does not fit the file")
            out[name] = (dtype, shape, lo, hi)
        return out

    def keys(self):
        return self.entries.keys()

    def describe(self, name: str) -> tuple[list[int], torch.dtype]:
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def flat(self, name: str) -> torch.Tensor:
        """The stored tensor ``name``, flattened: a view of the mapping, no copy."""
        dtype, _, lo, hi = self.entries[name]
        return self.buf[self.data + lo:self.data + hi].view(dtype)


def _open_safetensors(ckpt: str, file: str) -> SafetensorsFile:
    problem = bad_name(file)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt}: {problem}.")
    return SafetensorsFile(ckpt, file)
