"""Error type and "did you mean" helpers shared by the config system and the ``tune`` CLI.

Kept free of heavy imports: the ``tune`` command imports this module on every start.
"""

from __future__ import annotations

import difflib
from typing import Iterable

from tinytune.errors import TinytuneError


class ConfigError(TinytuneError, ValueError):
    """A problem with a config file, an override or a ``_component_`` path.

    The message always names what is wrong (the key, the file, the value) and, where it can,
    what to do about it. Entry points (``tune``, ``tinytune.config.parse``) print it without a
    traceback.
    """


def close_matches(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Return up to ``n`` candidates that look like a misspelling of ``word``.

    Args:
        word: The misspelt name.
        candidates: Valid names.
        n: Most matches to return.
        cutoff: Similarity threshold in [0, 1] (difflib ratio).

    Returns:
        The closest candidates, best first.
    """
    uniq = sorted({str(c) for c in candidates})
    matches = difflib.get_close_matches(word, uniq, n=n, cutoff=cutoff)
    if not matches:
        # Case differences and prefix typos score low in difflib; try a case-folded pass.
        folded = {c.lower(): c for c in uniq}
        matches = [folded[m] for m in difflib.get_close_matches(word.lower(), list(folded), n=n, cutoff=cutoff)]
    return matches


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """Format a " Did you mean ...?" hint, or an empty string when nothing is close."""
    matches = close_matches(word, candidates, n=n)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
