"""A distributed sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from tinytune.config._errors import ConfigError

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[int]):
    """Deal dataset indices to data-parallel ranks, resumable at any batch boundary.

    Each epoch draws one permutation (seeded by ``seed + epoch``) shared by all ranks and
    hands rank ``r`` the indices at positions ``r, r + R, r + 2R, ...``. So when every rank
    takes ``b`` samples per step, the union over ranks of step ``t`` is positions
    ``[t*b*R, (t+1)*b*R)`` of the permutation: exactly what one process with batch
    ``b*R`` would take at step ``t``.

    Position: ``set_epoch(epoch, start_index=k)`` skips this rank's first ``k`` samples;
    :meth:`state_dict` records (epoch, samples consumed) given by the recipe, which knows how
    many batches it actually used (DataLoader workers pre-fetch, so the sampler cannot).

    Args:
        dataset_len: number of samples.
        num_replicas: data-parallel size (not the world size when TP is used).
        rank: data-parallel rank.
        shuffle: permute each epoch.
        seed: base seed, same on every rank.
        drop_last: drop the tail that does not divide evenly; otherwise pad by wrapping around.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Sampler rank {rank} is outside [0, {num_replicas}).")
        if dataset_len < num_replicas and drop_last:
            raise ConfigError(
                f"The dataset has {dataset_len} samples, fewer than the {num_replicas} data-parallel ranks; "
                "use more data or fewer processes."
            )
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_index = 0
        if drop_last:
            self.num_samples = dataset_len // num_replicas
        else:
            self.num_samples = -(-dataset_len // num_replicas)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first ``start_index`` samples."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside [0, {self.num_samples}] for this sampler.")
        self.epoch = epoch
        self.start_index = start_index

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        if total > len(order):  # pad by wrapping around
            order = (order * (-(-total // len(order))))[:total]
        order = order[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def state_dict(self, samples_consumed: int) -> dict[str, int]:
        """Position to resume from: the current epoch and how many of this rank's samples were used."""
        return {
            "epoch": self.epoch,
            "samples_consumed": int(samples_consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises:
            ConfigError: (a ValueError) when the checkpoint was written with a different seed or
                data-parallel size.
        """
        if state["seed"] != self.seed or state["num_replicas"] != self.num_replicas:
            raise ConfigError(
                f"Sampler checkpoint was written with seed={state['seed']}, data-parallel size={state['num_replicas']}; "
                f"this run has seed={self.seed}, data-parallel size={self.num_replicas}. Resume with the same "
                "`seed` and parallel sizes."
            )
        self.set_epoch(state["epoch"], state["samples_consumed"])
