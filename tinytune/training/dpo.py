"""Preference step helpers: policy/reference log-probs of preference batches and the accumulated loss."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Sequence

import torch
from torch import nn

from tinytune.modules.peft import disable_adapters, get_adapter_params, set_trainable_params
from tinytune.training.data import to_device
from tinytune.training.losses import IGNORE_INDEX, sequence_logps
from tinytune.training.preference_losses import PreferenceLoss

# TRL's metric names for the implicit rewards
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def chosen_rejected_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs of the chosen rows ``[0, b)`` and rejected rows ``[b, 2b)`` of a batch."""
    logps = sequence_logps(model, batch["tokens"], batch["labels"])  # [2b]
    b = logps.shape[0] // 2
    return logps[:b], logps[b:]


def chosen_rejected_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-token counts ``[b]`` of the chosen and rejected rows of a preference batch."""
    n = (batch["labels"] != IGNORE_INDEX).sum(-1)  # [2b]
    b = n.shape[0] // 2
    return n[:b], n[b:]


def make_reference(model: nn.Module, frozen_copy: nn.Module | None) -> Callable[[], contextlib.AbstractContextManager]:
    """Returns ``reference()``: a context yielding the frozen reference model.

    LoRA policies (``frozen_copy is None``) use themselves with adapters disabled, so the
    reference costs no memory; full fine-tuning passes a frozen copy made before training.
    """

    @contextlib.contextmanager
    def reference():
        if frozen_copy is not None:
            yield frozen_copy
        else:
            with disable_adapters(model):
                yield model

    return reference


def policy_and_reference(model: nn.Module, needs_reference: bool = True) -> tuple[bool, Callable]:
    """Makes ``model`` the trained policy of a preference recipe; returns ``(use_lora, reference)``.

    A LoRA policy (the model has adapters) trains only its adapters, and its reference is itself
    with adapters disabled; a full policy trains every parameter, and its reference is a frozen copy
    taken now (none when ``needs_reference`` is false: reference-free losses). ``reference`` is
    :func:`make_reference`'s context.
    """
    use_lora = bool(get_adapter_params(model))
    frozen = None
    if use_lora:
        set_trainable_params(model)
    else:
        model.requires_grad_(True)
        if needs_reference:
            frozen = copy.deepcopy(model).requires_grad_(False).eval()  # reference = frozen copy
    return use_lora, make_reference(model, frozen)


def _pair_terms(model: nn.Module, reference, mb: dict, loss_fn: PreferenceLoss):
    """``(pair losses [b], chosen rewards, rejected rewards, chosen summed log-probs [b])`` of one batch."""
    ref_c = ref_r = None
    if loss_fn.needs_reference:
        with torch.no_grad(), reference() as ref:
            ref_c, ref_r = chosen_rejected_logps(ref, mb)
    pol_c, pol_r = chosen_rejected_logps(model, mb)
    len_c, len_r = chosen_rejected_lengths(mb)
    losses, rc, rr = loss_fn.pair_losses(pol_c, pol_r, ref_c, ref_r, len_c, len_r)
    return losses, rc, rr, pol_c


class _Totals:
    """Sums of the logged quantities over pairs; ``mean()`` divides by the pair count."""

    def __init__(self):
        self.loss = self.nll = 0.0
        self.chosen = self.rejected = self.correct = 0.0

    def add(self, pair_loss_sum: float, nll: float, rc: torch.Tensor, rr: torch.Tensor) -> None:
        self.loss += pair_loss_sum
        self.nll += nll
        self.chosen += float(rc.sum())
        self.rejected += float(rr.sum())
        self.correct += float((rc > rr).float().sum())

    def mean(self, n_pairs: int, sft_weight: float) -> dict[str, float]:
        n = max(n_pairs, 1)
        out = {
            "loss": self.loss / n + self.nll,
            "rewards/chosen": self.chosen / n,
            "rewards/rejected": self.rejected / n,
            "rewards/accuracies": self.correct / n,
        }
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if sft_weight:
            out["nll_loss"] = self.nll / sft_weight
        return out


def dpo_accumulate(
    model: nn.Module, reference, micro_batches: Sequence[dict], device: torch.device, loss_fn: PreferenceLoss
) -> dict[str, float]:
    """Forward + backward of a preference loss over an accumulation window.

    The pair losses are averaged over every pair of the window; ORPO's NLL term is the token mean
    over every chosen label token of the window. So ``k`` micro-batches of one pair give the same
    gradient as one batch of ``k`` pairs, for every loss.

    Args:
        model: the policy.
        reference: ``reference()`` context (:func:`make_reference`); unused by reference-free losses.
        micro_batches: preference batches (``tokens``/``labels`` ``[2b, s]``, chosen rows first).
        device: where the batches go.
        loss_fn: the loss and its parameters.

    Returns:
        Window metrics: ``loss``, TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies``, ``nll_loss`` (orpo) and ``label_tokens``.
    """
    n_pairs = sum(mb["tokens"].shape[0] // 2 for mb in micro_batches)
    chosen_tokens = sum(int(chosen_rejected_lengths(mb)[0].sum()) for mb in micro_batches)
    totals, tokens = _Totals(), 0
    for mb in micro_batches:
        mb = to_device(mb, device)
        losses, rc, rr, pol_c = _pair_terms(model, reference, mb, loss_fn)
        loss = losses.sum() / n_pairs
        nll = torch.zeros((), device=losses.device)
        if loss_fn.sft_weight:
            nll = loss_fn.sft_weight * -pol_c.sum() / max(chosen_tokens, 1)
        (loss + nll).backward()
        totals.add(float(losses.detach().sum()), float(nll.detach()), rc, rr)
        tokens += int((mb["labels"] != IGNORE_INDEX).sum())
    out = totals.mean(n_pairs, loss_fn.sft_weight)
    out["label_tokens"] = tokens
    return out


@torch.no_grad()
def dpo_eval(
    model: nn.Module, reference, batches, device: torch.device, loss_fn: PreferenceLoss, max_batches: int | None = None
) -> dict[str, float]:
    """The preference loss and reward metrics over validation pairs (model in eval mode).

    Same reductions as :func:`dpo_accumulate` with the validation set as one window.

    Returns:
        ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``
        (+ ``nll_loss`` for orpo) and ``pairs``.
    """
    was = model.training
    model.eval()
    totals, n, nll_sum, chosen_tokens = _Totals(), 0, 0.0, 0
    try:
        for i, mb in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            mb = to_device(mb, device)
            losses, rc, rr, pol_c = _pair_terms(model, reference, mb, loss_fn)
            totals.add(float(losses.sum()), 0.0, rc, rr)
            nll_sum += float(-pol_c.sum())
            chosen_tokens += int(chosen_rejected_lengths(mb)[0].sum())
            n += losses.shape[0]
    finally:
        model.train(was)
    totals.nll = loss_fn.sft_weight * nll_sum / max(chosen_tokens, 1)
    out = totals.mean(n, loss_fn.sft_weight)
    out["pairs"] = n
    return out
