"""Training-state checkpoints for exact resume: atomic ``step_{N}`` directories, keep-last-K.

A checkpoint directory holds ``training_state.pt`` (whatever dict the recipe passes: model or
adapter weights, optimizer, LR scheduler, dataloader position, RNG states, step/epoch) and a
``COMPLETE`` marker, written last, that lists every file with its size and sha256 and the run's
fingerprint (:mod:`tinytune.checkpoint.integrity`, :mod:`tinytune.checkpoint.fingerprint`).
The directory protocol (torn and corrupt checkpoints skipped with a warning, ``auto`` falling
back to the previous complete one, keep-last, atomic rename) is
:mod:`tinytune.checkpoint.step_dirs`, shared with the DCP checkpointer. The state file is read
with ``torch.load(weights_only=True)``: it cannot run code.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from tinytune.checkpoint.adapters import is_lora_key
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.checkpoint.step_dirs import StepDirectories
from tinytune.device import rng_state, set_rng_state
from tinytune.errors import ResumeError, is_disk_full

STATE_FILE = "training_state.pt"


class TrainingCheckpointer(StepDirectories):
    """Saves and finds training-state checkpoints under ``output_dir/step_{N}``.

    The directory protocol (naming, ``COMPLETE`` marker, resolve, keep-last, atomic rename,
    leftovers, corrupt fallback) is :class:`tinytune.checkpoint.step_dirs.StepDirectories`; this
    class writes and reads the payload, one ``training_state.pt``.

    Args:
        output_dir: where checkpoint directories live.
        keep_last: keep only the newest K complete checkpoints (None keeps all).

    Example:
        >>> ckpt = TrainingCheckpointer("out", keep_last=2)
        >>> ckpt.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        >>> state = ckpt.load_latest()   # None when there is nothing to resume
    """

    def __init__(self, output_dir: str, keep_last: int | None = None) -> None:
        super().__init__(output_dir, keep_last=keep_last)
        self.output_dir = self.root

    def save(
        self, step: int, state: dict[str, Any], include_rng: bool = True, fingerprint: dict[str, Any] | None = None
    ) -> str:
        """Writes ``state`` atomically to ``step_{step}`` and prunes old checkpoints.

        Args:
            step: global optimizer step (names the directory).
            state: dict of tensors / state dicts / plain values (what ``weights_only`` loads); any
                keys, saved and loaded as given.
            include_rng: add ``state["rng"] = rng_state()`` when it is not there.
            fingerprint: the run's fingerprint (:func:`tinytune.checkpoint.fingerprint.run_fingerprint`),
                stored in the marker and checked on resume.

        Returns:
            The checkpoint directory.

        Raises:
            CheckpointError: the disk is full ("No space left on device"; the partial directory is
                removed and the previous checkpoints are intact).
        """
        state = dict(state)
        state.setdefault("step", step)
        if include_rng and "rng" not in state:
            state["rng"] = rng_state()
        target = self.path_for(step)
        try:
            with self.writing(step, fingerprint) as tmp:
                torch.save(state, os.path.join(tmp, STATE_FILE))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            if not (is_disk_full(e) or "No space left on device" in str(e)):
                raise
            good = self.latest(verify=False)
            raise CheckpointError(
                f"No space left on device while writing checkpoint {target} (not written; partial files "
                f"removed). Still good: {good or 'no earlier checkpoint'}. Free space and rerun with "
                "resume_from_checkpoint=auto."
            ) from None
        return target

    def load(self, path: str) -> dict[str, Any]:
        """Loads a checkpoint directory (must be complete and sound: :meth:`check`).

        Raises:
            CheckpointError: the directory does not exist, is incomplete, or holds objects
                ``weights_only`` refuses (code).
            ResumeError: a file fails its sha256 check (the message names the file).
        """
        path = self.check(path)
        file = os.path.join(path, STATE_FILE)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{file}: refused: holds objects that torch.load(weights_only=True) does not load (pickled "
                f"code or classes; {str(e).splitlines()[0]}). Training state holds only tensors, numbers, "
                "strings, lists and dicts"
            ) from None

    def load_latest(self) -> dict[str, Any] | None:
        """Loads the newest complete checkpoint (incomplete ones skipped with a warning)."""
        path = self.latest()
        return None if path is None else self.load(path)


def apply_training_state(
    state: dict[str, Any],
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    restore_rng: bool = True,
    model_key: str = "model",
    strict: bool = True,
) -> None:
    """Loads the parts of a training state into the given objects.

    Args:
        state: a dict returned by :meth:`TrainingCheckpointer.load`.
        model: receives ``state[model_key]`` (strict unless ``strict=False``, e.g. adapter-only).
        optimizer / lr_scheduler: receive ``state["optimizer"]`` / ``state["lr_scheduler"]``.
        restore_rng: restore ``state["rng"]``.
    """
    if model is not None:
        model.load_state_dict(state[model_key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])


def load_weights_strict(
    model: nn.Module, weights: dict[str, torch.Tensor], where: str, adapter_only: bool = False
) -> None:
    """Loads ``weights`` into ``model`` after checking keys and shapes; a short error otherwise.

    Args:
        model: the model.
        weights: a full state dict, or with ``adapter_only`` exactly the model's trainable
            parameters (the adapters: LoRA A/B, DoRA magnitudes, ...).
        where: the checkpoint, for the message.

    Raises:
        ResumeError: missing or unexpected keys, or a shape mismatch (first few named).
    """
    own = model.state_dict()
    if adapter_only:
        expected = {n for n, p in model.named_parameters() if p.requires_grad} or {k for k in own if is_lora_key(k)}
    else:
        expected = set(own)
    unexpected = sorted(set(weights) - expected)
    missing = sorted(expected - set(weights))
    reshaped = sorted(k for k in set(weights) & expected if tuple(weights[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if reshaped:
        k = reshaped[0]
        problems.append(
            f"{len(reshaped)} with another shape (e.g. {k}: checkpoint {tuple(weights[k].shape)}, "
            f"model {tuple(own[k].shape)})"
        )
    if problems:
        kind = "adapter" if adapter_only else "model"
        raise ResumeError(
            f"{where}: its {kind} weights do not fit this model: {'; '.join(problems)}. It was "
            "written for another model or LoRA layout (targets, rank); resume_from_checkpoint=null "
            "or a new output_dir starts fresh"
        )
    model.load_state_dict(weights, strict=not adapter_only)
