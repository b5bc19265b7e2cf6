"""DPO step helpers: policy/reference log-probs of preference batches and the accumulated loss."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from tinytune.modules.peft import disable_adapters
from tinytune.training.data import to_device
from tinytune.training.losses import dpo_loss, sequence_logps


def chosen_rejected_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs of the chosen rows ``[0, b)`` and rejected rows ``[b, 2b)`` of a batch."""
    logps = sequence_logps(model, batch["tokens"], batch["labels"])  # [2b]
    b = logps.shape[0] // 2
    return logps[:b], logps[b:]


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


def dpo_accumulate(model: nn.Module, reference, micro_batches: Sequence[dict], device: torch.device,
                   beta: float, label_smoothing: float = 0.0) -> dict[str, float]:
    """Forward + backward of the DPO loss over an accumulation window (mean over all pairs).

    Returns:
        Window metrics: ``loss``, ``rewards_chosen``, ``rewards_rejected``, ``rewards_margin``,
        ``rewards_accuracy`` and ``label_tokens``.
    """
    n_pairs = sum(mb["tokens"].shape[0] // 2 for mb in micro_batches)
    sums = {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "rewards_accuracy": 0.0}
    tokens = 0
    for mb in micro_batches:
        mb = to_device(mb, device)
        with torch.no_grad(), reference() as ref:
            ref_c, ref_r = chosen_rejected_logps(ref, mb)
        pol_c, pol_r = chosen_rejected_logps(model, mb)
        loss, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
        b = pol_c.shape[0]
        (loss * (b / n_pairs)).backward()  # mean over every pair of the window
        sums["loss"] += float(loss) * b
        sums["rewards_chosen"] += float(rc.sum())
        sums["rewards_rejected"] += float(rr.sum())
        sums["rewards_accuracy"] += float((rc > rr).float().sum())
        tokens += int((mb["labels"] != -100).sum())
    out = {k: v / n_pairs for k, v in sums.items()}
    out["rewards_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    out["label_tokens"] = tokens
    return out


@torch.no_grad()
def dpo_eval(model: nn.Module, reference, batches, device: torch.device, beta: float,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean DPO loss and reward accuracy over validation pairs (model in eval mode)."""
    was = model.training
    model.eval()
    total, acc, n = 0.0, 0.0, 0
    try:
        for i, mb in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            mb = to_device(mb, device)
            with reference() as ref:
                ref_c, ref_r = chosen_rejected_logps(ref, mb)
            pol_c, pol_r = chosen_rejected_logps(model, mb)
            loss, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta)
            b = pol_c.shape[0]
            total += float(loss) * b
            acc += float((rc > rr).float().sum())
            n += b
    finally:
        model.train(was)
    return {"loss": total / max(n, 1), "rewards_accuracy": acc / max(n, 1)}
