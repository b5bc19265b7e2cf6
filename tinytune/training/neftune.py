"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training.

The noise is ``U(-a, a)`` with ``a = alpha / sqrt(s * d)`` for an embedding output ``[b, s, d]``
(the scale HF ``transformers`` uses; ``s`` is the batch's sequence dimension, so for padding-free /
packed batches it is the packed row length). It is added only in training mode: evaluation,
validation and generation (``model.eval()``) see the clean embeddings.

Sharded models (the distributed recipes): FSDP gathers the embedding table, so the output is a
plain tensor as on one device. Under tensor parallelism the output may be a DTensor (sequence
parallel: ``Shard(1)``); the noise is then drawn for the whole (global) ``[b, s, d]`` from the
default generator, exactly as one device would draw it, and each rank adds its own slice. Every
rank seeds alike, so tensor-parallel ranks (same batch) draw the same noise; data-parallel ranks
draw for their own micro-batches, whose ``s`` is their own.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def neftune_hook(alpha: float):
    """A forward hook for an embedding module that adds NEFTune noise when the module is training."""
    if alpha <= 0:
        raise ValueError(f"neftune_noise_alpha: must be > 0 (got {alpha})")

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:  # output: [b, s, d]
        if not module.training:
            return output
        mag = alpha / math.sqrt(output.size(1) * output.size(2))
        if isinstance(output, DTensor):  # tensor parallel: the global [b, s, d] draws, sliced like the output
            local = output.to_local()
            noise = torch.zeros(output.shape, dtype=local.dtype, device=local.device).uniform_(-mag, mag)
            return output + distribute_tensor(noise, output.device_mesh, output.placements, src_data_rank=None)
        return output + torch.zeros_like(output).uniform_(-mag, mag)

    return hook


def activate_neftune(model: nn.Module, alpha: float):
    """Registers the NEFTune hook on ``model.tok_embeddings``; returns the hook handle (``.remove()``)."""
    return model.tok_embeddings.register_forward_hook(neftune_hook(float(alpha)))
