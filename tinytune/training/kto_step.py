"""KTO step helpers (Ethayarajh et al., 2024): unpaired examples, KL reference point from
mismatched (prompt, completion) pairs of the same accumulation window."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

from tinytune.datasets.collate import padded_collate
from tinytune.datasets.unpaired import join_prompt_completion
from tinytune.training.data import to_device
from tinytune.training.losses import IGNORE_INDEX, sequence_logps
from tinytune.training.preference_losses import kto_kl, kto_losses


def mismatched_batches(micro_batches: Sequence[dict], pad_id: int = 0) -> list[dict]:
    """KTO's KL sequences: example ``i`` of the window gets the completion of example ``i - 1``
    (cyclically, in window order, as TRL shifts completions by one), grouped like ``micro_batches``.

    Raises:
        ValueError: a window of a single example (its "mismatched" pair would be itself).
    """
    prompts = [p for mb in micro_batches for p in mb["prompt_ids"]]
    completions = [c for mb in micro_batches for c in mb["completion_ids"]]
    if len(prompts) < 2:
        raise ValueError(
            "kto: the KL estimate needs at least 2 examples per optimizer step "
            "(batch_size x gradient_accumulation_steps >= 2)"
        )
    shifted = completions[-1:] + completions[:-1]
    out, start = [], 0
    for mb in micro_batches:
        n = len(mb["prompt_ids"])
        rows = [join_prompt_completion(p, c) for p, c in zip(prompts[start : start + n], shifted[start : start + n])]
        out.append(padded_collate(rows, pad_id=pad_id))
        start += n
    return out


@torch.no_grad()
def window_kl(
    model: nn.Module, reference, micro_batches: Sequence[dict], device: torch.device, pad_id: int = 0
) -> torch.Tensor:
    """KTO's reference point ``z0``: mean policy-minus-reference log-ratio of the window's mismatched
    pairs, clamped at 0 and detached (no gradient flows through it)."""
    pol, ref_lp = [], []
    for kb in mismatched_batches(micro_batches, pad_id):
        kb = to_device(kb, device)
        pol.append(sequence_logps(model, kb["tokens"], kb["labels"]))
        with reference() as ref:
            ref_lp.append(sequence_logps(ref, kb["tokens"], kb["labels"]))
    return kto_kl(torch.cat(pol), torch.cat(ref_lp))


def _example_terms(model, reference, mb, kl, beta, desirable_weight, undesirable_weight):
    """``(losses [n], chosen rewards [n_d], rejected rewards [n_u])`` of one batch."""
    with torch.no_grad(), reference() as ref:
        ref_lp = sequence_logps(ref, mb["tokens"], mb["labels"])  # [b]
    ratios = sequence_logps(model, mb["tokens"], mb["labels"]) - ref_lp  # [b]
    d = mb["desirable"]
    losses = kto_losses(
        ratios[d], ratios[~d], kl, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
    )
    return losses, beta * ratios[d].detach(), beta * ratios[~d].detach()


class _Totals:
    def __init__(self):
        self.loss = self.chosen = self.rejected = 0.0
        self.n_chosen = self.n_rejected = 0

    def add(self, loss_sum: float, rc: torch.Tensor, rr: torch.Tensor) -> None:
        self.loss += loss_sum
        self.chosen += float(rc.sum())
        self.rejected += float(rr.sum())
        self.n_chosen += rc.numel()
        self.n_rejected += rr.numel()

    def mean(self, kl: float) -> dict[str, float]:
        out = {"loss": self.loss / max(self.n_chosen + self.n_rejected, 1), "kl": kl}
        if self.n_chosen:
            out["rewards/chosen"] = self.chosen / self.n_chosen
        if self.n_rejected:
            out["rewards/rejected"] = self.rejected / self.n_rejected
        if self.n_chosen and self.n_rejected:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def kto_accumulate(
    model: nn.Module,
    reference,
    micro_batches: Sequence[dict],
    device: torch.device,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    pad_id: int = 0,
) -> dict[str, float]:
    """Forward + backward of the KTO loss over an accumulation window.

    The KL reference point comes from the whole window's mismatched pairs (one no-grad pass), and the
    per-example losses are averaged over every example of the window, so ``k x bs1 == bs k``.

    Args:
        model: the policy.
        reference: ``reference()`` context (:func:`tinytune.training.dpo.make_reference`).
        micro_batches: :func:`tinytune.datasets.kto_collate` batches.
        device: where the batches go.
        beta, desirable_weight, undesirable_weight: the KTO parameters.
        pad_id: padding id of the KL batches.

    Returns:
        ``loss``, ``kl``, ``rewards/chosen`` / ``rewards/rejected`` (means over desirable / undesirable
        examples, when present), ``rewards/margins`` and ``label_tokens``.
    """
    kl = window_kl(model, reference, micro_batches, device, pad_id)
    n = sum(mb["tokens"].shape[0] for mb in micro_batches)
    totals, tokens = _Totals(), 0
    for mb in micro_batches:
        mb = to_device(mb, device)
        losses, rc, rr = _example_terms(model, reference, mb, kl, beta, desirable_weight, undesirable_weight)
        (losses.sum() / n).backward()
        totals.add(float(losses.detach().sum()), rc, rr)
        tokens += int((mb["labels"] != IGNORE_INDEX).sum())
    out = totals.mean(float(kl))
    out["label_tokens"] = tokens
    return out


@torch.no_grad()
def kto_eval(
    model: nn.Module,
    reference,
    batches,
    device: torch.device,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    pad_id: int = 0,
    max_batches: int | None = None,
) -> dict[str, float]:
    """KTO loss and rewards over validation batches (eval mode), the set used as one window:
    one KL reference point from all its mismatched pairs, losses averaged over all its examples.

    Returns:
        ``loss``, ``kl``, ``rewards/*`` as in :func:`kto_accumulate`, and ``examples``.
    """
    used = list(itertools.islice(batches, max_batches))  # None: all
    was = model.training
    model.eval()
    totals = _Totals()
    try:
        kl = window_kl(model, reference, used, device, pad_id)
        for mb in used:
            losses, rc, rr = _example_terms(
                model, reference, to_device(mb, device), kl, beta, desirable_weight, undesirable_weight
            )
            totals.add(float(losses.sum()), rc, rr)
    finally:
        model.train(was)
    out = totals.mean(float(kl))
    out["examples"] = totals.n_chosen + totals.n_rejected
    return out
