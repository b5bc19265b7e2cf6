"""Packing: several samples per ``max_seq_len`` row, with per-document positions and lengths.

Bins are filled best-fit decreasing (``"ffd"``: longest samples first, each into the fullest
bin it still fits) or greedily in dataset order (``"greedy"``). A packed item holds
``tokens``/``labels`` of exactly ``max_seq_len`` (the rest is padding), ``input_pos`` that restarts
at 0 for every document, and ``seq_lens`` with one entry per document plus one for the padding tail,
so attention masks never cross sample borders. Each sample's last label is already -100, so no
label crosses a border either.
"""

from __future__ import annotations

import bisect

import numpy as np
from torch.utils.data import Dataset

from tinytune.datasets.encoding import IGNORE_INDEX


def pack_bins(lengths, max_seq_len: int, strategy: str = "ffd") -> list[list[int]]:
    """Groups sample indices into bins whose total length is at most ``max_seq_len``.

    Args:
        lengths: sample lengths.
        max_seq_len: bin capacity.
        strategy: ``"ffd"`` (best-fit decreasing) or ``"greedy"`` (in order, next bin when full).

    Raises:
        ValueError: when a sample is longer than ``max_seq_len`` or the strategy is unknown.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_seq_len:
        raise ValueError(
            f"a sample has {int(lengths.max())} tokens, more than max_seq_len={max_seq_len}; "
            "tokenize with the same max_seq_len"
        )
    bins: list[list[int]] = []
    if strategy == "greedy":
        used = max_seq_len + 1
        for i, n in enumerate(lengths.tolist()):
            if used + n > max_seq_len:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += n
        return bins
    if strategy != "ffd":
        raise ValueError(f"unknown packing strategy {strategy!r}; use 'ffd' or 'greedy'")
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
        else:
            cap, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if cap - n > 0:
            bisect.insort(free, (cap - n, b))
    for b in bins:  # keep dataset order inside a bin
        b.sort()
    return bins


class PackedDataset(Dataset):
    """Packs a tokenized dataset (items with ``tokens``/``labels``) into ``max_seq_len`` rows.

    Args:
        dataset: map-style dataset of SFT items; ``dataset.lengths`` is used when present.
        max_seq_len: row length.
        pad_id: token id for the padding tail.
        strategy: ``"ffd"`` or ``"greedy"`` (see :func:`pack_bins`).
    """

    def __init__(self, dataset, max_seq_len: int, pad_id: int = 0, strategy: str = "ffd"):
        self.dataset = dataset
        self.max_seq_len = int(max_seq_len)
        self.pad_id = int(pad_id)
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            lengths = [len(dataset[i]["tokens"]) for i in range(len(dataset))]
        self.sample_lengths = np.asarray(lengths, dtype=np.int64)
        self.bins = pack_bins(self.sample_lengths, self.max_seq_len, strategy)

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def lengths(self) -> np.ndarray:
        """Every packed row is ``max_seq_len`` long."""
        return np.full(len(self.bins), self.max_seq_len, dtype=np.int64)

    @property
    def fill_ratio(self) -> float:
        """Share of non-padding tokens over all packed rows."""
        return float(self.sample_lengths.sum()) / max(1, len(self.bins) * self.max_seq_len)

    def __getitem__(self, i: int) -> dict:
        tokens: list[int] = []
        labels: list[int] = []
        input_pos: list[int] = []
        seq_lens: list[int] = []
        for j in self.bins[i]:
            item = self.dataset[j]
            n = len(item["tokens"])
            tokens.extend(item["tokens"])
            lab = list(item["labels"])
            lab[-1] = IGNORE_INDEX  # never predict across a document border
            labels.extend(lab)
            input_pos.extend(range(n))
            seq_lens.append(n)
        pad = self.max_seq_len - len(tokens)
        if pad:
            tokens.extend([self.pad_id] * pad)
            labels.extend([IGNORE_INDEX] * pad)
            input_pos.extend(range(pad))
            seq_lens.append(pad)
        return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "seq_lens": seq_lens}
