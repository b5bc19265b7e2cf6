"""Training-state checkpoints of the single-device recipes: open, resume, save.

A state dict is ``{"model" | "adapter": weights, "optimizer", "lr_scheduler", "data", "step"}``
(the checkpointer adds ``"rng"``); see :class:`tinytune.checkpoint.TrainingCheckpointer`. The run
fingerprint (:func:`tinytune.training.resume_check.config_fingerprint`) is stored with every
checkpoint and compared on resume.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from tinytune.errors import ResumeError, run_context


def open_checkpointer(cfg: Any, out_dir: str):
    """A :class:`TrainingCheckpointer` over ``out_dir/checkpoints`` keeping ``keep_last_checkpoints`` (2).

    Unfinished checkpoint writes left by a crash (``.tmp-step_*``) are removed.
    """
    from tinytune.checkpoint import TrainingCheckpointer  # noqa: PLC0415
    from tinytune.training.setup import cfg_get  # noqa: PLC0415

    keep_last = cfg_get(cfg, "keep_last_checkpoints", 2)
    ckpt = TrainingCheckpointer(os.path.join(out_dir, "checkpoints"), keep_last=keep_last)
    ckpt.clean_leftovers()
    run_context.checkpoint_root = ckpt.output_dir
    return ckpt


def resume_training_state(ckpt, resume_from: Any, *, model: nn.Module, weights_key: str, optimizer, lr_scheduler,
                          stream, fingerprint: dict[str, Any] | None = None, total_steps: int | None = None) -> int:
    """Restores a saved training state when ``resume_from`` (``auto``, a path or None) names one.

    Args:
        ckpt: the run's checkpointer (:func:`open_checkpointer`).
        resume_from: the ``resume_from_checkpoint`` config value.
        model: gets ``state[weights_key]``: ``"model"`` (every weight) or ``"adapter"`` (exactly the
            LoRA weights); keys and shapes are checked first (a short error on a mismatch).
        optimizer, lr_scheduler, stream: restored from ``optimizer``, ``lr_scheduler``, ``data``.
            The LR is then recomputed from this run's schedule (a raised ``max_steps`` extends it).
        fingerprint: this run's fingerprint; a checkpoint written by a different run is refused.
        total_steps: this run's step count; a checkpoint past it is refused (it would be exported as
            if it had trained ``total_steps``).

    Returns:
        The step to continue from (0 when nothing is resumed). RNG states are restored too.

    Raises:
        ResumeError: the checkpoint belongs to another run, is corrupt, or does not fit the model.
    """
    from tinytune.checkpoint import set_rng_state  # noqa: PLC0415
    from tinytune.checkpoint.fingerprint import check_fingerprint  # noqa: PLC0415
    from tinytune.checkpoint.training_state import load_weights_strict  # noqa: PLC0415
    from tinytune.training.lr_schedulers import refresh_lr  # noqa: PLC0415

    path = ckpt.resolve(resume_from)
    if not path:
        return 0
    if fingerprint is not None:
        check_fingerprint(ckpt.fingerprint(path), fingerprint, path)
    state = ckpt.load(path)
    load_weights_strict(model, state[weights_key], path, adapter_only=weights_key == "adapter")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    refresh_lr(lr_scheduler)
    stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    step = int(state["step"])
    check_not_past_end(step, total_steps, path)
    run_context.step = step
    print(f"resumed from {path} at step {step}")
    return step


def save_training_state(ckpt, step: int, weights: dict[str, Any], *, optimizer, lr_scheduler, stream,
                        fingerprint: dict[str, Any] | None = None) -> None:
    """Saves ``{**weights, "optimizer", "lr_scheduler", "data", "step"}`` as the checkpoint of ``step``.

    Args:
        weights: ``{"model": state_dict}`` or ``{"adapter": adapter_state_dict}``.
        fingerprint: this run's fingerprint, stored with the checkpoint.
    """
    ckpt.save(step, {**weights, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "data": stream.state_dict(), "step": step}, fingerprint=fingerprint)


def check_not_past_end(step: int, total_steps: int | None, path: Any) -> None:
    """Refuses to resume a checkpoint at a step beyond this run's last step.

    Raises:
        ResumeError: naming both numbers and what to do.
    """
    if total_steps is not None and step > total_steps:
        raise ResumeError(f"resume_from_checkpoint: {path} is at step {step}, past this run's last step {total_steps} "
                          f"(max_steps / epochs lowered?). Set max_steps >= {step}, or start fresh with "
                          "resume_from_checkpoint=null or a new output_dir")
