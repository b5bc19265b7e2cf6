"""Validation loss over a dataset split across data-parallel ranks."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import Dataset

from tinytune.datasets.encoding import IGNORE_INDEX
from tinytune.distributed.mesh import all_reduce_sum

__all__ = ["evaluate_loss_distributed"]


@torch.no_grad()
def evaluate_loss_distributed(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], dict],
    batch_size: int,
    dp_mesh: DeviceMesh,
    device: torch.device,
    loss_sum_fn: Callable[[nn.Module, dict], torch.Tensor],
    max_batches: int | None = None,
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Token-averaged cross-entropy over ``dataset``, each dp rank taking every dp-th sample.

    Every rank runs the same number of forwards (sharded models gather parameters
    collectively): a rank that has run out of samples runs a fully masked batch. Loss sums and
    label-token counts are summed over ranks, so the result equals the single-process loss over
    the whole dataset (with ``max_batches``: over the first ``max_batches`` batches of each rank).

    Args:
        model: the sharded model.
        dataset: validation samples.
        collate_fn: list of samples -> batch dict.
        batch_size: samples per rank per forward.
        dp_mesh: the flattened data-parallel mesh.
        device: this rank's device.
        loss_sum_fn: ``(model, batch) -> summed loss`` (plain tensor, or DTensor with loss parallel).
        max_batches: cap on forwards per rank.
        loss_context: entered around each loss (e.g. ``loss_parallel``).

    Returns:
        ``{"loss", "perplexity", "tokens"}``.
    """
    rank, size = dp_mesh.get_local_rank(), dp_mesh.size()
    mine = list(range(rank, len(dataset), size))
    n_batches = math.ceil(math.ceil(len(dataset) / size) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for i in range(n_batches):
            chunk = mine[i * batch_size : (i + 1) * batch_size]
            batch = collate_fn([dataset[j] for j in (chunk or [0])])
            batch = {k: v.to(device) for k, v in batch.items()}
            if not chunk:  # nothing left here: take part in the collectives, count nothing
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            with loss_context():
                loss = loss_sum_fn(model, batch)
            loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
            total += loss.double()
            tokens += (batch["labels"] != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    total = all_reduce_sum(total, dp_mesh)
    tokens = all_reduce_sum(tokens, dp_mesh)
    loss = float(total) / max(int(tokens), 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}
