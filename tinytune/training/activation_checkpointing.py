"""Activation checkpointing: recompute each transformer layer's activations in backward."""

from __future__ import annotations

import types

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self, *args, **kwargs):
    inner = type(self).forward.__get__(self)  # the class's forward, bound to this layer
    if not self.training:
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Makes every ``model.layers[i]`` recompute its activations during backward.

    The layer's ``forward`` is replaced per instance by a checkpointed call, so module structure and
    parameter names (``layers.{i}...``) are unchanged and checkpoints load/save as usual.

    Returns:
        The number of layers wrapped.

    Raises:
        ValueError: the model has no ``layers`` ModuleList.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise ValueError("activation checkpointing: the model has no `layers` ModuleList")
    for layer in layers:
        if getattr(layer, "_tinytune_ac", False):
            continue
        # A bound method (not a closure): ``copy.deepcopy`` re-binds it to the copied layer.
        layer.forward = types.MethodType(_checkpointed_forward, layer)
        layer._tinytune_ac = True
    return len(layers)
