"""Mixed precision for the single-device SFT recipes: bf16 compute over fp32 trainable weights.

``dtype: bf16`` alone is pure bf16: weights, gradients and AdamW state all in bf16, so an update
smaller than half a bf16 ulp of its weight (``|lr * step| < |w| * 2^-9``) rounds away.
``mixed_precision: true`` with ``dtype: bf16`` keeps every **trainable** parameter, its gradient
and its optimizer state in fp32 and runs the forward (and so the backward's GEMMs) under
``torch.autocast(device, bf16)``; **frozen** parameters (a LoRA base model, in the checkpoint's
precision or not) are stored in bf16, since nothing ever updates them. For LoRA this is the usual
cheap scheme: a bf16 base with fp32 adapters and fp32 optimizer state; for full fine-tuning it is
autocast over fp32 weights (HF Trainer's ``bf16=True``).

The fused kernels (:mod:`tinytune.kernels.fused_ops`, :mod:`tinytune.kernels.linear_ce`) cast their
inputs to the autocast dtype themselves, so every GEMM of a step runs in bf16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from tinytune.config import ConfigError
from tinytune.kernels.cpu_gemm import describe_cpu_gemm


@dataclass(frozen=True)
class Precision:
    """How a training recipe stores weights and computes.

    Attributes:
        compute_dtype: the dtype of the matmuls (the ``dtype`` setting).
        mixed: bf16 compute over fp32 trainable weights (``mixed_precision: true``).
        device_type: ``"cpu"``, ``"cuda"``, ... (the autocast device).
    """

    compute_dtype: torch.dtype
    mixed: bool = False
    device_type: str = "cpu"

    @classmethod
    def from_settings(cls, mixed: bool, dtype: torch.dtype, device: torch.device) -> "Precision":
        """Checks the combination of ``dtype`` and ``mixed_precision``.

        Raises:
            ConfigError: ``mixed_precision: true`` with a dtype other than bf16.
        """
        if mixed and dtype != torch.bfloat16:
            raise ConfigError(
                f"mixed_precision: true needs dtype: bf16 (got {str(dtype).replace('torch.', '')}); "
                "fp32 is already full precision"
            )
        return cls(compute_dtype=dtype, mixed=bool(mixed), device_type=device.type)

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype the checkpoint is loaded in: fp32 under mixed precision (the master weights),
        else the compute dtype."""
        return torch.float32 if self.mixed else self.compute_dtype

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """Mixed precision: the dtype frozen weights are stored in (the compute dtype), so a LoRA
        base can be read straight into it; None otherwise."""
        return self.compute_dtype if self.mixed else None

    def cast_frozen(self, model: nn.Module) -> int:
        """Mixed precision: frozen floating parameters to the compute dtype (trainable ones stay fp32).

        Call after the trainable set is final (``set_trainable_params``). Quantized (tensor-subclass)
        weights and buffers are left as they are. A no-op without mixed precision.

        Returns:
            The number of parameters cast.
        """
        if not self.mixed:
            return 0
        n = 0
        for p in model.parameters():
            if not p.requires_grad and type(p.data) is torch.Tensor and p.is_floating_point():
                if p.dtype != self.compute_dtype:
                    p.data = p.data.to(self.compute_dtype)
                    n += p.numel()
        return n

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast(device, bf16)`` under mixed precision, else a no-op context.

        Wrap every forward (training loss, validation, generation); never ``backward()``.
        """
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def describe(self, model: nn.Module) -> str:
        """One line: the dtypes of the trainable and frozen parameters and of the compute."""
        train = {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad}
        frozen = {str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad}
        mode = "mixed (autocast)" if self.mixed else "pure"
        compute = str(self.compute_dtype).replace("torch.", "")
        line = (
            f"precision: {mode}; compute {compute}, trainable weights + optimizer state "
            f"{'/'.join(sorted(train)) or '-'}, frozen weights {'/'.join(sorted(frozen)) or '-'}"
        )
        if self.device_type == "cpu" and self.compute_dtype == torch.float32:
            line += f"; fp32 CPU GEMMs: {describe_cpu_gemm()}"
        return line
