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
    """Counts skipped samples (``skip_bad_samples: true``) and keeps a few examples for the log."""

    count: int = 0
    dropped_too_long: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, err: DatasetError | str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))

    def report(self, name: str = "dataset") -> None:
        """Logs a warning with the counts (no-op when nothing was skipped)."""
        if self.count:
            log.warning(
                "%s: skipped %d bad sample(s) (skip_bad_samples=true); first: %s",
                name, self.count, " | ".join(self.examples),
            )
        if self.dropped_too_long:
            log.warning("%s: dropped %d sample(s) longer than max_seq_len (truncation=drop)",
                        name, self.dropped_too_long)
