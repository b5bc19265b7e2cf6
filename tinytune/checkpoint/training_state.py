"""Training-state checkpoints for exact resume: atomic ``step_{N}`` directories, keep-last-K.

A checkpoint directory holds ``training_state.pt`` (whatever dict the recipe passes: model or
adapter weights, optimizer, LR scheduler, dataloader position, RNG states, step/epoch) and a
``COMPLETE`` marker, written last, that lists every file with its size. Directories without a
valid marker (a crash or a copy cut short) are skipped with a warning when resuming.
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
from tinytune.device import rng_state, set_rng_state

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
COMPLETE_FILE = "COMPLETE"
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

    def path_for(self, step: int) -> str:
        """The directory of the checkpoint for ``step``."""
        return os.path.join(self.output_dir, f"step_{step}")

    def save(self, step: int, state: dict[str, Any], include_rng: bool = True) -> str:
        """Writes ``state`` atomically to ``step_{step}`` and prunes old checkpoints.

        Args:
            step: global optimizer step (names the directory).
            state: picklable dict of tensors / state dicts / plain values.
            include_rng: add ``state["rng"] = rng_state()`` when it is not there.

        Returns:
            The checkpoint directory.
        """
        state = dict(state)
        state.setdefault("step", step)
        if include_rng and "rng" not in state:
            state["rng"] = rng_state()
        target = self.path_for(step)
        with atomic_directory(target, overwrite=True) as tmp:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            files = {
                name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
            }
            marker = {"step": step, "time": time.time(), "files": files}
            with open(os.path.join(tmp, COMPLETE_FILE), "w", encoding="utf-8") as f:
                json.dump(marker, f)
        self._prune()
        return target

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
        marker = os.path.join(path, COMPLETE_FILE)
        if not os.path.isfile(marker):
            return False, f"no {COMPLETE_FILE} marker (interrupted while writing?)"
        try:
            with open(marker, encoding="utf-8") as f:
                files = json.load(f)["files"]
        except (json.JSONDecodeError, KeyError, OSError) as e:
            return False, f"unreadable {COMPLETE_FILE} marker ({e!r})"
        for name, size in files.items():
            p = os.path.join(path, name)
            if not os.path.isfile(p):
                return False, f"file {name} listed in {COMPLETE_FILE} is missing"
            if os.path.getsize(p) != size:
                return False, f"file {name} has {os.path.getsize(p)} bytes, {COMPLETE_FILE} says {size}"
        return True, ""

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

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None."""
        done = self.complete_checkpoints()
        return done[-1][1] if done else None

    def load(self, path: str) -> dict[str, Any]:
        """Loads a checkpoint directory (must be complete).

        Raises:
            FileNotFoundError / ValueError: the directory does not exist or is incomplete.
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        ok, why = self.is_complete(path)
        if not ok:
            raise ValueError(f"checkpoint {path} is incomplete: {why}; pick another or use resume_from_checkpoint=auto")
        file = os.path.join(path, STATE_FILE)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{file}: holds objects that torch.load(weights_only=True) refuses ({e}); keep "
                "training state to tensors, numbers, strings, lists and dicts"
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
