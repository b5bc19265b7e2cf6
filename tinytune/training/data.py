"""Data plumbing for single-device recipes: resumable batch stream, train/validation split."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tinytune.distributed.dist_sampler import ResumableDistributedSampler


def split_dataset(
    dataset: Dataset, val_ratio: float | None = None, val_size: int | None = None, seed: int = 0
) -> tuple[Dataset, Dataset | None]:
    """Deterministically holds out a validation subset.

    Args:
        dataset: a map-style dataset.
        val_ratio: fraction held out (e.g. 0.05); or
        val_size: number of samples held out.
        seed: permutation seed (the same seed gives the same split).

    Returns:
        ``(train, val)``; ``val`` is None when neither size is given.

    Raises:
        ValueError: when the split leaves no training or no validation samples.
    """
    n = len(dataset)
    if val_size is None and not val_ratio:
        return dataset, None
    k = int(val_size) if val_size is not None else max(1, int(round(float(val_ratio) * n)))
    if not 0 < k < n:
        raise ValueError(
            f"validation split: holding out {k} of {n} samples leaves an empty side; "
            "set validation.split_ratio / validation.split_size so that 0 < size < dataset size"
        )
    g = torch.Generator()
    g.manual_seed(int(seed) + 7919)  # independent of the training shuffle
    order = torch.randperm(n, generator=g).tolist()
    return Subset(dataset, sorted(order[k:])), Subset(dataset, sorted(order[:k]))


class BatchStream:
    """Endless iteration over a dataset in shuffled batches, epoch after epoch, resumable.

    The position (epoch, batches used in that epoch) is part of the training checkpoint; after
    :meth:`load_state_dict` the stream continues with exactly the batches an uninterrupted run
    would have seen (each epoch's order comes from ``seed + epoch``).

    Args:
        dataset: map-style dataset of samples.
        batch_size: samples per batch.
        collate_fn: list of samples -> batch dict.
        shuffle: reshuffle every epoch.
        seed: shuffle seed.
        drop_last: drop the last incomplete batch of each epoch.
        num_workers: DataLoader worker processes.
        dp_rank, dp_size: data-parallel rank and size: this rank takes positions ``dp_rank,
            dp_rank + dp_size, ...`` of each epoch's permutation, so a step's union over ranks is
            what one process with ``dp_size`` times the batch would take.

    Raises:
        ValueError: when a rank's share of the dataset is smaller than one batch (with ``drop_last``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate_fn: Callable[[list], dict],
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        n = len(dataset)
        if n == 0 or (drop_last and n // dp_size < batch_size):
            ranks = f" x {dp_size} data-parallel ranks" if dp_size > 1 else ""
            raise ValueError(
                f"the training dataset has {n} samples, fewer than batch_size={batch_size}{ranks}; "
                "lower batch_size or add data"
            )
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.sampler = ResumableDistributedSampler(n, dp_size, dp_rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch already handed out
        self._it: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = self.sampler.num_samples  # this rank's share of the dataset
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _start(self) -> None:
        self.sampler.set_epoch(self.epoch, start_index=self.batches_done * self.batch_size)
        # An own generator: creating the iterator then draws no numbers from the global RNG, so a
        # resumed run's dropout masks match the uninterrupted run's.
        g = torch.Generator()
        g.manual_seed(self.sampler.seed + self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            generator=g,
            collate_fn=self.collate_fn,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
        )
        self._it = iter(loader)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        if self.batches_done >= self.batches_per_epoch:
            self.epoch += 1
            self.batches_done = 0
            self._start()
        batch = next(self._it)
        self.batches_done += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position to resume from."""
        state = {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.sampler.seed,
            "batch_size": self.batch_size,
            "dp_size": self.sampler.num_replicas,
        }
        if hasattr(self.dataset, "state_dict"):  # a dataset mix: items served per source
            state["dataset"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues from a saved position.

        Raises:
            ValueError: the checkpoint was written with another seed, batch size or data-parallel size.
        """
        saved = (int(state["seed"]), int(state["batch_size"]), int(state.get("dp_size", 1)))
        if saved != (self.sampler.seed, self.batch_size, self.sampler.num_replicas):
            raise ValueError(
                f"resume: the checkpoint's data order used seed={saved[0]}, batch_size={saved[1]}, "
                f"data-parallel size {saved[2]}; this run has seed={self.sampler.seed}, batch_size={self.batch_size}, "
                f"data-parallel size {self.sampler.num_replicas}. Resume with the same values (or start a new "
                "output_dir)."
            )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        if "dataset" in state and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["dataset"])
        self._it = None


def validation_batches(dataset: Dataset, batch_size: int, collate_fn: Callable[[list], dict]) -> DataLoader:
    """Validation batches in dataset order (no shuffling, keeps the last partial batch).

    The loader has its own generator: a ``DataLoader`` draws a base seed every time it is iterated,
    which would otherwise advance the global RNG, so dropout / NEFTune noise after a validation
    would depend on the validation cadence (and differ from the distributed recipes, whose
    validation draws nothing).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        drop_last=False,
        generator=torch.Generator(),
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Moves every tensor of a batch to ``device``."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
