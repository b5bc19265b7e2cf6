"""Early stopping on the validation loss, keeping a copy of the best weights."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


class EarlyStopping:
    """Tracks validation losses; says when to stop and keeps the best step's weights.

    A validation loss improves when it is below ``best - min_delta``. After ``patience``
    validations in a row without improvement, :meth:`update` returns True. With ``save_best`` the
    weights of the best validation are copied (to the CPU) so the run can export them
    (:meth:`restore_best`). The state is not part of training checkpoints: a resumed run starts
    tracking afresh.

    Args:
        patience: validations without improvement before stopping (None: never stop early).
        min_delta: smallest decrease that counts as an improvement.
        save_best: keep the best weights.
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0, save_best: bool = False):
        if patience is not None and patience < 1:
            raise ValueError(f"early_stopping.patience: must be >= 1 (got {patience})")
        if min_delta < 0:
            raise ValueError(f"early_stopping.min_delta: must be >= 0 (got {min_delta})")
        self.patience, self.min_delta, self.save_best = patience, float(min_delta), save_best
        self.best, self.best_step, self.bad = math.inf, None, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        """Whether anything is tracked (patience or save_best set)."""
        return self.patience is not None or self.save_best

    def update(self, val_loss: float, step: int, weights: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Records one validation; returns True when the run should stop.

        Args:
            val_loss: the validation loss.
            step: the optimizer step it was measured at.
            weights: returns the weights to keep if this is the best step (called only then).
        """
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = float(val_loss), step, 0
            if self.save_best:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()}
            return False
        self.bad += 1
        return self.patience is not None and self.bad >= self.patience

    def restore_best(self, model: nn.Module, load: Callable[[nn.Module, dict], object] | None = None) -> None:
        """Loads the kept best weights into ``model`` (no-op without ``save_best`` or a validation).

        Args:
            model: the model to restore.
            load: ``load(model, best_state)`` (default: ``model.load_state_dict(best_state, strict=False)``;
                the distributed recipes keep each rank's shards and pass
                :func:`tinytune.distributed.fsdp.load_local_shards`).
        """
        if self.best_state is None:
            return
        if load is None:
            model.load_state_dict(self.best_state, strict=False)
        else:
            load(model, self.best_state)

    def summary(self) -> dict:
        """``best_step`` / ``best_val_loss`` for the run summary."""
        return {"best_step": self.best_step, "best_val_loss": self.best}
