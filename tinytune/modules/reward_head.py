"""A scalar reward head on a decoder: the score of a sequence is a linear map of the final hidden
state at its last non-padding token (the rule HF ``...ForSequenceClassification`` uses)."""

from __future__ import annotations

import torch
from torch import nn


def last_non_pad_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index of the rightmost token that is not ``pad_id`` in each row: ``[b]`` int64 (0 if all pad).

    Same rule as HF's sequence-classification heads, so scores match transformers' for left or right
    padding.
    """
    positions = torch.arange(tokens.shape[-1], device=tokens.device)  # [s]
    return (positions * (tokens != pad_id)).argmax(-1)


class RewardModel(nn.Module):
    """``decoder`` (a ``TransformerDecoder``) plus ``score``: ``Linear(dim, 1, bias=False)``.

    Args:
        decoder: the language model; its final hidden states (``return_hidden=True``) are scored.
        dim: hidden size.
        pad_id: padding token id (the score is read at the last token that is not ``pad_id``).
    """

    def __init__(self, decoder: nn.Module, dim: int, pad_id: int):
        super().__init__()
        self.decoder = decoder
        self.score = nn.Linear(dim, 1, bias=False)
        self.pad_id = int(pad_id)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scores ``[b]`` (fp32) of the rows of ``tokens [b, s]``."""
        hidden = self.decoder(tokens, return_hidden=True)  # [b, s, d]
        last = last_non_pad_index(tokens, self.pad_id)  # [b]
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]  # [b, d]
        return self.score(pooled).squeeze(-1).float()  # [b]
