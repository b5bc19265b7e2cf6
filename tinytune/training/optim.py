"""Optimizer builder: AdamW (PyTorch) or torchao's 8-bit AdamW."""

from __future__ import annotations

import logging
from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    lr: float = 2e-5,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **kwargs,
) -> torch.optim.Optimizer:
    """Builds the optimizer over the trainable ``params``.

    Args:
        params: parameters to optimise (only ``requires_grad`` ones are kept).
        name: ``adamw`` (``torch.optim.AdamW``), ``adamw8bit`` (``torchao.optim.AdamW8bit``: 8-bit
            block-quantised moments; works on CPU and CUDA, tensors under 4096 elements keep fp32
            state; the first step compiles the update, a few seconds) or ``sgd``.
        lr, weight_decay, betas, eps: the usual hyperparameters.
        **kwargs: passed to the optimizer class.

    Raises:
        ValueError: unknown name or no trainable parameters.
        ImportError: ``adamw8bit`` without torchao.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("optimizer: the model has no trainable parameters")
    name = str(name).lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kwargs)
    if name == "adamw8bit":
        logging.getLogger("torchao").setLevel(logging.ERROR)
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise ImportError("optimizer.name=adamw8bit needs torchao (pip install torchao)") from e
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"optimizer.name: unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")
