"""Loss helpers: token-normalised SFT loss through the fused linear cross-entropy, DPO loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels import linear_cross_entropy

IGNORE_INDEX = -100


def count_label_tokens(batches, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of supervised tokens (``labels != ignore_index``) over a list of batches (int64 scalar)."""
    return sum((b["labels"] != ignore_index).sum() for b in batches)


def model_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden states ``[b, s, d]`` for a (possibly packed) batch."""
    return model(batch["tokens"], input_pos=batch.get("input_pos"), seq_lens=batch.get("seq_lens"), return_hidden=True)


def sft_loss_sum(model: nn.Module, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens of ``batch`` (fp32 scalar).

    Labels are pre-shifted (``labels[i]`` is the target of position ``i``); the full ``[b, s, V]``
    logits are never materialised (:func:`tinytune.kernels.linear_cross_entropy`).
    """
    hidden = model_hidden(model, batch)  # [b, s, d]
    return linear_cross_entropy(hidden, model.output_weight, batch["labels"], reduction="sum", chunk_size=chunk_size)


def sft_loss_sum_vocab_parallel(model: nn.Module, batch: dict) -> torch.Tensor:
    """:func:`sft_loss_sum` for tensor parallelism with loss parallel: the logits stay sharded by
    vocabulary across TP ranks (call inside ``torch.distributed.tensor.parallel.loss_parallel()``)."""
    logits = model(batch["tokens"], input_pos=batch.get("input_pos"), seq_lens=batch.get("seq_lens"))  # [b, s, V/tp]
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def sft_loss(model: nn.Module, batch: dict, num_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy summed over ``batch``'s label tokens and divided by ``num_tokens``.

    For gradient accumulation pass the label-token count of the **whole accumulation window**:
    the micro-batch losses then add up to the window's token mean, so ``k`` micro-batches of size 1
    give the same gradient as one batch of size ``k``.

    Args:
        model: decoder with ``return_hidden=True`` and ``output_weight``.
        batch: ``{"tokens": [b, s], "labels": [b, s], ...}``.
        num_tokens: normaliser; default = this batch's label-token count (at least 1).
    """
    if num_tokens is None:
        num_tokens = (batch["labels"] != IGNORE_INDEX).sum()
    if not torch.is_tensor(num_tokens):
        num_tokens = torch.tensor(num_tokens)
    return sft_loss_sum(model, batch) / num_tokens.clamp(min=1).to(torch.float32)


def sequence_logps(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's label tokens: ``[b]`` fp32.

    Runs one forward over the batch and the fused cross-entropy row by row, so no ``[b, s, V]``
    logits are materialised.
    """
    hidden = model(tokens, return_hidden=True)  # [b, s, d]
    weight = model.output_weight
    rows = [-linear_cross_entropy(hidden[i], weight, labels[i], reduction="sum") for i in range(tokens.shape[0])]
    return torch.stack(rows)  # [b]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss (Rafailov et al., 2023), optionally with label smoothing (cDPO).

    ``z = beta * ((pi_c - pi_r) - (ref_c - ref_r))``;
    ``loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``, averaged over the batch.

    Args:
        policy_chosen_logps / policy_rejected_logps: ``[b]`` summed log-probs under the policy.
        reference_chosen_logps / reference_rejected_logps: ``[b]`` the same under the frozen reference.
        beta: inverse temperature of the implicit reward.
        label_smoothing: probability that a preference label is flipped (0 = plain DPO).

    Returns:
        ``(loss, chosen_rewards [b], rejected_rewards [b])``; rewards are ``beta * (pi - ref)``, detached.
    """
    pi = policy_chosen_logps - policy_rejected_logps  # [b]
    ref = reference_chosen_logps - reference_rejected_logps  # [b]
    z = beta * (pi - ref)
    losses = -F.logsigmoid(z) * (1.0 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
