"""One optimizer step of SFT with gradient accumulation, clipping and scheduler advance;
the optimizer and LR schedule from the config."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tinytune.config.recipe_settings import OptimSettings
from tinytune.training.data import to_device
from tinytune.training.losses import count_label_tokens, sft_loss
from tinytune.training.lr_schedulers import build_lr_scheduler
from tinytune.training.optim import build_optimizer
from tinytune.training.padding_free import drop_unlabeled_tail


def sft_accumulate(model: nn.Module, micro_batches: Sequence[dict], device: torch.device,
                   padding_free: bool = True) -> tuple[torch.Tensor, int]:
    """Forward + backward over an accumulation window, normalised by its label-token count.

    Every micro-batch's summed loss is divided by the number of label tokens in the **whole
    window**, so the accumulated gradient equals that of one batch holding all micro-batches
    (``k x bs1`` == ``bs k``), however the tokens are spread over the micro-batches.

    With ``padding_free`` (default) each micro-batch first loses the positions after its rows' last
    label tokens and is flattened into one packed row
    (:func:`tinytune.training.padding_free.drop_unlabeled_tail`): no compute on padding, same loss.

    Returns:
        ``(loss, label_tokens)``: the window's mean loss per label token (detached) and the count.
    """
    num_tokens = count_label_tokens(micro_batches)
    n = int(num_tokens)
    total = torch.zeros((), dtype=torch.float32, device=device)
    denom = torch.as_tensor(num_tokens, device=device)
    for mb in micro_batches:
        if padding_free:
            mb = drop_unlabeled_tail(mb)
        loss = sft_loss(model, to_device(mb, device), denom)
        loss.backward()
        total += loss.detach()
    return total, n


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler=None,
                   clip_grad_norm: float | None = None, clip_fn=torch.nn.utils.clip_grad_norm_) -> float | None:
    """Clips gradients (if asked), steps the optimizer and scheduler, zeroes gradients.

    Args:
        clip_fn: ``(params, max_norm) -> total norm``; the distributed recipes pass the DTensor-aware
            :func:`tinytune.distributed.fsdp.clip_grad_norm_`.

    Returns:
        The total gradient norm before clipping (None without clipping).
    """
    norm = None
    if clip_grad_norm:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(clip_fn(params, float(clip_grad_norm)))
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """LR of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def build_optimizer_and_scheduler(optim: OptimSettings, params, total_steps: int):
    """``(optimizer, lr_scheduler)`` from the ``optimizer`` and ``lr_scheduler`` settings (default: constant).

    Args:
        optim: the recipe's optimizer settings (the two nodes, already checked).
        params: the parameters to train.
        total_steps: optimizer steps of the whole run (for warmup ratios and decay).
    """
    optimizer = build_optimizer(params, **_plain(optim.optimizer, {}))
    lr_scheduler = build_lr_scheduler(optimizer, total_steps, _plain(optim.lr_scheduler, {"name": "constant"}))
    return optimizer, lr_scheduler


def _plain(node: Any, default: dict) -> dict:
    """A config node as a plain dict (the node's keys only; null = ``default``)."""
    if node is None:
        return dict(default)
    return dict(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else dict(node)
