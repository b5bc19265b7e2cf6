"""Training-state checkpoints of the single-device recipes: open, resume, save.

A state dict is ``{"model" | "adapter": weights, "optimizer", "lr_scheduler", "data", "step", "accum"}``
(the checkpointer adds ``"rng"``); see :class:`tinytune.checkpoint.TrainingCheckpointer`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from tinytune.checkpoint import TrainingCheckpointer, set_rng_state
from tinytune.config import ConfigError
from tinytune.distributed.mesh import is_rank_zero


def open_checkpointer(keep_last: int, out_dir: str):
    """A :class:`TrainingCheckpointer` over ``out_dir/checkpoints`` keeping the newest ``keep_last``."""
    return TrainingCheckpointer(os.path.join(out_dir, "checkpoints"), keep_last=keep_last)


def check_same_accumulation(state: dict, path: str, accum: int) -> None:
    """Refuses to resume a checkpoint written with another ``gradient_accumulation_steps``
    (each step would see other samples than the interrupted run's). The batch size, seed and
    data-parallel size are checked by the batch stream.

    Raises:
        ConfigError: naming both values and what to do.
    """
    saved = state.get("accum")
    if saved is not None and int(saved) != int(accum):
        raise ConfigError(
            f"resume_from_checkpoint: {path} was written with gradient_accumulation_steps={saved}; this run has "
            f"{accum}. Resume with the same value (or start a new output_dir)."
        )


def resume_training_state(ckpt, resume_from: Any, *, model: nn.Module, weights_key: str, optimizer, lr_scheduler,
                          stream, accum: int = 1) -> int:
    """Restores a saved training state when ``resume_from`` (``auto``, a path or None) names one.

    Args:
        ckpt: the run's checkpointer (:func:`open_checkpointer`).
        resume_from: the ``resume_from_checkpoint`` config value.
        model: gets ``state[weights_key]``: ``"model"`` loads strictly, ``"adapter"`` (LoRA weights
            only) non-strictly.
        optimizer, lr_scheduler, stream: restored from ``optimizer``, ``lr_scheduler``, ``data``.
        accum: this run's ``gradient_accumulation_steps`` (must equal the checkpoint's).

    Returns:
        The step to continue from (0 when nothing is resumed). RNG states are restored too.
    """
    path = ckpt.resolve(resume_from)
    if not path:
        return 0
    state = ckpt.load(path)
    check_same_accumulation(state, path, accum)
    model.load_state_dict(state[weights_key], strict=weights_key == "model")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    step = int(state["step"])
    print(f"resumed from {path} at step {step}")
    return step


def save_training_state(ckpt, step: int, weights: dict[str, Any], *, optimizer, lr_scheduler, stream,
                        accum: int = 1) -> None:
    """Saves ``{**weights, "optimizer", "lr_scheduler", "data", "step", "accum"}`` as the checkpoint of ``step``.

    Args:
        weights: ``{"model": state_dict}`` or ``{"adapter": adapter_state_dict}``.
        accum: the run's ``gradient_accumulation_steps`` (checked on resume).
    """
    ckpt.save(step, {**weights, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "data": stream.state_dict(), "step": step, "accum": accum})


def resume_sharded_state(ckpt, resume_from: Any, *, model: nn.Module, optimizer, lr_scheduler, stream,
                         accum: int) -> int:
    """:func:`resume_training_state` for the distributed recipes' DCP checkpoints (collective).

    Args:
        ckpt: a :class:`tinytune.checkpoint.dcp.DistributedCheckpointer`.
        resume_from: the ``resume_from_checkpoint`` setting.
        model, optimizer: sharded, restored in place (DCP reshards across world sizes).
        lr_scheduler, stream: restored from the trainer state.
        accum: this run's ``gradient_accumulation_steps`` (must equal the checkpoint's).

    Returns:
        The step to continue from (0 when nothing is resumed).
    """
    path = ckpt.resolve(resume_from)
    if path is None:
        return 0
    state = ckpt.load(path, model, optimizer)
    check_same_accumulation(state, str(path), accum)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    stream.load_state_dict(state["data"])
    step = int(state["step"])
    if is_rank_zero():
        print(f"resumed from {path} at step {step}")
    return step


def save_sharded_state(ckpt, step: int, *, model: nn.Module, optimizer, lr_scheduler, stream, accum: int) -> None:
    """Saves a DCP checkpoint of ``step`` (collective): sharded weights and optimizer, and
    ``{"step", "accum", "lr_scheduler", "data"}`` (the same trainer state as the single-device one)."""
    ckpt.save(step, model, optimizer, {"step": step, "accum": accum, "lr_scheduler": lr_scheduler.state_dict(),
                                       "data": stream.state_dict()})
