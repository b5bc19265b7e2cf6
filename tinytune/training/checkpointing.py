"""Training-state checkpoints of the single-device recipes: open, resume, save.

A state dict is ``{"model" | "adapter": weights, "optimizer", "lr_scheduler", "data", "step", "accum"}``
(the checkpointer adds ``"rng"``); see :class:`tinytune.checkpoint.TrainingCheckpointer`. The run
fingerprint (:func:`tinytune.training.resume_check.config_fingerprint`) is stored with every
checkpoint and compared on resume. The distributed recipes' DCP checkpoints
(:class:`tinytune.checkpoint.dcp.DistributedCheckpointer`) hold the same trainer state.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from tinytune.checkpoint import TrainingCheckpointer, set_rng_state
from tinytune.checkpoint.dcp import DistributedCheckpointer
from tinytune.checkpoint.fingerprint import check_fingerprint
from tinytune.checkpoint.training_state import load_weights_strict
from tinytune.config import ConfigError
from tinytune.distributed.mesh import is_rank_zero
from tinytune.errors import ResumeError, run_context
from tinytune.training.lr_schedulers import refresh_lr


def open_checkpointer(keep_last: int, out_dir: str):
    """A :class:`TrainingCheckpointer` over ``out_dir/checkpoints`` keeping the newest ``keep_last``.

    Unfinished checkpoint writes left by a crash (``.tmp-step_*``) are removed.
    """
    ckpt = TrainingCheckpointer(os.path.join(out_dir, "checkpoints"), keep_last=keep_last)
    ckpt.clean_leftovers()
    run_context.checkpoint_root = ckpt.output_dir
    return ckpt


def open_sharded_checkpointer(keep_last: int, out_dir: str):
    """A :class:`DistributedCheckpointer` over ``out_dir/dcp`` keeping the newest ``keep_last``.

    Unfinished writes left by a crash (``.tmp-step_*``) are removed (rank 0).
    """
    ckpt = DistributedCheckpointer(out_dir, keep_last=keep_last)
    ckpt.clean_leftovers()
    run_context.checkpoint_root = str(ckpt.root)
    return ckpt


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


def resume_training_state(
    ckpt,
    resume_from: Any,
    *,
    model: nn.Module,
    weights_key: str,
    optimizer,
    lr_scheduler,
    stream,
    accum: int = 1,
    fingerprint: dict[str, Any] | None = None,
    total_steps: int | None = None,
    stateful: dict[str, Any] | None = None,
) -> int:
    """Restores a saved training state when ``resume_from`` (``auto``, a path or None) names one.

    Args:
        ckpt: the run's checkpointer (:func:`open_checkpointer`).
        resume_from: the ``resume_from_checkpoint`` config value.
        model: gets ``state[weights_key]``: ``"model"`` (every weight) or ``"adapter"`` (exactly the
            LoRA weights); keys and shapes are checked first (a short error on a mismatch).
        optimizer, lr_scheduler, stream: restored from ``optimizer``, ``lr_scheduler``, ``data``.
            The LR is then recomputed from this run's schedule (a raised ``max_steps`` extends it).
        accum: this run's ``gradient_accumulation_steps`` (must equal the checkpoint's).
        fingerprint: this run's fingerprint; a checkpoint written by a different run is refused.
        total_steps: this run's step count; a checkpoint past it is refused (it would be exported as
            if it had trained ``total_steps``).
        stateful: further objects with ``load_state_dict`` restored from the state's keys of the same
            names (the fp16 ``loss_scaler``, ``early_stopping``); a key the checkpoint lacks is refused
            unless the object's ``active`` is False.

    Returns:
        The step to continue from (0 when nothing is resumed). RNG states are restored too.

    Raises:
        ResumeError: the checkpoint belongs to another run, is corrupt, or does not fit the model.
    """
    path = ckpt.resolve(resume_from)
    if not path:
        return 0
    if fingerprint is not None:
        check_fingerprint(ckpt.fingerprint(path), fingerprint, path)
    state = ckpt.load(path)
    check_same_accumulation(state, path, accum)
    load_weights_strict(model, state[weights_key], path, adapter_only=weights_key == "adapter")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    refresh_lr(lr_scheduler)
    stream.load_state_dict(state["data"])
    _restore_stateful(state, stateful, path)
    set_rng_state(state["rng"])
    step = int(state["step"])
    check_not_past_end(step, total_steps, path)
    run_context.step = step
    print(f"resumed from {path} at step {step}")
    return step


def _restore_stateful(state: dict[str, Any], stateful: dict[str, Any] | None, path: Any) -> None:
    """Loads each of ``stateful``'s objects from ``state[key]`` (see :func:`resume_training_state`)."""
    for key, obj in (stateful or {}).items():
        if key not in state and not getattr(obj, "active", True):  # nothing tracked then, nothing now
            continue
        if key not in state:
            raise ResumeError(
                f"resume_from_checkpoint: {path} holds no {key} state (written with other settings or an older "
                "tinytune); resume with the settings it was written with, or start a new output_dir"
            )
        obj.load_state_dict(state[key])


def save_training_state(
    ckpt,
    step: int,
    weights: dict[str, Any],
    *,
    optimizer,
    lr_scheduler,
    stream,
    accum: int = 1,
    fingerprint: dict[str, Any] | None = None,
    stateful: dict[str, Any] | None = None,
) -> None:
    """Saves ``{**weights, "optimizer", "lr_scheduler", "data", "step", "accum"}`` as the checkpoint of ``step``.

    Args:
        weights: ``{"model": state_dict}`` or ``{"adapter": adapter_state_dict}``.
        accum: the run's ``gradient_accumulation_steps`` (checked on resume).
        fingerprint: this run's fingerprint, stored with the checkpoint.
        stateful: further objects with ``state_dict()`` saved under their keys (the fp16
            ``loss_scaler``, ``early_stopping``; :func:`resume_training_state` restores them).
    """
    ckpt.save(
        step,
        {
            **weights,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "data": stream.state_dict(),
            "step": step,
            "accum": accum,
            **{key: obj.state_dict() for key, obj in (stateful or {}).items()},
        },
        fingerprint=fingerprint,
    )


def check_not_past_end(step: int, total_steps: int | None, path: Any) -> None:
    """Refuses to resume a checkpoint at a step beyond this run's last step.

    Raises:
        ResumeError: naming both numbers and what to do.
    """
    if total_steps is not None and step > total_steps:
        raise ResumeError(
            f"resume_from_checkpoint: {path} is at step {step}, past this run's last step {total_steps} "
            f"(max_steps / epochs lowered?). Set max_steps >= {step}, or start fresh with "
            "resume_from_checkpoint=null or a new output_dir"
        )


def resume_sharded_state(
    ckpt,
    resume_from: Any,
    *,
    model: nn.Module,
    optimizer,
    lr_scheduler,
    stream,
    accum: int,
    fingerprint: dict[str, Any] | None = None,
    total_steps: int | None = None,
    stateful: dict[str, Any] | None = None,
) -> int:
    """:func:`resume_training_state` for the distributed recipes' DCP checkpoints (collective).

    Args:
        ckpt: a :class:`tinytune.checkpoint.dcp.DistributedCheckpointer` (:func:`open_sharded_checkpointer`).
        resume_from: the ``resume_from_checkpoint`` setting.
        model, optimizer: sharded, restored in place (DCP reshards across world sizes).
        lr_scheduler, stream: restored from the trainer state; the LR is then recomputed from this
            run's schedule.
        accum: this run's ``gradient_accumulation_steps`` (must equal the checkpoint's).
        fingerprint: this run's fingerprint; a checkpoint written by a different run is refused.
        total_steps: this run's step count; a checkpoint past it is refused.
        stateful: as in :func:`resume_training_state` (JSON-able states, e.g.
            ``EarlyStopping.tracking_only()``).

    Returns:
        The step to continue from (0 when nothing is resumed).

    Raises:
        ResumeError: the checkpoint belongs to another run, is corrupt, or is past this run's end.
    """
    path = ckpt.resolve(resume_from)
    if path is None:
        return 0
    if fingerprint is not None:
        check_fingerprint(ckpt.fingerprint(path), fingerprint, str(path))
    state = ckpt.load(path, model, optimizer)
    check_same_accumulation(state, str(path), accum)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    refresh_lr(lr_scheduler)
    stream.load_state_dict(state["data"])
    _restore_stateful(state, stateful, path)
    step = int(state["step"])
    check_not_past_end(step, total_steps, path)
    run_context.step = step
    if is_rank_zero():
        print(f"resumed from {path} at step {step}")
    return step


def save_sharded_state(
    ckpt,
    step: int,
    *,
    model: nn.Module,
    optimizer,
    lr_scheduler,
    stream,
    accum: int,
    fingerprint: dict[str, Any] | None = None,
    stateful: dict[str, Any] | None = None,
) -> None:
    """Saves a DCP checkpoint of ``step`` (collective): sharded weights and optimizer, and
    ``{"step", "accum", "lr_scheduler", "data"}`` (the same trainer state as the single-device one,
    as JSON) with the run fingerprint; ``stateful`` objects' (JSON-able) ``state_dict()`` under their keys."""
    ckpt.save(
        step,
        model,
        optimizer,
        {
            "step": step,
            "accum": accum,
            "lr_scheduler": lr_scheduler.state_dict(),
            "data": stream.state_dict(),
            **{key: obj.state_dict() for key, obj in (stateful or {}).items()},
        },
        fingerprint=fingerprint,
    )


class TrainingState:
    """A single-device run's checkpointer with what each of its resumes and saves passes along.

    Args:
        ckpt: from :func:`open_checkpointer`.
        weights_key: ``"model"`` (every weight) or ``"adapter"`` (the trained parameters).
        optimizer, lr_scheduler: saved with every checkpoint, restored on resume.
        data: the run's :class:`tinytune.training.setup.TrainData` (its ``stream`` is saved and
            restored; its ``accum`` must match on resume).
        fingerprint: the run's fingerprint (stored; compared on resume).
    """

    def __init__(self, ckpt, weights_key: str, optimizer, lr_scheduler, data, fingerprint: dict):
        self.ckpt, self.weights_key = ckpt, weights_key
        self.common = dict(
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            stream=data.stream,
            accum=data.accum,
            fingerprint=fingerprint,
        )

    def resume(self, resume_from: Any, model: nn.Module, total_steps: int) -> int:
        """:func:`resume_training_state`; returns the step to continue from (0: nothing resumed)."""
        return resume_training_state(
            self.ckpt, resume_from, model=model, weights_key=self.weights_key, total_steps=total_steps, **self.common
        )

    def save(self, step: int, weights: dict[str, Any]) -> None:
        """:func:`save_training_state` of ``weights`` (a state dict) under ``weights_key``."""
        save_training_state(self.ckpt, step, {self.weights_key: weights}, **self.common)


class ShardedTrainingState:
    """A distributed run's DCP checkpointer with what each of its resumes and saves passes along.

    Args:
        ckpt: from :func:`open_sharded_checkpointer`.
        model, optimizer: sharded; saved and restored in place.
        lr_scheduler: saved with every checkpoint, restored on resume.
        data: the run's :class:`tinytune.training.setup.TrainData` (``stream`` saved and restored,
            ``accum`` checked).
        fingerprint: the run's fingerprint (stored; compared on resume).
        stateful: further JSON-able states (e.g. ``EarlyStopping.tracking_only()``) by key.
    """

    def __init__(self, ckpt, model: nn.Module, optimizer, lr_scheduler, data, fingerprint: dict, stateful=None):
        self.ckpt = ckpt
        self.common = dict(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            stream=data.stream,
            accum=data.accum,
            fingerprint=fingerprint,
            stateful=stateful,
        )

    def resume(self, resume_from: Any, total_steps: int) -> int:
        """:func:`resume_sharded_state` (collective); returns the step to continue from."""
        return resume_sharded_state(self.ckpt, resume_from, total_steps=total_steps, **self.common)

    def save(self, step: int) -> None:
        """:func:`save_sharded_state` of ``step`` (collective)."""
        save_sharded_state(self.ckpt, step, **self.common)
