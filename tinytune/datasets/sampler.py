"""Length-grouped sampling: batches of similar length (less padding), shuffled, resumable."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class GroupByLengthSampler(Sampler[int]):
    """Yields indices so that consecutive ``batch_size`` chunks hold samples of similar length.

    Each epoch (seeded by ``seed + epoch``): permute all indices, cut the permutation into
    mega-batches of ``batch_size * num_replicas * mega_batch_mult`` samples, sort each mega-batch
    by length (longest first), cut it into global batches, and shuffle the order of the global
    batches. Rank ``r`` takes slice ``r`` of every global batch, so with ``num_replicas`` ranks the
    union of one step is one global batch. Use it with ``DataLoader(batch_size=batch_size)``.

    Position: ``set_epoch(epoch, start_index=k)`` skips this rank's first ``k`` samples;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore it (same API as
    ``tinytune.distributed.dist_sampler.ResumableDistributedSampler``).

    Args:
        lengths: sample lengths (e.g. ``dataset.lengths``).
        batch_size: per-rank batch size.
        shuffle: shuffle (False: plain order, no grouping).
        seed: base seed.
        mega_batch_mult: mega-batch size in global batches.
        drop_last: drop the last incomplete global batch.
        num_replicas: data-parallel size.
        rank: data-parallel rank.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        mega_batch_mult: int = 50,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.mega_batch_mult = int(mega_batch_mult)
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start_index = 0

    def _global_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        gb = self.batch_size * self.num_replicas
        if not self.shuffle:
            order = np.arange(n)
            batches = [order[i : i + gb] for i in range(0, n, gb)]
        else:
            rng = np.random.default_rng(self.seed + self.epoch)
            order = rng.permutation(n)
            mega = gb * self.mega_batch_mult
            batches = []
            for i in range(0, n, mega):
                chunk = order[i : i + mega]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches.extend(chunk[j : j + gb] for j in range(0, len(chunk), gb))
            # Keep a short last batch last so drop_last can remove it.
            full = [b for b in batches if len(b) == gb]
            short = [b for b in batches if len(b) < gb]
            perm = rng.permutation(len(full))
            batches = [full[k] for k in perm] + short
        if self.drop_last:
            batches = [b for b in batches if len(b) == gb]
        return batches

    def _indices(self) -> list[int]:
        out: list[int] = []
        b = self.batch_size
        for g in self._global_batches():
            out.extend(g[self.rank * b : (self.rank + 1) * b].tolist())
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start_index :])

    def __len__(self) -> int:
        return len(self._indices()) - self.start_index

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Selects the epoch and skips this rank's first ``start_index`` samples."""
        self.epoch = int(epoch)
        self.start_index = int(start_index)

    def state_dict(self, samples_consumed: int) -> dict[str, int]:
        """The position to resume from."""
        return {
            "epoch": self.epoch,
            "samples_consumed": int(samples_consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output.

        Raises:
            ValueError: when the seed or data-parallel size differ.
        """
        if int(state["seed"]) != self.seed or int(state["num_replicas"]) != self.num_replicas:
            raise ValueError(
                f"sampler state was saved with seed={state['seed']}, num_replicas="
                f"{state['num_replicas']}; this run has seed={self.seed}, num_replicas="
                f"{self.num_replicas}. Resume with the same values."
            )
        self.set_epoch(int(state["epoch"]), int(state["samples_consumed"]))
