"""Padding-free micro-batches: drop the positions no label depends on and flatten the rows.

In a causal model position ``j`` only influences the outputs at positions ``>= j`` of its own
document, so every position after a row's last label token (right padding, a cut-off prompt) changes
neither the loss nor any gradient. :func:`drop_unlabeled_tail` removes those positions and lays the
remaining rows end to end as one packed row (``seq_lens`` marks where each row's documents start),
so the linear layers and attention skip the padding instead of computing on it. The loss and the
gradients are those of the padded batch, up to floating-point summation order.
"""

from __future__ import annotations

import torch

from tinytune.datasets.encoding import IGNORE_INDEX

_KEYS = {"tokens", "labels", "input_pos", "seq_lens"}


def drop_unlabeled_tail(batch: dict, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int = 8) -> dict:
    """Flattens a (CPU) SFT micro-batch into one packed row without its unlabeled row tails.

    Args:
        batch: ``tokens [b, s]``, ``labels [b, s]`` (pre-shifted), optionally ``input_pos [b, s]`` and
            ``seq_lens [b, max_docs]`` (packed rows).
        ignore_index: label value of unsupervised positions.
        pad_to_multiple_of: the flat row is padded (one extra unlabeled document) to a multiple of this.

    Returns:
        ``{"tokens": [1, n], "labels": [1, n], "input_pos": [1, n], "seq_lens": [1, docs]}``, or the
        batch itself when nothing can be dropped, when it lives on an accelerator (reading the
        lengths would synchronise) or when it carries other keys.
    """
    labels = batch["labels"]
    if set(batch) - _KEYS or labels.device.type != "cpu" or labels.dim() != 2:
        return batch
    b, s = labels.shape
    positions = torch.arange(1, s + 1).expand(b, s)  # [b, s]
    keep = ((labels != ignore_index) * positions).amax(dim=1).tolist()  # [b] last label position + 1
    kept = sum(keep)
    padded = -(-kept // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of > 1 else kept
    if kept == 0 or padded >= b * s:
        return batch
    tokens, input_pos, seq_lens = batch["tokens"], batch.get("input_pos"), batch.get("seq_lens")
    toks, labs, pos, docs = [], [], [], []
    for r, n in enumerate(keep):
        if n == 0:
            continue
        toks.append(tokens[r, :n])
        labs.append(labels[r, :n])
        pos.append(input_pos[r, :n] if input_pos is not None else torch.arange(n))
        if seq_lens is None:
            docs.append(n)
            continue
        start = 0
        for length in seq_lens[r].tolist():  # the row's documents, the last one cut at n
            if length <= 0 or start >= n:
                continue
            docs.append(min(length, n - start))
            start += docs[-1]
    if padded > kept:  # tail document: never labelled, attends only to itself
        toks.append(torch.zeros(padded - kept, dtype=tokens.dtype))
        labs.append(torch.full((padded - kept,), ignore_index, dtype=labels.dtype))
        pos.append(torch.arange(padded - kept))
        docs.append(padded - kept)
    return {
        "tokens": torch.cat(toks)[None],  # [1, n]
        "labels": torch.cat(labs)[None],  # [1, n]
        "input_pos": torch.cat(pos)[None].to(torch.long),  # [1, n]
        "seq_lens": torch.tensor([docs], dtype=torch.long),  # [1, docs]
    }
