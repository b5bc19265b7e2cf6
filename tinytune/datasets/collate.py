"""Batch collation: dynamic padding, packed batches, chosen+rejected pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinytune.datasets.encoding import IGNORE_INDEX


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def _pad_rows(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def padded_collate(
    batch: Sequence[dict],
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
    pad_to_multiple_of: int | None = 8,
    max_seq_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pads a list of dataset items into tensors.

    Unpacked items (``tokens``, ``labels``) are padded to the longest item rounded up to
    ``pad_to_multiple_of``, or to exactly ``max_seq_len`` when it is given. Packed items (which
    also carry ``input_pos`` and ``seq_lens``) are padded the same way; the padding is added to
    each row's tail document and ``seq_lens`` is zero-padded to the batch's largest document count.

    Returns:
        ``tokens [b, s]``, ``labels [b, s]`` (int64); packed: also ``input_pos [b, s]`` and
        ``seq_lens [b, max_docs]`` (each row sums to ``s``).

    Raises:
        ValueError: when an item is longer than ``max_seq_len``.
    """
    longest = max(len(item["tokens"]) for item in batch)
    if max_seq_len is not None:
        if longest > max_seq_len:
            raise ValueError(
                f"an item has {longest} tokens, more than max_seq_len={max_seq_len}; set the "
                "dataset's max_seq_len so samples are truncated when they are tokenized"
            )
        s = max_seq_len
    else:
        s = _round_up(longest, pad_to_multiple_of)
    tokens = _pad_rows([it["tokens"] for it in batch], s, pad_id)  # [b, s]
    labels = _pad_rows([it["labels"] for it in batch], s, ignore_index)  # [b, s]
    out = {"tokens": tokens, "labels": labels}
    if "input_pos" in batch[0]:
        input_pos = torch.zeros(len(batch), s, dtype=torch.long)  # [b, s]
        doc_lens = []
        for i, it in enumerate(batch):
            n = len(it["tokens"])
            input_pos[i, :n] = torch.as_tensor(it["input_pos"], dtype=torch.long)
            lens = [int(x) for x in it["seq_lens"] if int(x) > 0]
            extra = s - n
            if extra:  # the added padding is one more document
                lens.append(extra)
                input_pos[i, n:] = torch.arange(extra)
            doc_lens.append(lens)
        max_docs = max(len(d) for d in doc_lens)
        seq_lens = torch.zeros(len(batch), max_docs, dtype=torch.long)  # [b, max_docs]
        for i, d in enumerate(doc_lens):
            seq_lens[i, : len(d)] = torch.as_tensor(d, dtype=torch.long)
        out["input_pos"] = input_pos
        out["seq_lens"] = seq_lens
    return out


packed_collate = padded_collate


def preference_collate(
    batch: Sequence[dict], pad_id: int = 0, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = 8
) -> dict[str, torch.Tensor]:
    """Pads DPO pairs into one batch: rows ``[0, b)`` are chosen, rows ``[b, 2b)`` rejected.

    Returns:
        ``tokens [2b, s]`` and ``labels [2b, s]``.
    """
    items = [{"tokens": it["chosen_tokens"], "labels": it["chosen_labels"]} for it in batch]
    items += [{"tokens": it["rejected_tokens"], "labels": it["rejected_labels"]} for it in batch]
    return padded_collate(items, pad_id=pad_id, ignore_index=ignore_index, pad_to_multiple_of=pad_to_multiple_of)
