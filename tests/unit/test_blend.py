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


def deviations(weights, sources):
    """|count_k(t) - w_k t| for every prefix length t = 1..len(sources) and source k."""
    w = np.asarray(weights, dtype=np.float64)
    onehot = np.zeros((len(sources), len(w)))
    onehot[np.arange(len(sources)), sources] = 1
    return np.abs(onehot.cumsum(axis=0) - np.outer(np.arange(1, len(sources) + 1), w))


def tijdeman_bound(k: int) -> float:
    return 1 - 1 / (2 * k - 2)


def test_every_prefix_stays_within_tijdemans_bound_of_the_weights():
    w = np.array([0.2, 0.5, 0.3])
    counts = np.zeros(3, dtype=np.int64)
    sources = np.concatenate([assign_sources(w, counts, start, 7) for start in range(0, 700, 7)])
    assert deviations(w, sources).max() <= 0.75  # 1 - 1/(2K - 2) for K = 3
    assert counts.tolist() == [140, 350, 210]
    # By hand (d = 3/4; may take t: w t - n >= 1/4; earliest (n + d) / w wins):
    # t=1: sources 1, 2 may, deadlines 1.5 < 2.5 -> 1; t=2: 0 (3.75) and 2 (2.5) -> 2;
    # t=3: 0 (3.75) and 1 (3.5) -> 1; t=4: only 0 may (w t - n = 0.8, 0, 0.2) -> 0.
    assert sources[:10].tolist() == [1, 2, 1, 0, 1, 2, 1, 0, 2, 1]
    # The assignment depends only on the position, not on how it is cut into steps.
    again = assign_sources(w, np.zeros(3, dtype=np.int64), 0, 700)
    assert again.tolist() == sources.tolist()


def test_five_sources_that_the_greedy_rule_left_over_one_sample_behind():
    w = np.array([1, 1, 9, 26, 39], dtype=np.float64)
    w /= w.sum()
    sources = assign_sources(w, np.zeros(5, dtype=np.int64), 0, 100_000)
    dev = deviations(w, sources)
    # The greedy rule (largest w t - n first) had source 3 at 1.03 after 41 samples.
    assert dev[40].max() < 1
    assert dev.max() <= tijdeman_bound(5) + 1e-9  # 7/8
    assert dev.max() > 0.8  # the bound is nearly reached: the test measures something


def test_random_blends_of_5_to_9_sources_stay_within_the_bound():
    rng = np.random.default_rng(2024)
    worst = {}
    for _ in range(60):
        k = int(rng.integers(5, 10))
        w = rng.random(k) ** 3 + 1e-3  # skewed: a few large parts, several small ones
        w /= w.sum()
        counts = np.zeros(k, dtype=np.int64)
        sources = np.concatenate([assign_sources(w, counts, s, 50) for s in range(0, 1500, 50)])
        dev = deviations(w, sources).max()
        assert dev <= tijdeman_bound(k) + 1e-9, (w.tolist(), dev)
        worst[k] = max(worst.get(k, 0.0), dev)
    assert max(worst.values()) < 1 and sorted(worst) == list(range(5, 10))


def test_two_sources_stay_within_half_a_sample_and_one_source_takes_all():
    for w0 in (0.3, 0.5, 0.01, 1 / 3):
        w = np.array([w0, 1 - w0])
        sources = assign_sources(w, np.zeros(2, dtype=np.int64), 0, 3000)
        assert deviations(w, sources).max() <= 0.5 + 1e-9
    counts = np.array([5], dtype=np.int64)
    assert assign_sources(np.array([1.0]), counts, 5, 4).tolist() == [0, 0, 0, 0]
    assert counts.tolist() == [9]


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
    assert state["blend"] == {"names": ["src0", "src1"], "rule": "tijdeman",
                              "weights": [0.3, 0.7], "consumed": [10, 22]}
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
    ("[{path: a, weight: 0}]", "data.blend[0].weight=0.0 must be a finite number > 0 (weights "
                               "are normalised to sum to 1)."),
    ("[{path: a, weight: -2}]", "data.blend[0].weight=-2.0 must be a finite number > 0 "
                                "(weights are normalised to sum to 1)."),
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


@pytest.mark.parametrize("weight, shown", [(".inf", "inf"), (".nan", "nan"), ("-.inf", "-inf"),
                                           ("inf", "inf")])
def test_a_blend_weight_that_is_not_finite_is_refused_from_yaml(tmp_path, weight, shown):
    """.inf used to pass `> 0`, normalise every weight to NaN and give one part every sample."""
    path = tmp_path / "blend.yaml"
    path.write_text(f"data:\n  blend:\n    - {{path: d/web, weight: 1}}\n"
                    f"    - {{path: d/code, weight: {weight}}}\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(e.value) == (f"data.blend[1].weight={shown} is not a finite number; every number "
                            f"in the config must be finite: give a finite value.")


def test_check_blend_config_refuses_an_infinite_weight_set_in_code():
    """Configs built in code skip YAML coercion; the blend check refuses inf there too."""
    from locmoe_train.config import BlendSource
    from locmoe_train.data.blend import check_blend_config

    with pytest.raises(UserError) as e:
        check_blend_config([BlendSource(path="a", weight=1.0),
                            BlendSource(path="b", weight=float("inf"))])
    assert str(e.value) == ("data.blend[1].weight=inf must be a finite number > 0 (weights are "
                            "normalised to sum to 1).")


def test_a_checkpoint_of_the_greedy_rule_resumes_with_a_note(capsys):
    """Old checkpoints have no "rule": their counts stand and the new rule goes on."""
    first = loader()
    for _ in range(4):
        first.next_step()
    state = first.state_dict()
    del state["blend"]["rule"]
    resumed = loader()
    resumed.load_state_dict(state)
    assert ("note: the checkpoint's blend was drawn by the greedy rule of earlier versions; "
            "its 32 samples so far stand") in capsys.readouterr().err
    assert resumed.samples_per_source() == {"src0": 10, "src1": 22}
    current = loader()
    current.load_state_dict(first.state_dict())
    assert capsys.readouterr().err == ""
    assert rows(resumed.next_step()) == rows(current.next_step()) == rows(first.next_step())


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
