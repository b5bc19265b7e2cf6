"""Parameter initialisation for randomly initialised models."""

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Initialise a decoder: normal(0, ``std``) matrices, zero biases, unit norm scales.

    Parameters whose name contains ``lora_`` (adapters own their init) and parameters that are
    not plain tensors (e.g. quantized NF4 weights) are left alone; meta tensors are skipped.

    Args:
        model: the model (names follow docs/ARCHITECTURE.md).
        std: standard deviation of the normal init.

    Returns:
        ``model``, for chaining.
    """
    for name, p in model.named_parameters():
        if "lora_" in name or p.is_meta or type(p.data) is not torch.Tensor:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif p.dim() >= 2:
            p.normal_(0.0, std)
    return model
