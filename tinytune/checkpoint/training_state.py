"""Training-state checkpoints for exact resume: atomic ``step_{N}`` directories, keep-last-K.

A checkpoint directory holds ``training_state.pt`` (whatever dict the recipe passes: model or
adapter weights, optimizer, LR scheduler, dataloader position, RNG states, step/epoch) and a
``COMPLETE`` marker, written last, that lists every file with its size and sha256 and the run's
fingerprint (:mod:`tinytune.checkpoint.integrity`, :mod:`tinytune.checkpoint.fingerprint`).
Directories without a valid marker (a crash or a copy cut short) are skipped with a warning when
resuming; one whose files fail their sha256 check is skipped with a warning naming the file, and
``auto`` falls back to the previous complete checkpoint. The state file is read with
``torch.load(weights_only=True)``: it cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from typing import Any

import torch
from torch import nn

from tinytune.checkpoint.atomic import atomic_directory
from tinytune.checkpoint.integrity import COMPLETE_FILE, check_digests, check_sizes, directory_manifest, read_marker
from tinytune.checkpoint.lora import is_lora_key
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.device import rng_state, set_rng_state
from tinytune.errors import ResumeError, is_disk_full

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


class TrainingCheckpointer:
    """Saves and finds training-state checkpoints under ``output_dir/step_{N}``.

    Args:
        output_dir: where checkpoint directories live.
        keep_last: keep only the newest K complete checkpoints (None keeps all).

    Example:
        >>> ckpt = TrainingCheckpointer("out", keep_last=2)
        >>> ckpt.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        >>> state = ckpt.load_latest()   # None when there is nothing to resume
    """

    def __init__(self, output_dir: str, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.output_dir = os.path.abspath(output_dir)
        self.keep_last = keep_last
        self._verified: set[str] = set()

    def path_for(self, step: int) -> str:
        """The directory of the checkpoint for ``step``."""
        return os.path.join(self.output_dir, f"step_{step}")

    def save(
        self, step: int, state: dict[str, Any], include_rng: bool = True, fingerprint: dict[str, Any] | None = None
    ) -> str:
        """Writes ``state`` atomically to ``step_{step}`` and prunes old checkpoints.

        Args:
            step: global optimizer step (names the directory).
            state: dict of tensors / state dicts / plain values (what ``weights_only`` loads).
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
            with atomic_directory(target, overwrite=True) as tmp:
                torch.save(state, os.path.join(tmp, STATE_FILE))
                marker = {"step": step, "time": time.time(), **directory_manifest(tmp)}
                if fingerprint is not None:
                    marker["fingerprint"] = fingerprint
                with open(os.path.join(tmp, COMPLETE_FILE), "w", encoding="utf-8") as f:
                    json.dump(marker, f)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            if not (is_disk_full(e) or "No space left on device" in str(e)):
                raise
            good = self.latest(verify=False)
            raise CheckpointError(
                f"No space left on device while writing checkpoint {target} (not written; partial files "
                f"removed). Still good: {good or 'no earlier checkpoint'}. Free space and rerun with "
                "resume_from_checkpoint=auto."
            ) from None
        self._verified.add(target)
        self._prune()
        return target

    def clean_leftovers(self) -> list[str]:
        """Removes ``.tmp-step_*`` / ``.old-step_*`` directories a crashed save left; returns them.

        Call at the start of a run (one run per output directory).
        """
        if not os.path.isdir(self.output_dir):
            return []
        gone = []
        for name in sorted(os.listdir(self.output_dir)):
            if name.startswith((".tmp-step_", ".old-step_")):
                shutil.rmtree(os.path.join(self.output_dir, name), ignore_errors=True)
                gone.append(name)
        if gone:
            logger.warning(
                "Removed %d unfinished checkpoint write(s) left by an earlier crash in %s: %s",
                len(gone),
                self.output_dir,
                ", ".join(gone),
            )
        return gone

    def _step_dirs(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.output_dir):
            return []
        out = []
        for name in os.listdir(self.output_dir):
            m = _STEP_RE.match(name)
            path = os.path.join(self.output_dir, name)
            if m and os.path.isdir(path):
                out.append((int(m.group(1)), path))
        return sorted(out)

    @staticmethod
    def is_complete(path: str) -> tuple[bool, str]:
        """Whether ``path`` is a complete checkpoint, and if not, why."""
        if not os.path.isfile(os.path.join(path, COMPLETE_FILE)):
            return False, f"no {COMPLETE_FILE} marker (interrupted while writing?)"
        marker = read_marker(path)
        if marker is None:
            return False, f"unreadable {COMPLETE_FILE} marker"
        why = check_sizes(path, marker)
        return (why is None), (why or "")

    def verify(self, path: str) -> str | None:
        """Why checkpoint ``path`` cannot be trusted (size or sha256 mismatch, naming the file); None if sound."""
        path = os.path.abspath(path)
        if path in self._verified:
            return None
        marker = read_marker(path)
        why = f"no readable {COMPLETE_FILE} marker" if marker is None else check_digests(path, marker)
        if why is None:
            self._verified.add(path)
        return why

    def fingerprint(self, path: str) -> dict[str, Any] | None:
        """The run fingerprint stored with checkpoint ``path`` (None for checkpoints without one)."""
        marker = read_marker(path)
        return None if marker is None else marker.get("fingerprint")

    def complete_checkpoints(self, warn: bool = True) -> list[tuple[int, str]]:
        """``(step, path)`` of every complete checkpoint, oldest first; warns about others."""
        out = []
        for step, path in self._step_dirs():
            ok, why = self.is_complete(path)
            if ok:
                out.append((step, path))
            elif warn:
                logger.warning("Skipping incomplete checkpoint %s: %s", path, why)
        return out

    def latest(self, verify: bool = True) -> str | None:
        """Path of the newest complete checkpoint, or None.

        With ``verify`` (default) a checkpoint whose files fail their sha256 check is skipped with a
        warning naming the file, falling back to the previous one.
        """
        for _step, path in reversed(self.complete_checkpoints(warn=verify)):
            if not verify:
                return path
            why = self.verify(path)
            if why is None:
                return path
            logger.warning("Skipping corrupt checkpoint %s: %s; falling back to the previous complete one", path, why)
        return None

    def load(self, path: str) -> dict[str, Any]:
        """Loads a checkpoint directory (must be complete).

        Raises:
            CheckpointError: the directory does not exist, is incomplete, fails its sha256 check
                (the message names the file), or holds objects ``weights_only`` refuses (code).
        """
        if not os.path.isdir(path):
            raise CheckpointError(
                f"resume_from_checkpoint: {path} does not exist; use resume_from_checkpoint=auto "
                "or the path of a step_N directory"
            )
        ok, why = self.is_complete(path)
        if not ok:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {why}; pick another or use resume_from_checkpoint=auto"
            )
        why = self.verify(path)
        if why is not None:
            raise ResumeError(
                f"checkpoint {path} is corrupt: {why}; resume from an earlier step_N directory or "
                "use resume_from_checkpoint=auto (falls back to the newest sound one)"
            )
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

    def resolve(self, resume_from_checkpoint: str | None) -> str | None:
        """Turns a ``resume_from_checkpoint`` config value into a directory or None.

        ``auto`` -> newest complete checkpoint in ``output_dir`` (None when there is none);
        a path -> that path (validated by :meth:`load`); ``null``/``""``/``false`` -> None.
        """
        if resume_from_checkpoint in (None, "", False, "null", "none", "None"):
            return None
        if str(resume_from_checkpoint) == "auto":
            return self.latest()
        return os.path.abspath(str(resume_from_checkpoint))

    def _prune(self) -> None:
        for name in os.listdir(self.output_dir):  # leftovers of a crashed save
            if name.startswith(".tmp-step_") or name.startswith(".old-step_"):
                p = os.path.join(self.output_dir, name)
                if time.time() - os.path.getmtime(p) > 3600:
                    shutil.rmtree(p, ignore_errors=True)
        if self.keep_last is None:
            return
        done = self.complete_checkpoints(warn=False)
        for _step, path in done[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


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
