"""One optimizer step of SFT with gradient accumulation, clipping and scheduler advance;
the optimizer and LR schedule from the config."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tinytune.config import ConfigError
from tinytune.config.recipe_settings import NAN_POLICIES, OptimSettings
from tinytune.errors import NonFiniteError, last_good_checkpoint, run_context
from tinytune.training.data import to_device
from tinytune.training.loss_scaling import LossScaler, autocast_fp16, scaled
from tinytune.training.losses import count_label_tokens, sft_loss
from tinytune.training.lr_schedulers import build_lr_scheduler
from tinytune.training.optim import (
    DEFAULT_LR,
    DEFAULT_NO_DECAY,
    build_optimizer,
    param_groups,
    resync_offloaded_grads,
)
from tinytune.training.padding_free import drop_unlabeled_tail

log = logging.getLogger(__name__)


def sft_accumulate(
    model: nn.Module,
    micro_batches: Sequence[dict],
    device: torch.device,
    padding_free: bool = True,
    scaler: LossScaler | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward + backward over an accumulation window, normalised by its label-token count.

    Every micro-batch's summed loss is divided by the number of label tokens in the **whole
    window**, so the accumulated gradient equals that of one batch holding all micro-batches
    (``k x bs1`` == ``bs k``), however the tokens are spread over the micro-batches.

    With ``padding_free`` (default) each micro-batch first loses the positions after its rows' last
    label tokens and is flattened into one packed row
    (:func:`tinytune.training.padding_free.drop_unlabeled_tail`): no compute on padding, same loss.

    With a ``scaler`` (fp16) each forward runs under fp16 autocast and each micro-batch loss is
    scaled before its backward; :func:`optimizer_step` unscales the window's gradients once.

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
        with autocast_fp16(scaler):
            loss = sft_loss(model, to_device(mb, device), denom)
        scaled(loss, scaler).backward()
        total += loss.detach()
    return total, n


class NonFiniteGuard:
    """Stops the run (or skips the step) when a step's loss or gradient norm is NaN/Inf.

    Checked before the optimizer step, so neither the weights nor the optimizer state (Adam
    moments, step count) ever see a non-finite gradient.

    Args:
        policy: ``stop`` (raise :class:`~tinytune.errors.NonFiniteError`) or ``skip_step`` (drop
            the step's gradients, advance the LR schedule, count and log it).

    Attributes:
        skipped: steps skipped so far.
    """

    def __init__(self, policy: str = "stop") -> None:
        if policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy: {policy!r} is not one of {list(NAN_POLICIES)}")
        self.policy = policy
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float | None) -> bool:
        """True when the step may be applied; False when it is skipped.

        Args:
            step: the step being taken (1-based).
            loss: its loss.
            grad_norm: its total gradient norm (None: not computed).

        Raises:
            NonFiniteError: a non-finite value under ``nan_policy: stop``.
        """
        bad = [f"loss {loss}"] if not math.isfinite(loss) else []
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"gradient norm {grad_norm}")
        if not bad:
            return True
        what = " and ".join(bad)
        if self.policy == "stop":
            good = last_good_checkpoint(run_context.checkpoint_root)
            raise NonFiniteError(
                f"step {step}: non-finite {what}; stopped before the optimizer step (nan_policy: stop), so no "
                f"weights, checkpoint or export hold it (last checkpoint: {good or 'none'}). Usual causes: NaN/Inf "
                "in the base weights or inputs, a too high lr, fp16 overflow. nan_policy=skip_step skips such steps"
            )
        self.skipped += 1
        log.warning(
            "step %d: non-finite %s; step skipped (nan_policy: skip_step), %d skipped so far", step, what, self.skipped
        )
        return False


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler=None,
    clip_grad_norm: float | None = None,
    clip_fn=torch.nn.utils.clip_grad_norm_,
    *,
    guard: NonFiniteGuard | None = None,
    loss: torch.Tensor | float | None = None,
    step: int | None = None,
    scaler: LossScaler | None = None,
) -> float | None:
    """Clips gradients (if asked), steps the optimizer and scheduler, zeroes gradients.

    With a ``guard`` the loss and the gradient norm are checked first: a non-finite one stops the
    run or (``skip_step``) drops the gradients without touching the optimizer; the LR schedule
    still advances, so step numbers and LRs stay aligned.

    With a ``scaler`` (fp16, :class:`~tinytune.training.loss_scaling.LossScaler`) the gradients
    (accumulated from scaled losses over the whole window) are unscaled once, here, before
    clipping; an inf/NaN gradient is then an fp16 overflow, not an error: the scaler skips the
    optimizer step, backs the scale off and counts it, and the LR schedule does not advance (as in
    HF Trainer). The guard then checks the loss only.

    Args:
        clip_fn: ``(params, max_norm) -> total norm``; the distributed recipes pass the DTensor-aware
            :func:`tinytune.distributed.fsdp.clip_grad_norm_` (also used, with an infinite
            threshold that scales nothing, for the guard's norm when there is no clipping).
        guard: the run's :class:`NonFiniteGuard` (None: no check).
        loss: the step's loss (checked by the guard).
        step: the step being taken, for messages.
        scaler: the run's loss scaler (None: no loss scaling).

    Returns:
        The total gradient norm before clipping (None without clipping and without a guard).
    """
    norm = None
    params = [p for p in model.parameters() if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and the norm see the true gradients
    if clip_grad_norm:
        norm = float(clip_fn(params, float(clip_grad_norm)))
        resync_offloaded_grads(optimizer)  # adamw_offload: its host copies of the gradients get clipped too
    elif guard is not None:
        # an infinite threshold measures the (DTensor-aware) total norm and scales nothing
        norm = float(clip_fn(params, float("inf"))) if params else 0.0
    checked_norm = None if scaler is not None else norm  # with a scaler an overflow is the scaler's
    applied = guard is None or guard.check(int(step or 0), float(loss) if loss is not None else 0.0, checked_norm)
    advance = True
    if applied and scaler is not None:
        advance = scaler.step(optimizer, int(step or 0))  # False: overflow, step skipped
    elif applied:
        optimizer.step()
    elif scaler is not None:
        scaler.discard()
    if lr_scheduler is not None and advance:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """LR of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def build_optimizer_and_scheduler(
    optim: OptimSettings, params, total_steps: int, loraplus_lr_ratio: float | None = None
):
    """``(optimizer, lr_scheduler)`` from the ``optimizer`` and ``lr_scheduler`` settings (default: constant).

    Args:
        optim: the recipe's optimizer settings (the two nodes, already checked).
        params: the parameters to train; pass ``model.named_parameters()`` so that names matching
            ``optimizer.no_decay`` (default: biases, norms, embeddings) get no weight decay.
        total_steps: optimizer steps of the whole run (for warmup ratios and decay).
        loraplus_lr_ratio: LoRA+ learning-rate ratio of the B matrices (named parameters only).
    """
    opt_cfg = _plain(optim.optimizer, {})
    no_decay = [str(x) for x in opt_cfg.pop("no_decay", DEFAULT_NO_DECAY)]
    params = list(params)
    if params and isinstance(params[0], tuple):  # (name, parameter) pairs
        params = param_groups(
            params,
            weight_decay=opt_cfg.get("weight_decay"),
            no_decay=no_decay,
            lr=float(opt_cfg.get("lr", DEFAULT_LR)),
            loraplus_lr_ratio=loraplus_lr_ratio,
        )
    elif loraplus_lr_ratio is not None:
        raise ValueError("loraplus_lr_ratio needs named parameters (model.named_parameters())")
    optimizer = build_optimizer(params, **opt_cfg)
    lr_scheduler = build_lr_scheduler(optimizer, total_steps, _plain(optim.lr_scheduler, {"name": "constant"}))
    return optimizer, lr_scheduler


def _plain(node: Any, default: dict) -> dict:
    """A config node as a plain dict (the node's keys only; null = ``default``)."""
    if node is None:
        return dict(default)
    return dict(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else dict(node)
