"""Batches from a streaming (iterable) dataset for the single-device recipes, resumable.

Same interface as :class:`tinytune.training.data.BatchStream` (``next``, ``epoch``,
``state_dict``/``load_state_dict``); the position is the dataset's own (source rows read and the
pass), e.g. :class:`tinytune.datasets.hf_source.StreamingSFTDataset`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator


class IterableBatchStream:
    """Endless batches of ``batch_size`` items from an iterable dataset, pass after pass.

    Args:
        dataset: an iterable dataset with ``state_dict()``/``load_state_dict()`` and ``epoch``.
        batch_size: items per batch (a pass's last short batch is completed from the next pass).
        collate_fn: list of items -> batch dict.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable[[list], dict]) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn
        self._it: Iterator | None = None

    @property
    def epoch(self) -> int:
        return int(self.dataset.epoch)

    def __iter__(self) -> IterableBatchStream:
        return self

    def _item(self) -> dict:
        for _ in range(2):  # a finished pass starts the next one once; an empty dataset stops
            if self._it is None:
                self._it = iter(self.dataset)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise ValueError("the streaming dataset yielded no samples; check the source, split and max_samples")

    def __next__(self) -> dict:
        return self.collate_fn([self._item() for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        """The dataset's position after the last batch handed out."""
        return {"stream": self.dataset.state_dict(), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a saved position.

        Raises:
            ValueError: another batch size.
        """
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(
                f"resume: the checkpoint used batch_size={state['batch_size']}, this run "
                f"{self.batch_size}; resume with the same value"
            )
        self.dataset.load_state_dict(state["stream"])
        self._it = None
