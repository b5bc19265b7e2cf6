"""Dataset mixing: several map-style datasets combined by sampling ``weight``s or per-source ``epochs``.

- ``weights``: each item of the mix comes from source ``s`` with probability ``w_s / sum(w)``
  (seeded draws); the mix ends when the first source runs out (like ``datasets``'
  ``interleave_datasets(..., stopping_strategy="first_exhausted")``, LLaMA-Factory's default).
- ``epochs``: source ``s`` contributes ``round(epochs_s * len_s)`` items (whole seeded
  permutations, then part of one for a fractional epoch), all shuffled together.

The order depends only on the seed and the sources, so a resumed run sees the same mix. The mix
is a map-style dataset, so the recipes' resumable batch stream records the position; the mix
also counts how many items of each source it has served (:meth:`MixedDataset.state_dict`, saved
with the data position).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset, IterableDataset

from tinytune.datasets.data_errors import DatasetError

log = logging.getLogger("tinytune.datasets")


def _check_number(value, key: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{key}: expected a positive number, got {value!r}", hint=f"Fix `{key}` in the config")
    if value < 0 or (value == 0 and not allow_zero):
        raise DatasetError(
            f"{key}: {value!r} must be > 0 (drop the source instead of giving it {value!r})",
            hint=f"Fix `{key}` in the config",
        )
    return float(value)


def mix_order(
    sizes: Sequence[int],
    *,
    weights: Sequence[float] | None = None,
    epochs: Sequence[float] | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The mixed order as ``(source_ids int64 [n], item_ids int64 [n])``.

    Args:
        sizes: length of each source.
        weights: sampling weights (one per source), or
        epochs: passes over each source (fractions allowed).
        seed: the mix seed.
        names: source names for messages (``dataset[i]``).

    Raises:
        DatasetError: both or neither of weights/epochs, a count mismatch, a weight or epochs
            value that is not a positive number, an empty source.
    """
    k = len(sizes)
    names = list(names or [f"dataset[{i}]" for i in range(k)])
    if (weights is None) == (epochs is None):
        raise DatasetError(
            "a dataset mix needs `weight` on every source or `epochs` on every source, not both/neither",
            hint="Give each list item of `dataset` a weight: (sampling probability) or epochs:",
        )
    per = weights if weights is not None else epochs
    key = "weight" if weights is not None else "epochs"
    vals = [_check_number(v, f"{names[i]}.{key}") for i, v in enumerate(per)]
    if len(vals) != k:
        raise DatasetError(f"{len(vals)} {key} values for {k} datasets")
    for i, n in enumerate(sizes):
        if n <= 0:
            raise DatasetError(f"{names[i]}: the dataset is empty", hint="Fix the source or remove it from the mix")
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for n in sizes]
    if epochs is not None:
        src, idx = [], []
        for s, (n, e) in enumerate(zip(sizes, vals)):
            m = max(1, int(round(e * n)))
            order = np.concatenate([perms[s]] + [rng.permutation(n) for _ in range(m // n)])[:m]
            src.append(np.full(m, s, dtype=np.int64))
            idx.append(order.astype(np.int64))
        src_all, idx_all = np.concatenate(src), np.concatenate(idx)
        shuffle = rng.permutation(len(src_all))
        return src_all[shuffle], idx_all[shuffle]
    p = np.asarray(vals) / sum(vals)
    bound = min(n / q for n, q in zip(sizes, p))  # expected draws until the first source runs out
    draws = rng.choice(k, size=int(bound * 1.5) + 16 * k, p=p)
    counts = np.zeros(k, dtype=np.int64)
    src = np.empty(len(draws), dtype=np.int64)
    idx = np.empty(len(draws), dtype=np.int64)
    n_out = 0
    for s in draws:
        if counts[s] >= sizes[s]:  # first exhausted: stop
            break
        src[n_out], idx[n_out] = s, perms[s][counts[s]]
        counts[s] += 1
        n_out += 1
    return src[:n_out], idx[:n_out]


class MixedDataset(Dataset):
    """A deterministic mix of map-style datasets (see the module docstring).

    Args:
        datasets: the sources (items of the same kind, e.g. ``{"tokens", "labels"}``).
        names: their names for the log and messages.
        weights / epochs: one value per source (exactly one of the two).
        seed: mix seed.

    Attributes:
        contributed: items per source in the mix (one pass).
        served: items per source handed out so far (part of :meth:`state_dict`).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | None = None,
        epochs: Sequence[float] | None = None,
        seed: int = 0,
    ):
        names = list(names or [f"dataset[{i}]" for i in range(len(datasets))])
        for name, ds in zip(names, datasets):
            if isinstance(ds, IterableDataset):
                raise DatasetError(
                    f"{name}: a streaming dataset cannot be mixed (mixing needs the dataset size)",
                    hint="Use streaming: false for datasets in a mix",
                )
        self.datasets = list(datasets)
        self.names = names
        self.seed = int(seed)
        self.source, self.index = mix_order(
            [len(d) for d in datasets], weights=weights, epochs=epochs, seed=seed, names=names
        )
        self.contributed = np.bincount(self.source, minlength=len(datasets)).tolist()
        self.served = [0] * len(datasets)
        self.cache_hit = all(getattr(d, "cache_hit", False) for d in datasets)
        log.info("%s", self.describe())

    def __len__(self) -> int:
        return len(self.source)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every item of the mix, int64 [n]."""
        per = [np.asarray(d.lengths, dtype=np.int64) for d in self.datasets]
        out = np.empty(len(self.source), dtype=np.int64)
        for s, lens in enumerate(per):
            m = self.source == s
            out[m] = lens[self.index[m]]
        return out

    def __getitem__(self, i: int) -> dict:
        s = int(self.source[i])
        self.served[s] += 1
        return self.datasets[s][int(self.index[i])]

    def describe(self) -> str:
        """One line: how many samples each source contributes to one pass of the mix."""
        total = max(1, len(self.source))
        parts = [
            f"{n}: {c} samples ({100 * c / total:.1f}%) of its {len(d)}"
            for n, c, d in zip(self.names, self.contributed, self.datasets)
        ]
        return f"dataset mix (seed {self.seed}, {len(self.source)} samples): " + ", ".join(parts)

    def state_dict(self) -> dict:
        """The mix's identity (seed, per-source counts) and the items served per source."""
        return {"seed": self.seed, "contributed": list(self.contributed), "served": list(self.served)}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``served``.

        Raises:
            ValueError: the checkpoint was written for a different mix (seed or sources changed).
        """
        if int(state["seed"]) != self.seed or list(state["contributed"]) != self.contributed:
            raise ValueError(
                f"resume: the checkpoint's dataset mix (seed {state['seed']}, samples per source "
                f"{state['contributed']}) differs from this run's (seed {self.seed}, "
                f"{self.contributed}); resume with the same datasets, weights/epochs and seed"
            )
        self.served = [int(x) for x in state["served"]]
