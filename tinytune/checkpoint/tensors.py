"""Tensor helpers for writing checkpoints."""

from __future__ import annotations

import torch
from torch import nn


def to_plain_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A plain, contiguous, storage-owning CPU tensor (dequantizes NF4 / subclass tensors)."""
    if hasattr(t, "full_tensor"):  # DTensor (FSDP2): gather the full parameter
        t = t.full_tensor()
    if type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        if hasattr(t, "get_original_weight"):  # torchao NF4Tensor
            t = t.get_original_weight()
        else:
            t = t.to(dtype or torch.float32)
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().clone()
