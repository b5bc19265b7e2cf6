"""See what you train: rendered samples with the trained tokens marked, and per-dataset statistics.

``show_dataset(ds, tokenizer, n)`` prints ``n`` samples (trained tokens in green on a terminal,
``[[...]]`` otherwise; ``tokens=True`` puts ``|`` between tokens) and then :func:`dataset_stats`:
rows read, rows skipped, samples dropped and truncated by reason, tokens, the trained-token
fraction, a length histogram and the columns the data had but the style did not read. Trained
means: the label that predicts the token is not ``IGNORE_INDEX`` (labels are pre-shifted).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from tinytune.datasets.encoding import IGNORE_INDEX

GREEN, RESET = "\x1b[32;1m", "\x1b[0m"


def _unwrap(ds: Any) -> Any:
    """The dataset that holds the token cache (through packing / subset wrappers)."""
    while not hasattr(ds, "cache") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return ds


def trained_flags(tokens: Sequence[int], labels: Sequence[int]) -> list[bool]:
    """Per token: True when it is trained (``labels[i - 1]`` is not ignored; token 0 never is)."""
    return [False] + [labels[i - 1] != IGNORE_INDEX for i in range(1, len(tokens))]


def format_sample(
    tokenizer, tokens: Sequence[int], labels: Sequence[int], *, color: bool = False, show_tokens: bool = False
) -> str:
    """Decodes a sequence with the trained stretches marked.

    Args:
        tokenizer: decodes ids (``decode(ids, skip_special_tokens=False)``).
        tokens: token ids [s].
        labels: pre-shifted labels [s].
        color: mark trained text in ANSI green instead of ``[[...]]``.
        show_tokens: put ``|`` between tokens.
    """
    flags = trained_flags(tokens, labels)
    out: list[str] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i < len(tokens) and flags[i] == flags[start]:
            continue
        ids = list(tokens[start:i])
        if show_tokens:
            text = "|".join(tokenizer.decode([t], skip_special_tokens=False) for t in ids)
        else:
            text = tokenizer.decode(ids, skip_special_tokens=False)
        if flags[start]:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        if show_tokens and out:
            text = "|" + text
        out.append(text)
        start = i
    return "".join(out)


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` per power-of-two length bin that holds sequences."""
    if len(lengths) == 0:
        return []
    top = int(max(1, lengths.max()))
    edges = [0] + [1 << k for k in range(0, top.bit_length() + 1)]
    counts, _ = np.histogram(lengths, bins=np.asarray(edges) + 0.5)
    return [(edges[k] + 1, edges[k + 1], int(c)) for k, c in enumerate(counts) if c]


def dataset_stats(ds: Any) -> dict:
    """Statistics of a built dataset from its token cache (all of the cache, before any split).

    Returns:
        ``rows``, ``skipped_bad``, ``dropped`` and ``truncated`` (by reason), ``sequences``,
        ``tokens``, ``trained_tokens``, ``trained_fraction``, ``length_histogram``, ``columns``
        (seen, with row counts) and ``unused_columns``.
    """
    base = _unwrap(ds)
    cache = getattr(base, "cache", None)
    meta = dict(getattr(cache, "meta", None) or getattr(base, "meta", {}) or {})
    lengths = np.asarray(cache.lengths) if cache is not None else np.zeros(0, dtype=np.int64)
    tokens, trained = int(meta.get("tokens", int(lengths.sum()))), int(meta.get("trained_tokens", 0))
    return {
        "rows": meta.get("rows"),
        "skipped_bad": meta.get("skipped_bad", 0),
        "dropped": meta.get("dropped", {}),
        "truncated": meta.get("truncated", {}),
        "sequences": meta.get("sequences", int(len(lengths))),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": round(trained / tokens, 4) if tokens else 0.0,
        "length_histogram": length_histogram(lengths),
        "columns": meta.get("columns", {}),
        "unused_columns": meta.get("unused_columns", {}),
    }


def data_summary(ds: Any) -> dict:
    """The part of :func:`dataset_stats` a training summary records (counts by reason, no histogram)."""
    st = dataset_stats(ds)
    keys = ("rows", "sequences", "skipped_bad", "dropped", "truncated", "trained_fraction", "unused_columns")
    return {k: st[k] for k in keys}


def format_stats(stats: dict, name: str = "dataset") -> str:
    """The statistics as readable lines."""
    lines = [
        f"{name}: {stats['rows']} rows read -> {stats['sequences']} sequences, {stats['tokens']} tokens, "
        f"{stats['trained_tokens']} trained ({100 * stats['trained_fraction']:.1f}%)",
        f"  skipped bad rows: {stats['skipped_bad']}",
        f"  dropped: {_by_reason(stats['dropped'])}",
        f"  truncated: {_by_reason(stats['truncated'])}",
        f"  columns seen: {_by_reason(stats['columns'])}",
        f"  columns not used: {', '.join(sorted(stats['unused_columns'])) or 'none'}",
        "  length histogram (tokens per sequence):",
    ]
    hist = stats["length_histogram"]
    peak = max((c for _, _, c in hist), default=1)
    for lo, hi, c in hist:
        lines.append(f"    {lo:>6}-{hi:<6} {'#' * max(1, round(40 * c / peak)):<40} {c}")
    return "\n".join(lines)


def _by_reason(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def show_dataset(
    ds: Any,
    tokenizer,
    n: int = 3,
    *,
    color: bool | None = None,
    show_tokens: bool = False,
    name: str = "dataset",
    file: IO[str] | None = None,
) -> dict:
    """Prints ``n`` rendered samples with the trained tokens marked, then :func:`dataset_stats`.

    Args:
        ds: a dataset built by ``sft_dataset`` / ``preference_dataset`` (packed or not).
        tokenizer: the tokenizer it was built with.
        n: samples to print (the first ``n`` items of the dataset's split, before packing).
        color: ANSI colour (default: when ``file`` is a terminal), else ``[[...]]`` brackets.
        show_tokens: put ``|`` between tokens.
        name: label for the output.
        file: where to print (default stdout).

    Returns:
        The statistics dict.
    """
    file = file or sys.stdout
    if color is None:
        color = bool(getattr(file, "isatty", lambda: False)())
    base = _unwrap(ds)
    cache = getattr(base, "cache", None)
    group = int((getattr(cache, "meta", {}) or {}).get("group", 1))
    if cache is not None:
        items = getattr(base, "indices", None)
        items = np.arange(len(cache) // group) if items is None else np.asarray(items)
        for k in items[:n].tolist():
            for j in range(group):
                tokens, labels = cache.get(k * group + j)
                tag = ("", " chosen", " rejected")[j + 1 if group == 2 else 0]
                print(f"--- {name} sample {k}{tag} ({len(tokens)} tokens) ---", file=file)
                print(
                    format_sample(tokenizer, tokens.tolist(), labels.tolist(), color=color, show_tokens=show_tokens),
                    file=file,
                )
    stats = dataset_stats(ds)
    print(format_stats(stats, name), file=file)
    items = getattr(base, "indices", None)
    if cache is not None and items is not None and len(items) != len(cache) // group:
        print(
            f"  this split: {len(items)} of {len(cache) // group} items (the counts above are for all rows)", file=file
        )
    return stats
