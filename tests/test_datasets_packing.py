"""Collate, packing with document masks, and the length-grouped sampler."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tinytune.datasets import (
    IGNORE_INDEX,
    GroupByLengthSampler,
    PackedDataset,
    labels_from_mask,
    pack_bins,
    padded_collate,
)


def make_items(n: int, vocab: int = 512, lo: int = 3, hi: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        tokens = [rng.randrange(vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        mask = [False] * prompt + [True] * (length - prompt)
        items.append({"tokens": tokens, "labels": labels_from_mask(tokens, mask)})
    return items


def test_padded_collate_dynamic_and_fixed():
    items = make_items(3, lo=5, hi=13)
    b = padded_collate(items, pad_id=7)
    longest = max(len(i["tokens"]) for i in items)
    s = -(-longest // 8) * 8
    assert b["tokens"].shape == (3, s) and b["labels"].shape == (3, s) and b["tokens"].dtype == torch.long
    for r, it in enumerate(items):
        n = len(it["tokens"])
        assert b["tokens"][r, :n].tolist() == it["tokens"] and (b["tokens"][r, n:] == 7).all()
        assert b["labels"][r, :n].tolist() == it["labels"] and (b["labels"][r, n:] == IGNORE_INDEX).all()
    assert padded_collate(items, pad_to_multiple_of=1)["tokens"].shape[1] == longest
    assert padded_collate(items, max_seq_len=32)["tokens"].shape == (3, 32)
    with pytest.raises(ValueError, match="max_seq_len"):
        padded_collate(items, max_seq_len=4)


@pytest.mark.parametrize("strategy", ["ffd", "greedy"])
def test_pack_bins_respects_capacity_and_uses_every_sample_once(strategy):
    lengths = np.random.default_rng(0).integers(1, 100, size=500)
    bins = pack_bins(lengths, 128, strategy)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-int(lengths.sum()) // 128)
    if strategy == "ffd":
        assert len(bins) <= lower_bound * 1.05 + 1
    with pytest.raises(ValueError, match="max_seq_len"):
        pack_bins([10, 200], 128, strategy)


def test_packed_items_and_collate_document_structure():
    items = make_items(30, hi=30)
    ds = PackedDataset(items, max_seq_len=64, pad_id=0)
    assert 0.5 < ds.fill_ratio <= 1.0
    seen = 0
    for k in range(len(ds)):
        it = ds[k]
        assert len(it["tokens"]) == len(it["labels"]) == len(it["input_pos"]) == 64
        assert sum(it["seq_lens"]) == 64
        pos = 0
        for j, n in enumerate(it["seq_lens"]):
            assert it["input_pos"][pos : pos + n] == list(range(n))  # positions restart per document
            assert it["labels"][pos + n - 1] == IGNORE_INDEX  # no label crosses a border
            if j < len(ds.bins[k]):
                src = items[ds.bins[k][j]]
                assert it["tokens"][pos : pos + n] == src["tokens"] and it["labels"][pos : pos + n] == src["labels"]
                seen += 1
            else:  # padding tail
                assert all(x == IGNORE_INDEX for x in it["labels"][pos : pos + n])
            pos += n
    assert seen == 30
    batch = padded_collate([ds[0], ds[1], ds[len(ds) - 1]])
    assert batch["tokens"].shape == batch["input_pos"].shape == (3, 64)
    assert (batch["seq_lens"].sum(dim=1) == 64).all()
    assert batch["seq_lens"].shape[1] == max(len(ds[i]["seq_lens"]) for i in (0, 1, len(ds) - 1))


def test_packed_collate_extends_padding_document():
    items = make_items(4, hi=10)
    ds = PackedDataset(items, max_seq_len=30)
    b = padded_collate([ds[0]], pad_to_multiple_of=8)  # 30 -> 32: two more padding tokens
    assert b["tokens"].shape == (1, 32) and int(b["seq_lens"].sum()) == 32
    assert b["input_pos"][0, 30:].tolist() == [0, 1]


def test_packed_loss_equals_per_sample_loss():
    from tinytune.models.llama3 import llama3_tiny

    torch.manual_seed(0)
    model = llama3_tiny().eval()
    items = make_items(9, hi=24, seed=1)
    ds = PackedDataset(items, max_seq_len=64)
    batch = padded_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = model(batch["tokens"], input_pos=batch["input_pos"], seq_lens=batch["seq_lens"])  # [b, s, v]
        ce = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(batch["labels"])
        checked = 0
        for r in range(len(ds)):
            pos = 0
            for j in ds.bins[r]:
                it = items[j]
                n = len(it["tokens"])
                alone = model(torch.tensor([it["tokens"]]))  # [1, n, v]
                ref = torch.nn.functional.cross_entropy(
                    alone[0].float(), torch.tensor(it["labels"]), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                torch.testing.assert_close(ce[r, pos : pos + n].sum(), ref, rtol=1e-4, atol=1e-4)
                pos += n
                checked += 1
    assert checked == 9


def test_group_by_length_sampler():
    lengths = np.random.default_rng(1).integers(1, 500, size=1000)
    s = GroupByLengthSampler(lengths, batch_size=8, seed=5, mega_batch_mult=10)
    idx = list(s)
    assert sorted(idx) == list(range(1000)) and len(s) == 1000
    assert list(GroupByLengthSampler(lengths, batch_size=8, seed=5, mega_batch_mult=10)) == idx  # deterministic
    s.set_epoch(1)
    assert list(s) != idx  # reshuffled per epoch

    def pad(order):
        return sum(
            max(lengths[order[i : i + 8]]) * 8 - lengths[order[i : i + 8]].sum() for i in range(0, len(order), 8)
        )

    rnd = np.random.default_rng(0).permutation(1000)
    assert pad(np.array(idx)) < 0.3 * pad(rnd)  # much less padding than random batches
    # Resume mid-epoch: same remaining indices.
    s.set_epoch(1)
    full = list(s)
    state = s.state_dict(samples_consumed=24)
    t = GroupByLengthSampler(lengths, batch_size=8, seed=5, mega_batch_mult=10)
    t.load_state_dict(state)
    assert list(t) == full[24:]
    # Two ranks split every global batch.
    r0 = list(GroupByLengthSampler(lengths, batch_size=4, seed=5, num_replicas=2, rank=0))
    r1 = list(GroupByLengthSampler(lengths, batch_size=4, seed=5, num_replicas=2, rank=1))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 500
    with pytest.raises(ValueError, match="seed"):
        GroupByLengthSampler(lengths, batch_size=8, seed=6).load_state_dict(state)
