"""Reward-model step helpers: Bradley-Terry loss on chosen/rejected scores, accumulated; validation."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

from tinytune.training.data import to_device
from tinytune.training.preference_losses import bradley_terry_losses


def chosen_rejected_scores(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen rows ``[0, b)`` and rejected rows ``[b, 2b)`` of a preference batch."""
    scores = model(batch["tokens"])  # [2b]
    b = scores.shape[0] // 2
    return scores[:b], scores[b:]


def _metrics(loss_sum: float, correct: float, chosen: float, rejected: float, n: int) -> dict[str, float]:
    n = max(n, 1)
    return {
        "loss": loss_sum / n,
        "accuracy": correct / n,
        "rewards/chosen": chosen / n,
        "rewards/rejected": rejected / n,
        "rewards/margins": (chosen - rejected) / n,
    }


def reward_accumulate(model: nn.Module, micro_batches: Sequence[dict], device: torch.device) -> dict[str, float]:
    """Forward + backward of the Bradley-Terry loss, averaged over every pair of the window
    (``k x bs1 == bs k``).

    Returns:
        ``loss``, ``accuracy`` (chosen scored above rejected), ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/margins`` (mean scores) and ``pairs``.
    """
    n = sum(mb["tokens"].shape[0] // 2 for mb in micro_batches)
    loss_sum = correct = chosen = rejected = 0.0
    for mb in micro_batches:
        mb = to_device(mb, device)
        c, r = chosen_rejected_scores(model, mb)
        losses = bradley_terry_losses(c, r)
        (losses.sum() / n).backward()
        loss_sum += float(losses.detach().sum())
        correct += float((c > r).float().sum())
        chosen, rejected = chosen + float(c.detach().sum()), rejected + float(r.detach().sum())
    out = _metrics(loss_sum, correct, chosen, rejected, n)
    out["pairs"] = n
    return out


@torch.no_grad()
def reward_eval(model: nn.Module, batches, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Bradley-Terry loss and accuracy over validation pairs (eval mode); keys as :func:`reward_accumulate`."""
    was = model.training
    model.eval()
    n = 0
    loss_sum = correct = chosen = rejected = 0.0
    try:
        for mb in itertools.islice(batches, max_batches):  # None: all
            c, r = chosen_rejected_scores(model, to_device(mb, device))
            loss_sum += float(bradley_terry_losses(c, r).sum())
            correct += float((c > r).float().sum())
            chosen, rejected = chosen + float(c.sum()), rejected + float(r.sum())
            n += c.shape[0]
    finally:
        model.train(was)
    out = _metrics(loss_sum, correct, chosen, rejected, n)
    out["pairs"] = n
    return out
