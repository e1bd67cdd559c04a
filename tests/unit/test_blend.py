"""data.blend: the source assignment, the loader's determinism, data-parallel slices and
resumable state, tokenizer checks and config errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from locmoe_train.config import load_config
from locmoe_train.data.blend import (BlendLoader, BlendPart, assign_sources, data_meta,
                                     source_name)
from locmoe_train.data.dataset import StepLoader
from locmoe_train.errors import UserError
from locmoe_train.sinks.trackers import scalars

SEQ = 4


class Windows:
    """A stand-in split: window i of source `tag` is [tag, i, i, i, i]."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.array([self.tag] + [i] * SEQ, dtype=np.int64)


def parts(weights=(0.3, 0.7), sizes=(50, 90)):
    total = sum(weights)
    return [BlendPart(f"src{k}", f"/data/src{k}", w / total, Windows(k, n), Windows(k, 5))
            for k, (w, n) in enumerate(zip(weights, sizes))]


def loader(dp_rank=0, dp_size=1, gbs=8, mbs=2, seed=7, **kw):
    return BlendLoader(parts(**kw), gbs, mbs, dp_rank, dp_size, seed)


def rows(micro_batches):
    return torch.cat(micro_batches).tolist()


def test_every_prefix_stays_within_one_sample_of_the_weights():
    w = np.array([0.2, 0.5, 0.3])
    counts = np.zeros(3, dtype=np.int64)
    sources = np.concatenate([assign_sources(w, counts, start, 7) for start in range(0, 700, 7)])
    seen = np.zeros(3)
    for p, k in enumerate(sources):
        seen[k] += 1
        assert np.all(np.abs(seen - w * (p + 1)) < 1.0), (p, seen)
    assert counts.tolist() == [140, 350, 210]
    # The first positions, by hand: deficits 0.5 > 0.3 > 0.2 -> source 1, then ...
    assert sources[:10].tolist() == [1, 2, 0, 1, 1, 2, 1, 0, 2, 1]


def test_shares_match_the_weights_over_a_long_run():
    ld = loader(weights=(0.3, 0.7))
    drawn = np.zeros(2)
    for _ in range(250):  # 2000 samples: every source wraps around its epochs
        for row in rows(ld.next_step()):
            drawn[row[0]] += 1
    shares = drawn / drawn.sum()
    assert shares == pytest.approx([0.3, 0.7], rel=0.02)
    assert ld.log_record({}, 1) == {"data_samples": {"src0": 600, "src1": 1400}}
    assert ld.samples_per_source() == {"src0": int(drawn[0]), "src1": int(drawn[1])}


def test_order_within_a_source_is_a_seeded_permutation_per_epoch():
    ld = loader(weights=(0.5, 0.5), sizes=(12, 12), gbs=8, mbs=8)
    seen = [row[1] for _ in range(3) for row in rows(ld.next_step()) if row[0] == 0]
    assert sorted(seen) == list(range(12))  # one epoch of source 0: each window once
    other = loader(weights=(0.5, 0.5), sizes=(12, 12), gbs=8, mbs=8, seed=8)
    assert [row[1] for _ in range(3) for row in rows(other.next_step()) if row[0] == 0] != seen


def test_data_parallel_ranks_split_the_global_batch_in_order():
    single = loader(dp_size=1)
    ranks = [loader(dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        want = rows(single.next_step())
        got = rows(ranks[0].next_step()) + rows(ranks[1].next_step())
        assert got == want


def test_resume_continues_exactly_at_another_data_parallel_size():
    straight = loader()
    for _ in range(4):
        straight.next_step()
    want = [rows(straight.next_step()) for _ in range(3)]
    first = loader()
    for _ in range(4):
        first.next_step()
    state = first.state_dict()
    assert state["blend"] == {"names": ["src0", "src1"], "weights": [0.3, 0.7],
                              "consumed": [10, 22]}
    ranks = [loader(dp_rank=r, dp_size=2) for r in range(2)]
    for ld in ranks:
        ld.load_state_dict(state)
    got = [rows(ranks[0].next_step()) + rows(ranks[1].next_step()) for _ in range(3)]
    assert got == want


def test_resume_refuses_another_blend_or_a_single_dataset_state():
    state = loader().state_dict()
    with pytest.raises(UserError) as e:
        loader(weights=(0.4, 0.6)).load_state_dict(state)
    assert str(e.value) == ("the checkpoint's data.blend is [src0=0.3, src1=0.7] but this run's "
                            "is [src0=0.4, src1=0.6]; resume with the same blend (names and "
                            "weights), or start a fresh run.")
    single = StepLoader(Windows(0, 50), 8, 2, 0, 1, 7)
    with pytest.raises(UserError) as e:
        loader().load_state_dict(single.state_dict())
    assert str(e.value).startswith("the checkpoint was trained on one dataset (data.path) but "
                                   "this run sets data.blend")
    with pytest.raises(UserError) as e:
        single.load_state_dict(state)
    assert str(e.value).startswith("the checkpoint was trained on a blend (data.blend) but this "
                                   "run reads one dataset (data.path)")


@pytest.mark.parametrize("blend, message", [
    ("[]", "data.blend is empty: list at least one {path: DIR, weight: W}, or remove "
           "data.blend and set data.path."),
    ("[{path: a, weight: 0}]", "data.blend[0].weight=0.0 must be > 0 (weights are normalised "
                               "to sum to 1)."),
    ("[{weight: 1}]", "data.blend[0] has no path: give the directory written by `locmoe-train "
                      "prepare-data`."),
    ("[{path: x/a}, {path: y/a}]", "data.blend has two parts named 'a': give them distinct "
                                   "names with data.blend[i].name."),
    ("[{path: a, wieght: 1}]", "unknown config key 'data.blend[0].wieght'. Did you mean "
                               "'weight'? Valid keys here: path, weight, name."),
])
def test_bad_blend_configs_are_refused(blend, message):
    with pytest.raises(UserError) as e:
        load_config(None, [f"data.blend={blend}"])
    assert str(e.value) == message


def test_blend_config_parses_from_an_override():
    cfg = load_config(None, ["data.blend=[{path: d/web, weight: 0.3}, "
                             "{path: d/code, weight: 0.7, name: py}]"])
    assert [(s.path, s.weight, source_name(s)) for s in cfg.data.blend] == [
        ("d/web", 0.3, "web"), ("d/code", 0.7, "py")]


def test_parts_with_different_tokenizers_are_refused(tmp_path, tiny_data):
    same = str(tmp_path / "same")
    shutil.copytree(tiny_data, same)
    cfg = load_config(None, [f"data.blend=[{{path: {tiny_data}}}, {{path: {same}}}]"])
    assert data_meta(cfg.data)["vocab_size"] == 512
    other = str(tmp_path / "other")
    shutil.copytree(tiny_data, other)
    with open(os.path.join(other, "tokenizer.model"), "ab") as f:
        f.write(b"\0")
    cfg = load_config(None, [f"data.blend=[{{path: {tiny_data}}}, {{path: {other}}}]"])
    with pytest.raises(UserError) as e:
        data_meta(cfg.data)
    assert str(e.value) == (
        f"data.blend mixes tokenizers: {tiny_data!r} and {other!r} differ in tokenizer model; "
        f"prepare every part with the same tokenizer (prepare-data --tokenizer-path "
        f"{os.path.join(tiny_data, 'tokenizer.model')} ...).")
    meta_path = os.path.join(same, "meta.json")
    meta = json.load(open(meta_path))
    meta["vocab_size"] = 600
    json.dump(meta, open(meta_path, "w"))
    cfg = load_config(None, [f"data.blend=[{{path: {tiny_data}}}, {{path: {same}}}]"])
    with pytest.raises(UserError, match="differ in vocabulary size"):
        data_meta(cfg.data)


def test_tracker_names_of_the_blend_fields():
    record = {"step": 5, "val_loss": 2.0, "val_ppl": 7.4,
              "val_by_dataset": {"web": {"loss": 2.5}, "code": {"loss": 1.8}},
              "data_samples": {"web": 12, "code": 28}}
    assert scalars(record) == {"val/loss": 2.0, "val/ppl": 7.4, "val/web/loss": 2.5,
                               "val/code/loss": 1.8, "data/web/samples": 12,
                               "data/code/samples": 28}
