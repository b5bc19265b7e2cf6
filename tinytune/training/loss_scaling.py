"""fp16 training: fp32 master weights, fp16 autocast, dynamic loss scaling (``torch.amp.GradScaler``).

What HF Trainer does with ``fp16=True``: the weights and the optimizer stay fp32, the forward runs
under ``torch.autocast(dtype=float16)``, each micro-batch loss is multiplied by the current scale
before ``backward()`` (so small fp16 gradients do not flush to zero), the gradients are unscaled once
per optimizer step (before clipping), and a step whose gradients hold an inf/NaN is skipped: the
scale is halved and the LR schedule does not advance. After ``growth_interval`` good steps the scale
doubles. The recipes call :func:`autocast_fp16` and :func:`scaled` around the micro-step and pass the
:class:`LossScaler` to :func:`tinytune.training.steps.optimizer_step`; without fp16 both are no-ops.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from tinytune.config import ConfigError
from tinytune.training.optim import is_offloaded

log = logging.getLogger(__name__)

FP16_NAMES = ("fp16", "float16", "half")


class LossScaler:
    """Dynamic loss scaling around a :class:`torch.amp.GradScaler` (injected, so tests drive a CPU one).

    Args:
        scaler: the grad scaler (``torch.amp.GradScaler("cuda")`` in the recipes).
        device_type: autocast device type (``"cuda"``; ``"cpu"`` in tests).
        autocast_dtype: compute dtype of the forward (None: no autocast, scaling only; tests use it
            to compare with an fp32 reference exactly).

    Attributes:
        skipped: optimizer steps skipped so far because a gradient overflowed (inf/NaN).
    """

    def __init__(
        self,
        scaler: torch.amp.GradScaler,
        device_type: str = "cuda",
        autocast_dtype: torch.dtype | None = torch.float16,
    ) -> None:
        self.scaler = scaler
        self.device_type = device_type
        self.autocast_dtype = autocast_dtype
        self.skipped = 0

    @property
    def scale(self) -> float:
        """The current loss scale."""
        return float(self.scaler.get_scale())

    def autocast(self):
        """The fp16 autocast context of the forward pass (weights stay fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the gradients by the scale (once per optimizer step, before clipping).

        Raises:
            ConfigError: ``optimizer`` is torchao's CPU-offload optimizer, whose host copies of the
                gradients the scaler cannot see consistently.
        """
        if is_offloaded(optimizer):
            raise ConfigError(
                "optimizer.name: adamw_offload / adamw8bit_offload (torchao CPUOffloadOptimizer) cannot run with "
                "dtype: fp16 (the loss scaler would unscale and check gradients it copies to the CPU asynchronously); "
                "use dtype: bf16, or another optimizer"
            )
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Steps the optimizer unless a gradient is inf/NaN, then updates the scale.

        Args:
            optimizer: its gradients already unscaled (:meth:`unscale_`).
            step: the step being taken (1-based), for the log line.

        Returns:
            True when the optimizer stepped; False when the step was skipped (scale backed off,
            counted in :attr:`skipped`, logged).
        """
        before = self.scale
        self.scaler.step(optimizer)
        self.scaler.update()
        after = self.scale
        if after >= before:  # kept or grown: no inf/NaN was found
            return True
        self.skipped += 1
        log.warning(
            "step %d: fp16 gradient overflow (inf/NaN); step skipped, loss scale %g -> %g, %d skipped so far",
            step,
            before,
            after,
            self.skipped,
        )
        return False

    def discard(self) -> None:
        """Ends a step whose gradients are dropped without an optimizer step (``nan_policy: skip_step``):
        the scale still learns from the overflow check :meth:`unscale_` recorded."""
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scale, its growth tracker and the skip count (plain values, for training checkpoints)."""
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state["skipped"])


def fp16_loss_scaler(dtype_name: str, device: torch.device) -> LossScaler | None:
    """The run's :class:`LossScaler` for ``dtype: fp16`` (CUDA), None for any other dtype.

    The device check is :func:`tinytune.training.setup.check_training_dtype`'s (called first by
    :func:`~tinytune.training.setup.setup_device`).
    """
    if str(dtype_name) not in FP16_NAMES:
        return None
    return LossScaler(torch.amp.GradScaler(device.type), device.type)


def autocast_fp16(scaler: LossScaler | None):
    """fp16 autocast for the forward pass when ``scaler`` is set; else a no-op context."""
    return scaler.autocast() if scaler is not None else contextlib.nullcontext()


def scaled(loss: torch.Tensor, scaler: LossScaler | None) -> torch.Tensor:
    """``loss`` times the current loss scale (``scaler`` None: ``loss`` itself); call ``.backward()`` on it."""
    return scaler.scaler.scale(loss) if scaler is not None else loss
