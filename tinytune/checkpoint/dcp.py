"""Sharded training-state checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (every rank writes its own shards; the directory must be on a
file system all nodes see)::

    <output_dir>/dcp/step_<N>/
        .metadata, __*_*.distcp      model + optimizer shards (DCP)
        trainer_state.json           step, sampler position, LR scheduler, ... (rank 0; JSON)
        rng_rank<r>.pt               RNG state of rank r (tensors and numbers only)
        COMPLETE                     written last: every file's size and sha256, the run fingerprint

The ranks write into ``.tmp-step_<N>``; after a barrier rank 0 writes ``COMPLETE`` and
renames the directory into place, so a crash never leaves a checkpoint that looks whole (the
step-directory protocol of :mod:`tinytune.checkpoint.step_dirs`, shared with the single-device
checkpointer). Nothing read on resume can run code: the trainer state is JSON, the RNG files are
loaded with ``torch.load(weights_only=True)``. On resume the sha256 digests are checked; ``auto``
skips a corrupt checkpoint with a warning naming the file and falls back to the previous one.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tinytune.checkpoint.dcp_safe import safe_dcp_load
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.checkpoint.step_dirs import StepDirectories
from tinytune.device import rng_state, set_rng_state

__all__ = ["DistributedCheckpointer"]

# Optimizer state keyed by parameter name, param groups included: ranks holding different parameters
# (pipeline stages) then write disjoint keys instead of competing for one ``param_groups`` entry.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
TRAINER_STATE = "trainer_state.json"
LEGACY_TRAINER_STATE = "trainer_state.pt"

T = TypeVar("T")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class DistributedCheckpointer(StepDirectories):
    """Save and restore sharded model + optimizer state plus trainer state, for resuming.

    The directory protocol (naming, ``COMPLETE`` marker, resolve, keep-last, atomic rename,
    leftovers, corrupt fallback) is :class:`tinytune.checkpoint.step_dirs.StepDirectories`, run by
    rank 0 between barriers; this class writes and reads the payload (DCP shards, RNG per rank,
    the trainer state). Listing and resolving are collective when a process group is up (every
    rank calls them; rank 0 reads the files and tells the others).

    Args:
        output_dir: run directory; checkpoints go to ``<output_dir>/dcp/step_<N>``.
        keep_last: keep only the newest K complete checkpoints (None keeps all).
    """

    path_type = Path
    legacy_markers = True  # DCP checkpoints of older tinytune have a plain-text COMPLETE

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = None) -> None:
        super().__init__(Path(output_dir) / "dcp", keep_last=keep_last)

    def _is_main(self) -> bool:
        return _rank() == 0

    def _share(self, fn: Callable[[], T]) -> T:
        value = fn() if _rank() == 0 else None
        if dist.is_initialized():
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

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
            trainer_state: small JSON-able state (step, epoch, sampler position, scheduler ...; any
                keys) saved by rank 0.
            fingerprint: the run's fingerprint, stored in the marker and checked on resume.

        Returns:
            The final checkpoint directory.
        """
        tmp = Path(self._begin(step))  # rank 0 creates it
        _barrier()
        state = self._state_dicts(model, optimizer)
        dcp.save(state, checkpoint_id=str(tmp))  # fsyncs its files
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state), encoding="utf-8")
        _barrier()
        final = self._commit(str(tmp), step, fingerprint) if _rank() == 0 else self.path_for(step)
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


def _load_tensors(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts; never code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused: holds objects torch.load(weights_only=True) does not load "
            f"(pickled code or classes; {str(e).splitlines()[0]})"
        ) from None
