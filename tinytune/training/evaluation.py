"""Validation loss and perplexity over held-out batches."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from tinytune.training.data import to_device
from tinytune.training.losses import IGNORE_INDEX, sft_loss_sum
from tinytune.training.padding_free import drop_unlabeled_tail


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    max_batches: int | None = None,
    padding_free: bool = True,
) -> dict[str, float]:
    """Token-averaged cross-entropy over ``batches`` and its perplexity.

    The model is put in eval mode for the pass and returned to its previous mode afterwards.

    Args:
        model: decoder (``return_hidden=True`` / ``output_weight``).
        batches: iterable of collated batches.
        device: where to run.
        max_batches: stop after this many batches (None: all).
        padding_free: skip the positions after each row's last label, as in training
            (:func:`tinytune.training.padding_free.drop_unlabeled_tail`); same loss.

    Returns:
        ``{"loss": mean CE per label token, "perplexity": exp(loss), "tokens": label tokens}``.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(drop_unlabeled_tail(batch) if padding_free else batch, device)
            total += sft_loss_sum(model, batch).double().cpu()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = float(total) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
