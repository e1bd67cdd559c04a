"""Format-3 shard files and pieces, in-process: the streamed file is a standard safetensors
file; a damaged header is refused by name; the ranks of a group split replicated tensors
into ranges that cover each tensor exactly once and evenly; a background save's host copy
does not follow the live tensor."""

import json
import struct

import pytest
import safetensors.torch
import torch

from locmoe_train.checkpoint_async import host_copy
from locmoe_train.checkpoint_pieces import PieceFiles, SafetensorsFile, write_pieces
from locmoe_train.checkpoint_plan import _cut
from locmoe_train.errors import UserError
from locmoe_train.parallel.sharding import ShardInfo


def test_streamed_file_is_standard_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    pieces = [("w|0|7", w.reshape(-1)[7:23]), ("t", w.t()),  # a view, a non-contiguous one
              ("step", torch.tensor(3.0)), ("half", torch.randn(4, generator=g).bfloat16()),
              ("ids", torch.arange(5)), ("empty", torch.zeros(0))]
    checksum = write_pieces(str(tmp_path / "s.safetensors"), pieces)
    assert checksum.startswith("crc32:")
    back = safetensors.torch.load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == {name for name, _ in pieces}
    for name, t in pieces:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t.contiguous()), name
    # Our reader: a range is a view of the mapped file, equal to the same range written.
    meta = {"files": {"s.safetensors": 0}}
    files = PieceFiles(str(tmp_path), meta)
    entry = {"file": "s.safetensors", "name": "w|0|7", "range": [7, 23], "dtype": "float32"}
    assert torch.equal(files.read(entry, "model/w", 2, 9), w.reshape(-1)[9:16])
    scalar = {"file": "s.safetensors", "name": "step", "shape": [], "dtype": "float32"}
    assert files.read(scalar, "optim/w/step").shape == ()


@pytest.mark.parametrize("damage, why", [
    (lambda h: h["w"].update(data_offsets=[0, 10 ** 6]), "the header entry of w does not fit"),
    (lambda h: h["w"].update(dtype="X9"), "the header entry of w does not fit"),
    (lambda h: h["w"].update(shape=[5]), "the header entry of w does not fit"),
], ids=["offsets", "dtype", "shape"])
def test_a_damaged_header_is_refused_by_name(tmp_path, damage, why):
    path = tmp_path / "s.safetensors"
    write_pieces(str(path), [("w", torch.ones(4))])
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    damage(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(UserError) as e:
        SafetensorsFile(str(tmp_path), "s.safetensors")
    assert str(e.value).startswith(f"checkpoint {tmp_path}: s.safetensors cannot be read (")
    assert why in str(e.value)


def test_a_group_cuts_its_replicated_tensors_evenly_and_exactly_once():
    info = ShardInfo("x", (1,), None, 0, 1, False, False)
    sizes = [1, 700, 3, 128, 1025, 64]
    lane = [(f"model/t{i}", info, torch.arange(n, dtype=torch.float32))
            for i, n in enumerate(sizes)]
    for group in (1, 2, 3, 4, 7):
        pieces = [piece for rank in range(group) for piece in _cut(lane, group, rank)]
        per_rank = [sum(p.range[1] - p.range[0] for p in _cut(lane, group, r))
                    for r in range(group)]
        assert max(per_rank) <= -(-sum(sizes) // group), (group, per_rank)
        for key, _, value in lane:  # the ranges of each tensor tile it, and hold its values
            mine = sorted((p for p in pieces if p.key == key), key=lambda p: p.range)
            assert mine[0].range[0] == 0 and mine[-1].range[1] == value.numel()
            assert all(a.range[1] == b.range[0] for a, b in zip(mine, mine[1:]))
            assert torch.equal(torch.cat([p.tensor for p in mine]), value)


def test_a_background_copy_keeps_the_values_at_the_save_in_a_reused_buffer():
    live, buffers = torch.arange(6, dtype=torch.float32), {}
    copy = host_copy(live[2:5], buffers, "x")
    live.add_(100)  # the next training step changes the state in place
    assert copy.device.type == "cpu" and not copy.is_pinned()
    assert copy.tolist() == [2.0, 3.0, 4.0]
    again = host_copy(live[2:5], buffers, "x")  # the next save: the same buffer
    assert again.data_ptr() == copy.data_ptr() and again.tolist() == [102.0, 103.0, 104.0]
