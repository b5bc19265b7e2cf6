"""Adapter utilities: find adapter parameters, freeze the base, disable or merge adapters."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tinytune.modules.linear import Linear
from tinytune.modules.peft.lora import LoRALinear

ADAPTER_KEYS = ("lora_a", "lora_b", "lora_magnitude")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yields ``(qualified_name, module)`` for every :class:`LoRALinear` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Returns the adapter parameters (``*.lora_a.weight``, ``*.lora_b.weight``, DoRA's
    ``*.lora_magnitude.weight``) by qualified name."""
    out = {}
    for name, m in lora_modules(model):
        for sub in ADAPTER_KEYS:
            if getattr(m, sub, None) is None:  # lora_magnitude: DoRA only
                continue
            for pname, p in getattr(m, sub).named_parameters():
                out[f"{name}.{sub}.{pname}"] = p
    return out


def get_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter weights, keyed like the model's ``state_dict``."""
    return {k: v.detach().clone() for k, v in get_adapter_params(model).items()}


def set_trainable_params(model: nn.Module, adapter_params: dict[str, nn.Parameter] | None = None) -> int:
    """Freezes every parameter except the adapters.

    Args:
        model: the model.
        adapter_params: parameters to keep trainable (default: :func:`get_adapter_params`).

    Returns:
        The number of trainable elements.

    Raises:
        ValueError: if the model has no adapter parameters (LoRA builder not used).
    """
    if adapter_params is None:
        adapter_params = get_adapter_params(model)
    if not adapter_params:
        raise ValueError(
            "The model has no LoRA adapter parameters: build it with a lora_* / qlora_* builder "
            "and a non-empty lora_attn_modules / apply_lora_to_mlp."
        )
    keep = {id(p) for p in adapter_params.values()}
    n = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        n += p.numel() if id(p) in keep else 0
    return n


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: every :class:`LoRALinear` acts as its frozen base layer inside the block.

    Used for DPO's reference model: the LoRA policy with adapters off is the base model.
    """
    mods = [m for _, m in lora_modules(model)]
    previous = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield model
    finally:
        for m, d in zip(mods, previous):
            m.disabled = d


@torch.no_grad()
def get_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA update folded into its base weight.

    Adapter keys are dropped, so the result has the base model's keys (an HF-exportable state dict).
    The model itself is not modified.
    """
    sd = model.state_dict()
    for name, m in lora_modules(model):
        prefix = f"{name}." if name else ""
        sd[prefix + "weight"] = m.merged_weight()
        for k in list(sd):
            if (
                k.startswith(prefix + "lora_a.")
                or k.startswith(prefix + "lora_b.")
                or k.startswith(prefix + "lora_magnitude.")
            ):
                del sd[k]
    return sd


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merges every LoRA layer into a plain ``nn.Linear`` in place.

    Each :class:`LoRALinear` is replaced by an ``nn.Linear`` whose weight is
    ``W + (alpha / rank) * B @ A`` (NF4 bases are dequantized first). Returns ``model`` (or the
    merged ``nn.Linear`` if ``model`` itself is a ``LoRALinear``).
    """

    def merged(m: LoRALinear) -> nn.Linear:
        w = m.merged_weight()
        lin = Linear(m.in_dim, m.out_dim, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        lin.requires_grad_(False)
        return lin

    if isinstance(model, LoRALinear):
        return merged(model)
    for name, m in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, merged(m))
    return model
