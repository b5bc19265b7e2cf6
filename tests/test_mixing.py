"""Dataset mixing: proportions, epochs, determinism, resume state, bad values."""

from __future__ import annotations

import numpy as np
import pytest

from tinytune.datasets import DatasetError
from tinytune.datasets.mixing import MixedDataset, mix_order


class Items:
    def __init__(self, tag: str, n: int):
        self.tag, self.n = tag, n
        self.lengths = np.arange(1, n + 1, dtype=np.int64)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, int(i))


def test_weights_sample_by_probability_until_the_first_source_runs_out():
    src, idx = mix_order([1000, 5000], weights=[0.8, 0.2], seed=1)
    counts = np.bincount(src, minlength=2)
    assert counts[0] == 1000  # the binding source is used up exactly once, no repeats
    assert len(set(idx[src == 0].tolist())) == 1000
    assert abs(counts[0] / counts.sum() - 0.8) < 0.03
    assert len(set(idx[src == 1].tolist())) == counts[1]  # no repeats in the other source either


def test_epochs_repeat_or_cut_each_source():
    src, idx = mix_order([10, 4], epochs=[0.5, 2.5], seed=0)
    assert np.bincount(src).tolist() == [5, 10]
    a = idx[src == 1]
    assert sorted(np.bincount(a, minlength=4).tolist()) == [2, 2, 3, 3]  # 2 full passes + half of one
    assert len(set(idx[src == 0].tolist())) == 5


def test_deterministic_under_the_seed():
    a = mix_order([50, 70, 20], weights=[1, 2, 1], seed=3)
    b = mix_order([50, 70, 20], weights=[1, 2, 1], seed=3)
    c = mix_order([50, 70, 20], weights=[1, 2, 1], seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_mixed_dataset_items_lengths_and_state():
    a, b = Items("a", 6), Items("b", 3)
    mix = MixedDataset([a, b], ["a", "b"], epochs=[1, 2], seed=0)
    got = [mix[i] for i in range(len(mix))]
    assert sorted(got) == sorted([("a", i) for i in range(6)] + [("b", i) for i in range(3)] * 2)
    assert mix.lengths.tolist() == [t[1] + 1 for t in got]
    assert mix.contributed == [6, 6] and mix.served == [6, 6]
    assert (
        mix.describe()
        == "dataset mix (seed 0, 12 samples): a: 6 samples (50.0%) of its 6, b: 6 samples (50.0%) of its 3"
    )
    fresh = MixedDataset([a, b], ["a", "b"], epochs=[1, 2], seed=0)
    fresh.load_state_dict(mix.state_dict())
    assert fresh.served == [6, 6]
    other = MixedDataset([a, b], ["a", "b"], epochs=[1, 1], seed=0)
    with pytest.raises(ValueError, match="differs from this run's"):
        other.load_state_dict(mix.state_dict())


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(weights=[1.0, 0]), r"dataset\[1\].weight: 0 must be > 0"),
        (dict(weights=[1.0, -2]), r"dataset\[1\].weight: -2 must be > 0"),
        (dict(weights=[1.0, "x"]), r"dataset\[1\].weight: expected a positive number, got 'x'"),
        (dict(epochs=[0, 1]), r"dataset\[0\].epochs: 0 must be > 0"),
        (dict(), "needs `weight` on every source or `epochs` on every source"),
        (dict(weights=[1, 1], epochs=[1, 1]), "not both"),
    ],
)
def test_bad_mix_values(kw, msg):
    with pytest.raises(DatasetError, match=msg):
        mix_order([3, 3], **kw)


def test_tune_validate_accepts_mix_keys_only_on_dataset_items():
    from omegaconf import OmegaConf

    from tinytune.config._validate import validate_config

    node = {"_component_": "tinytune.datasets.sft_dataset", "source": "a.jsonl"}
    ok = OmegaConf.create({"dataset": [dict(node, weight=0.5), dict(node, epochs=2)]})
    assert validate_config(ok)[0] == []
    bad = OmegaConf.create({"dataset": [dict(node, wieght=0.5)], "validation": {"dataset": dict(node, weight=1)}})
    problems = [p.key for p in validate_config(bad)[0]]
    assert problems == ["dataset[0]", "validation.dataset"]
