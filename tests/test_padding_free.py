"""Padding-free micro-batches: the flat row drops exactly the positions no label depends on, and the
loss and gradients equal those of the padded batch (fp64 tiny model)."""

import pytest
import torch

from tinytune.models.qwen2 import qwen2_tiny
from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.padding_free import drop_unlabeled_tail
from tinytune.training.steps import sft_accumulate

IGN = -100


def _unpacked(lengths, s, vocab=500, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (len(lengths), s), generator=g)
    labels = torch.full((len(lengths), s), IGN)
    for r, n in enumerate(lengths):
        tokens[r, n:] = 0  # right padding
        labels[r, prompt : n - 1] = tokens[r, prompt + 1 : n]
    return {"tokens": tokens, "labels": labels}


def test_unpacked_rows_become_one_flat_row():
    batch = _unpacked([10, 7, 16], 16)
    out = drop_unlabeled_tail(batch)
    keep = [9, 6, 15]  # last label position + 1 (the final token of a sample carries no label)
    assert out["seq_lens"].tolist() == [keep + [2]]  # + tail document padding 30 -> 32
    assert out["tokens"].shape == out["labels"].shape == out["input_pos"].shape == (1, 32)
    flat_pos = torch.cat([torch.arange(n) for n in keep + [2]])
    assert torch.equal(out["input_pos"][0], flat_pos)
    start = 0
    for r, n in enumerate(keep):
        assert torch.equal(out["tokens"][0, start : start + n], batch["tokens"][r, :n])
        assert torch.equal(out["labels"][0, start : start + n], batch["labels"][r, :n])
        start += n
    assert (out["labels"][0, start:] == IGN).all()
    assert int((out["labels"] != IGN).sum()) == int((batch["labels"] != IGN).sum())


def test_packed_rows_keep_their_documents_and_cut_the_tail():
    batch = _unpacked([16, 16], 16)
    batch["seq_lens"] = torch.tensor([[5, 6, 5], [10, 6, 0]])
    batch["input_pos"] = torch.cat(
        [torch.cat([torch.arange(n) for n in (5, 6, 5)])[None], torch.cat([torch.arange(n) for n in (10, 6)])[None]]
    )
    batch["labels"][0, 12:] = IGN  # row 0: last label at 11 -> keep 12 (docs 5, 6, 1)
    batch["labels"][1, 9:] = IGN  # row 1: last label at 8 -> keep 9 (doc 9 of 10; the 6 dropped)
    out = drop_unlabeled_tail(batch, pad_to_multiple_of=1)
    assert out["seq_lens"].tolist() == [[5, 6, 1, 9]]
    assert torch.equal(out["input_pos"][0], torch.cat([batch["input_pos"][0, :12], batch["input_pos"][1, :9]]))


def test_nothing_to_drop_or_other_keys_return_the_batch_itself():
    full = _unpacked([16, 16], 16)
    full["labels"][:, -1] = 7  # labelled to the end
    assert drop_unlabeled_tail(full) is full
    extra = dict(_unpacked([8, 16], 16), attention_mask=torch.ones(2, 16))
    assert drop_unlabeled_tail(extra) is extra
    empty = _unpacked([16], 16)
    empty["labels"][:] = IGN
    assert drop_unlabeled_tail(empty) is empty


def test_rows_without_labels_are_dropped():
    batch = _unpacked([12, 12, 9], 16)
    batch["labels"][1] = IGN
    out = drop_unlabeled_tail(batch, pad_to_multiple_of=1)
    assert out["seq_lens"].tolist() == [[11, 8]]


@pytest.mark.parametrize("builder", [smollm2_tiny, qwen2_tiny])
@pytest.mark.parametrize("packed", [False, True])
def test_loss_and_gradients_equal_the_padded_batch(builder, packed):
    torch.manual_seed(0)
    model = builder().double()
    batches = [_unpacked([20, 11, 32], 32, vocab=250, seed=1), _unpacked([5, 27], 32, vocab=250, seed=2)]
    if packed:  # two documents in the first row, padding as a third
        b = batches[0]
        b["seq_lens"] = torch.tensor([[12, 8, 12], [11, 21, 0], [32, 0, 0]])
        b["input_pos"] = torch.stack([torch.cat([torch.arange(n) for n in row if n]) for row in b["seq_lens"].tolist()])
        b["labels"][0, 11] = IGN  # the last token of document 1 has no target
    results = []
    for padding_free in (False, True):
        model.zero_grad()
        loss, n = sft_accumulate(model, batches, torch.device("cpu"), padding_free=padding_free)
        results.append((loss, n, [p.grad.clone() for p in model.parameters()]))
    (l0, n0, g0), (l1, n1, g1) = results
    assert n0 == n1
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
