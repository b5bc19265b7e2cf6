"""Sharded training-state checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (every rank writes its own shards; the directory must be on a
file system all nodes see)::

    <output_dir>/dcp/step_<N>/
        .metadata, __*_*.distcp      model + optimizer shards (DCP)
        trainer_state.pt             step, sampler position, LR scheduler, ... (rank 0)
        rng_rank<r>.pt               RNG state of rank r
        COMPLETE                     written last; a directory without it is ignored

The ranks write into ``.step_<N>.tmp``; after a barrier rank 0 writes ``COMPLETE`` and
renames the directory into place, so a crash never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tinytune.config._errors import ConfigError
from tinytune.device import rng_state, set_rng_state

__all__ = ["DistributedCheckpointer"]

# Optimizer state keyed by parameter name, param groups included: ranks holding different parameters
# (pipeline stages) then write disjoint keys instead of competing for one ``param_groups`` entry.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE"


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
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE_MARKER).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """Newest complete checkpoint, or None."""
        ckpts = self.complete_checkpoints()
        return ckpts[-1] if ckpts else None

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
        return path

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step_<step>`` collectively (every rank must call this).

        Args:
            step: global optimizer step, used in the directory name.
            model: the sharded model.
            optimizer: its optimizer (None to save the model only).
            trainer_state: small picklable state (step, epoch, sampler position, scheduler ...) saved by rank 0.

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
            torch.save(trainer_state, tmp / "trainer_state.pt")
        _barrier()
        if _rank() == 0:
            for p in tmp.iterdir():
                if p.is_file() and p.suffix == ".pt":
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from ``path`` in place; return the trainer state.

        Works across different numbers of ranks for model and optimizer (DCP reshards);
        the RNG state is restored only when this rank's file exists.
        """
        path = Path(path)
        state = self._state_dicts(model, optimizer)
        dcp.load(state, checkpoint_id=str(path))
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=_OPTIONS)
        else:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return torch.load(path / "trainer_state.pt", weights_only=False)

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
