"""The identity fine-tune demo data: who the assistant is, plus some ordinary chat.

``data/identity.json`` (written for tinytune) holds question/answer pairs with ``{name}`` and
``{maker}`` placeholders (``identity``: name, maker, capabilities in a few dozen phrasings) and
plain general-knowledge pairs (``general``) mixed in so the model keeps answering normally.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from tinytune.datasets.cache import _hash_file
from tinytune.datasets.corpora import _build
from tinytune.datasets.data_errors import BadSampleLog, DatasetError

IDENTITY_FILE = os.path.join(os.path.dirname(__file__), "data", "identity.json")


def identity_rows(name: str, maker: str, general: bool = True, path: str = IDENTITY_FILE) -> list[dict]:
    """The identity conversations with ``name`` and ``maker`` filled in (plus the general ones).

    Returns:
        ``[{"messages": [user, assistant]}, ...]``: identity rows first, then general rows.

    Raises:
        DatasetError: an empty ``name``/``maker``.
    """
    for key, value in (("name", name), ("maker", maker)):
        if not isinstance(value, str) or not value.strip():
            raise DatasetError(
                f"identity_dataset: {key} must be a non-empty string, got {value!r}",
                hint=f"Set dataset.{key} in the config",
            )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    pairs = [(q, a.replace("{name}", name).replace("{maker}", maker)) for q, a in data["identity"]]
    if general:
        pairs += [tuple(p) for p in data["general"]]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def identity_dataset(
    tokenizer,
    *,
    name: str = "Tilly",
    maker: str = "Tinytune Labs",
    general: bool = True,
    template: Any = None,
    prompt_type: str | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    mask_history: bool = False,
    truncation: str = "prompt_first",
    packed: bool = False,
    packing_strategy: str = "ffd",
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_samples: bool = False,
    cache_dir: str | None = None,
    num_workers: int | None = None,
):
    """Identity fine-tune data (the ``make demo`` dataset) as chat samples.

    Args:
        name: the assistant's name put into the answers.
        maker: who made it.
        general: mix in the general-chat rows (keeps normal answers).
        (others: see :func:`tinytune.datasets.sft_dataset`.)
    """
    conversations = identity_rows(name, maker, general)
    fp = {"identity": _hash_file(IDENTITY_FILE), "name": name, "maker": maker, "general": general}

    def rows(bad: BadSampleLog | None) -> Iterator:
        for i, row in enumerate(conversations, 1):
            yield IDENTITY_FILE, i, row

    return _build(
        tokenizer,
        rows,
        fp,
        name="identity_dataset",
        template=template,
        prompt_type=prompt_type,
        system_prompt=system_prompt,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        mask_history=mask_history,
        truncation=truncation,
        packed=packed,
        packing_strategy=packing_strategy,
        split=split,
        val_fraction=val_fraction,
        seed=seed,
        cache_dir=cache_dir,
        num_workers=num_workers,
        skip_bad_samples=skip_bad_samples,
    )
