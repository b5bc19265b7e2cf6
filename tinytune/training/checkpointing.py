"""Training-state checkpoints of the single-device recipes: open, resume, save.

A state dict is ``{"model" | "adapter": weights, "optimizer", "lr_scheduler", "data", "step"}``
(the checkpointer adds ``"rng"``); see :class:`tinytune.checkpoint.TrainingCheckpointer`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn


def open_checkpointer(cfg: Any, out_dir: str):
    """A :class:`TrainingCheckpointer` over ``out_dir/checkpoints`` keeping ``keep_last_checkpoints`` (2)."""
    from tinytune.checkpoint import TrainingCheckpointer  # noqa: PLC0415
    from tinytune.training.setup import cfg_get  # noqa: PLC0415

    keep_last = cfg_get(cfg, "keep_last_checkpoints", 2)
    return TrainingCheckpointer(os.path.join(out_dir, "checkpoints"), keep_last=keep_last)


def resume_training_state(ckpt, resume_from: Any, *, model: nn.Module, weights_key: str, optimizer, lr_scheduler,
                          stream) -> int:
    """Restores a saved training state when ``resume_from`` (``auto``, a path or None) names one.

    Args:
        ckpt: the run's checkpointer (:func:`open_checkpointer`).
        resume_from: the ``resume_from_checkpoint`` config value.
        model: gets ``state[weights_key]``: ``"model"`` loads strictly, ``"adapter"`` (LoRA weights
            only) non-strictly.
        optimizer, lr_scheduler, stream: restored from ``optimizer``, ``lr_scheduler``, ``data``.

    Returns:
        The step to continue from (0 when nothing is resumed). RNG states are restored too.
    """
    from tinytune.checkpoint import set_rng_state  # noqa: PLC0415

    path = ckpt.resolve(resume_from)
    if not path:
        return 0
    state = ckpt.load(path)
    model.load_state_dict(state[weights_key], strict=weights_key == "model")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    step = int(state["step"])
    print(f"resumed from {path} at step {step}")
    return step


def save_training_state(ckpt, step: int, weights: dict[str, Any], *, optimizer, lr_scheduler, stream) -> None:
    """Saves ``{**weights, "optimizer", "lr_scheduler", "data", "step"}`` as the checkpoint of ``step``.

    Args:
        weights: ``{"model": state_dict}`` or ``{"adapter": adapter_state_dict}``.
    """
    ckpt.save(step, {**weights, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "data": stream.state_dict(), "step": step})
