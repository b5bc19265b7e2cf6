"""A small random SFT dataset (pre-shifted labels, masked prompt) for recipe tests."""

import torch


def random_sft(
    n: int = 48, vocab: int = 96, min_len: int = 6, max_len: int = 15, seed: int = 0, tokenizer=None
) -> list[dict]:
    """``n`` items ``{"tokens", "labels"}`` of varying length; the first 1-3 targets are masked (-100).

    ``tokenizer`` is accepted (recipes pass one) and unused: token ids are drawn from ``[1, vocab)``.
    """
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        seq = torch.randint(1, vocab, (length + 1,), generator=g).tolist()
        tokens, labels = seq[:-1], seq[1:]
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        labels = [-100] * prompt + labels[prompt:]
        items.append({"tokens": tokens, "labels": labels})
    return items
