"""Early stopping on the validation loss, keeping a copy of the best weights."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from tinytune.errors import ResumeError


class EarlyStopping:
    """Tracks validation losses; says when to stop and keeps the best step's weights.

    A validation loss improves when it is below ``best - min_delta``. After ``patience``
    validations in a row without improvement, :meth:`update` returns True. With ``save_best`` the
    weights of the best validation are copied (to the CPU) so the run can export them
    (:meth:`restore_best`). The state (best loss and step, the count of validations without
    improvement, the kept weights) goes into training checkpoints (:meth:`state_dict`), so a resumed
    run stops at the step and exports the best step an uninterrupted one would; resuming with other
    early-stopping settings is refused.

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

    def settings(self) -> dict:
        """The settings the tracked state depends on (``patience``, ``min_delta``, ``save_best``)."""
        return {"patience": self.patience, "min_delta": self.min_delta, "save_best": self.save_best}

    def state_dict(self, weights: bool = True) -> dict:
        """Settings, best loss and step, validations without improvement, kept weights (training checkpoints).

        Args:
            weights: include the kept weights (``best_state``); without them the dict is JSON-able.
        """
        state = {"settings": self.settings(), "best": self.best, "best_step": self.best_step, "bad": self.bad}
        return {**state, "best_state": self.best_state} if weights else state

    def tracking_only(self) -> "TrackingOnly":
        """This tracker's checkpoint view without the kept weights (the distributed recipes' JSON trainer state;
        see :meth:`restore_kept_weights`)."""
        return TrackingOnly(self)

    def restore_kept_weights(self, step: int, weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        """After resuming from a checkpoint without the kept weights (:meth:`tracking_only`): keeps the
        resumed weights when the best step is the resumed one; otherwise the best step's weights are lost.

        Args:
            step: the step resumed from.
            weights: returns the current weights (e.g. this rank's shards).

        Raises:
            ResumeError: ``save_best`` and the best step lies before the resumed one.
        """
        if not self.save_best or self.best_step is None or self.best_state is not None:
            return
        if self.best_step == step:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()}
            return
        raise ResumeError(
            f"resume_from_checkpoint: save_best: the best validation step ({self.best_step}) lies before the "
            f"resumed step ({step}) and the distributed recipes' checkpoints do not hold its weights; resume "
            f"from the checkpoint of step {self.best_step} if it exists, or start a new output_dir"
        )

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`.

        Raises:
            ResumeError: the state was tracked with other ``early_stopping`` / ``save_best`` settings
                (its best step and patience count would not be this run's).
        """
        saved, now = state["settings"], self.settings()
        if saved != now:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k])
            raise ResumeError(
                f"resume_from_checkpoint: the checkpoint was written with other early stopping settings ({diff}; "
                "early_stopping.patience / early_stopping.min_delta / save_best). Resume with the same values, "
                "or start a new output_dir"
            )
        self.best, self.best_step, self.bad = float(state["best"]), state["best_step"], int(state["bad"])
        self.best_state = state.get("best_state")  # absent: written by tracking_only()


class TrackingOnly:
    """An :class:`EarlyStopping`'s state without its kept weights (``state_dict`` is JSON-able)."""

    def __init__(self, stopper: EarlyStopping) -> None:
        self.stopper = stopper

    @property
    def active(self) -> bool:
        return self.stopper.active

    def state_dict(self) -> dict:
        return self.stopper.state_dict(weights=False)

    def load_state_dict(self, state: dict) -> None:
        self.stopper.load_state_dict(state)
