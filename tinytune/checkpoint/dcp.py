"""Sharded training-state checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (every rank writes its own shards; the directory must be on a
file system all nodes see)::

    <output_dir>/dcp/step_<N>/
        .metadata, __*_*.distcp      model + optimizer shards (DCP)
        trainer_state.json           step, sampler position, LR scheduler, ... (rank 0; JSON)
        rng_rank<r>.pt               RNG state of rank r (tensors and numbers only)
        COMPLETE                     written last: every file's size and sha256, the run fingerprint

The ranks write into ``.step_<N>.tmp``; after a barrier rank 0 writes ``COMPLETE`` and
renames the directory into place, so a crash never leaves a checkpoint that looks whole.
Nothing read on resume can run code: the trainer state is JSON, the RNG files are loaded with
``torch.load(weights_only=True)``. On resume the sha256 digests are checked; ``auto`` skips a
corrupt checkpoint with a warning naming the file and falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tinytune.checkpoint.dcp_safe import safe_dcp_load
from tinytune.checkpoint.integrity import check_digests, check_sizes, directory_manifest, read_marker
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.config._errors import ConfigError
from tinytune.device import rng_state, set_rng_state
from tinytune.errors import ResumeError

logger = logging.getLogger(__name__)

__all__ = ["DistributedCheckpointer"]

# Optimizer state keyed by parameter name, param groups included: ranks holding different parameters
# (pipeline stages) then write disjoint keys instead of competing for one ``param_groups`` entry.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
LEGACY_TRAINER_STATE = "trainer_state.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DistributedCheckpointer:
    """Save and restore sharded model + optimizer state plus trainer state, for resuming.

    Args:
        output_dir: run directory; checkpoints go to ``<output_dir>/dcp/step_<N>``.
        keep_last: keep only the newest K complete checkpoints (None keeps all).
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = None) -> None:
        self.root = Path(output_dir) / "dcp"
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"keep_last_checkpoints must be >= 1 or null, got {keep_last}.")
        self.keep_last = keep_last

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories (marker present, sizes match), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE_MARKER).is_file():
                marker = read_marker(str(p))  # None: a plain-text marker of an older tinytune (no manifest)
                if marker is None or check_sizes(str(p), marker) is None:
                    found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def clean_leftovers(self) -> None:
        """Removes ``.step_<N>.tmp`` directories left by a crashed save (rank 0; call at start)."""
        if _rank() != 0 or not self.root.is_dir():
            return
        for p in sorted(self.root.glob(".step_*.tmp")):
            logger.warning("Removing unfinished checkpoint write %s left by an earlier crash", p)
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def verify(path: str | os.PathLike) -> str | None:
        """Why checkpoint ``path`` cannot be trusted (size or sha256 mismatch naming the file); None if sound.

        Rank 0 reads the files and tells the others (collective when a process group is up).
        """
        why = None
        if _rank() == 0:
            marker = read_marker(str(path))
            if marker is None:
                logger.warning("%s: written by an older tinytune without sha256 digests; not verified", path)
            else:
                why = check_digests(str(path), marker)
        if dist.is_initialized():
            box = [why]
            dist.broadcast_object_list(box, src=0)
            why = box[0]
        return why

    @staticmethod
    def fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
        """The run fingerprint stored with checkpoint ``path`` (None when it has none)."""
        marker = read_marker(str(path))
        return None if marker is None else marker.get("fingerprint")

    def latest(self) -> Path | None:
        """Newest complete checkpoint whose files pass their sha256 check, or None.

        A corrupt one is skipped with a warning naming the file. Collective when a process group is
        up (every rank must call it; rank 0 checks the files).
        """
        for p in reversed(self.complete_checkpoints()):
            why = self.verify(p)
            if why is None:
                return p
            logger.warning("Skipping corrupt checkpoint %s: %s; falling back to the previous complete one", p, why)
        return None

    def resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        """Map the config value ``auto`` | PATH | null to a checkpoint directory (or None).

        Raises:
            ConfigError: when a PATH is given that is not a complete checkpoint.
        """
        if resume_from_checkpoint in (None, "", "null", False):
            return None
        if resume_from_checkpoint == "auto":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not (path / COMPLETE_MARKER).is_file():
            raise ConfigError(
                f"resume_from_checkpoint={path}: not a complete DCP checkpoint (no {COMPLETE_MARKER} file). "
                f"Complete ones under {self.root}: {[p.name for p in self.complete_checkpoints()]}."
            )
        why = self.verify(path)
        if why is not None:
            raise ResumeError(
                f"resume_from_checkpoint={path}: corrupt: {why}; resume from an earlier step_N or use "
                "resume_from_checkpoint=auto (falls back to the newest sound one)"
            )
        return path

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        trainer_state: dict[str, Any],
        fingerprint: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step_<step>`` collectively (every rank must call this).

        Args:
            step: global optimizer step, used in the directory name.
            model: the sharded model.
            optimizer: its optimizer (None to save the model only).
            trainer_state: small JSON-able state (step, epoch, sampler position, scheduler ...) saved by rank 0.
            fingerprint: the run's fingerprint, stored in the marker and checked on resume.

        Returns:
            The final checkpoint directory.
        """
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        state = self._state_dicts(model, optimizer)
        dcp.save(state, checkpoint_id=str(tmp))  # fsyncs its files
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state), encoding="utf-8")
        _barrier()
        if _rank() == 0:
            for p in tmp.iterdir():
                if p.is_file() and p.suffix in (".pt", ".json"):
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            marker = {"step": step, **directory_manifest(str(tmp))}
            if fingerprint is not None:
                marker["fingerprint"] = fingerprint
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from ``path`` in place; return the trainer state.

        Works across different numbers of ranks for model and optimizer (DCP reshards);
        the RNG state is restored only when this rank's file exists.
        """
        path = Path(path)
        state = self._state_dicts(model, optimizer)
        safe_dcp_load(state, path)  # no unpickling of code (dcp.load would unpickle .metadata as is)
        if optimizer is not None:
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_OPTIONS
            )
        else:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.is_file():
            set_rng_state(_load_tensors(rng_file))
        if not (path / TRAINER_STATE).is_file() and (path / LEGACY_TRAINER_STATE).is_file():
            return _load_tensors(path / LEGACY_TRAINER_STATE)  # older tinytune; plain values load weights_only
        try:
            with open(path / TRAINER_STATE, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path / TRAINER_STATE}: unreadable trainer state ({e}); resume from another "
                "checkpoint or start fresh with resume_from_checkpoint=null"
            ) from None

    @staticmethod
    def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        if optimizer is None:
            model_sd, _ = get_state_dict(model, [])
            return {"model": model_sd}
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        return {"model": model_sd, "optim": optim_sd}

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _load_tensors(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts; never code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused: holds objects torch.load(weights_only=True) does not load "
            f"(pickled code or classes; {str(e).splitlines()[0]})"
        ) from None
