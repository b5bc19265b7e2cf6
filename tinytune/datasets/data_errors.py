"""Errors and bad-sample bookkeeping for tinytune datasets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tinytune.errors import TinytuneError

log = logging.getLogger("tinytune.datasets")


class DatasetError(TinytuneError, ValueError):
    """A data problem that names where it is and what to do about it.

    Args:
        message: what is wrong.
        file: the data file (or ``"<list>"`` for in-memory rows).
        row: 1-based row (for JSONL/TXT: line) number, or ``None``.
        hint: what the user can do about it.
    """

    def __init__(self, message: str, file: str | None = None, row: int | None = None, hint: str | None = None):
        self.message = message
        self.file = file
        self.row = row
        self.hint = hint
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        text = (": ".join(where) + ": " if where else "") + message
        if hint:
            text += f". {hint}"
        super().__init__(text)


@dataclass
class BadSampleLog:
    """Counts skipped rows (``skip_bad_samples: true``) and dropped samples by reason, and keeps a
    few examples for the log."""

    count: int = 0
    dropped: dict = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def dropped_too_long(self) -> int:
        """Samples dropped by ``truncation: drop``."""
        return self.dropped.get("too_long", 0)

    def add(self, err: DatasetError | str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))

    def drop(self, reason: str) -> None:
        """Counts one sample dropped for ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def report(self, name: str = "dataset") -> None:
        """Logs a warning with the counts (no-op when nothing was skipped or dropped)."""
        if self.count:
            log.warning(
                "%s: skipped %d bad sample(s) (skip_bad_samples=true); first: %s",
                name,
                self.count,
                " | ".join(self.examples),
            )
        for reason, n in sorted(self.dropped.items()):
            what = {
                "too_long": "longer than max_seq_len (truncation=drop)",
                "no_trained_tokens": "with no trained token left after truncation",
            }.get(reason, reason)
            log.warning("%s: dropped %d sample(s) %s", name, n, what)
