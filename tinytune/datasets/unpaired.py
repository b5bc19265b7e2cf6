"""Unpaired preference data for KTO: rows ``{prompt, completion, label}`` with a boolean label.

Each row becomes ``prompt_ids`` (the rendered prompt up to the answer, template scaffolding
included) and ``completion_ids`` (the trained answer tokens, end-of-turn included), so a
collate can join any prompt with any completion: KTO's KL estimate pairs each prompt with
another example's completion (:func:`tinytune.training.kto_step.mismatched_batches`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tinytune.datasets.collate import padded_collate
from tinytune.datasets.data_errors import DatasetError
from tinytune.datasets.encoding import IGNORE_INDEX, SampleEncoder
from tinytune.datasets.readers import _plain, apply_column_map, iter_rows
from tinytune.datasets.sft import _resolve_template, _split_indices
from tinytune.datasets.styles import ChatSample, _text, _turns, validate_conversation

log = logging.getLogger("tinytune.datasets")

KTO_COLUMNS = ("prompt", "completion", "label", "system")


def join_prompt_completion(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict[str, list[int]]:
    """One training sequence: ``tokens = prompt + completion``, labels pre-shifted onto the completion."""
    tokens = list(prompt_ids) + list(completion_ids)
    labels = [IGNORE_INDEX] * (len(prompt_ids) - 1) + list(completion_ids) + [IGNORE_INDEX]
    return {"tokens": tokens, "labels": labels}


def kto_collate(batch: Sequence[dict], pad_id: int = 0, pad_to_multiple_of: int | None = 8) -> dict[str, Any]:
    """Pads KTO items: ``tokens``/``labels [b, s]``, ``desirable`` bool ``[b]``, and the id lists
    ``prompt_ids`` / ``completion_ids`` (for the mismatched KL pairs)."""
    out = padded_collate(
        [join_prompt_completion(it["prompt_ids"], it["completion_ids"]) for it in batch],
        pad_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    out["desirable"] = torch.tensor([bool(it["label"]) for it in batch])
    out["prompt_ids"] = [list(it["prompt_ids"]) for it in batch]
    out["completion_ids"] = [list(it["completion_ids"]) for it in batch]
    return out


class KTODataset(Dataset):
    """KTO items ``{"prompt_ids", "completion_ids", "label"}``; ``collate_fn`` = :func:`kto_collate`."""

    def __init__(self, items: list[dict], indices: np.ndarray | None = None, pad_id: int = 0):
        self.items = items
        self.indices = np.arange(len(items)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.collate_fn = functools.partial(kto_collate, pad_id=pad_id)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every item, int64 [n]."""
        return np.array(
            [len(self.items[i]["prompt_ids"]) + len(self.items[i]["completion_ids"]) for i in self.indices],
            dtype=np.int64,
        )

    def __getitem__(self, i: int) -> dict:
        return self.items[int(self.indices[i])]


def _row_messages(row: Mapping, file: str, row_no: int, system_prompt: str | None) -> tuple[list[dict], bool]:
    for key in ("prompt", "completion", "label"):
        if key not in row or row[key] is None:
            raise DatasetError(
                f"missing column `{key}` (KTO rows need prompt, completion, label)",
                file=file,
                row=row_no,
                hint="Fix the row, map the column with column_map, or set skip_bad_samples: true",
            )
    label = row["label"]
    if not isinstance(label, bool):
        raise DatasetError(
            f"`label` must be true or false (got {label!r})",
            file=file,
            row=row_no,
            hint="Write JSON booleans: true = desirable completion, false = undesirable",
        )
    messages: list[dict] = []
    system = row.get("system") or system_prompt
    if system:
        messages.append({"role": "system", "content": _text(system, "system", file, row_no)})
    prompt = row["prompt"]
    if isinstance(prompt, list):
        messages += _turns(prompt, None, file, row_no, "prompt")
    else:
        messages.append({"role": "user", "content": _text(prompt, "prompt", file, row_no)})
    completion = row["completion"]
    if isinstance(completion, list):
        messages += _turns(completion, None, file, row_no, "completion")
    else:
        messages.append({"role": "assistant", "content": _text(completion, "completion", file, row_no)})
    return validate_conversation(messages, file, row_no), label


def _split_prompt_completion(tokens: list[int], labels: list[int], file: str, row_no: int):
    trained = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    if not trained:
        raise DatasetError(
            "the completion has no trained tokens after truncation",
            file=file,
            row=row_no,
            hint="Raise max_seq_len or shorten the row",
        )
    first, last = trained[0], trained[-1]
    if len(trained) != last - first + 1:
        raise DatasetError(
            "the completion's trained tokens are not contiguous (several answer turns?)",
            file=file,
            row=row_no,
            hint="KTO rows hold one answer: put earlier turns in `prompt`",
        )
    return tokens[: first + 1], labels[first : last + 1]


def kto_dataset(
    tokenizer,
    source: Any,
    *,
    template: Any = None,
    prompt_type: str | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    column_map: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    truncation: str = "prompt_first",
    enable_thinking: bool | None = None,
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_samples: bool = False,
) -> KTODataset:
    """KTO data: rows ``{"prompt", "completion", "label"}`` (optional ``system``).

    ``prompt`` is a string (one user turn) or a message list; ``completion`` a string or a list of
    assistant messages; ``label`` a JSON boolean (true: desirable). Rows are tokenized when the
    dataset is built (no token cache). Other columns are named in a warning and not used.

    Args:
        tokenizer: tinytune tokenizer.
        source: data file(s) or an in-memory list of rows.
        template, prompt_type, chat_template, system_prompt, column_map, max_seq_len, truncation,
            enable_thinking, split, val_fraction, seed, skip_bad_samples: as in
            :func:`tinytune.datasets.sft_dataset`.

    Raises:
        DatasetError: a bad row (missing column, non-boolean label), naming the file and row.
    """
    tmpl = _resolve_template(tokenizer, template, prompt_type, chat_template, "messages")
    encoder = SampleEncoder(
        tokenizer,
        tmpl,
        max_seq_len=max_seq_len,
        mask_history=True,
        truncation=truncation,
        enable_thinking=enable_thinking,
    )
    column_map = _plain(column_map)
    items: list[dict] = []
    unused: set[str] = set()
    skipped = dropped = 0
    for file, row_no, row in iter_rows(source):
        try:
            row = apply_column_map(row, column_map, file, row_no)
            unused.update(k for k in row if k not in KTO_COLUMNS)
            messages, label = _row_messages(row, file, row_no, system_prompt)
            (res,) = encoder.encode_samples([ChatSample(messages)])
            if res == "too_long":
                dropped += 1
                continue
            if isinstance(res, str):
                raise DatasetError(res, file=file, row=row_no)
            (enc,) = res
            prompt_ids, completion_ids = _split_prompt_completion(enc.tokens, enc.labels, file, row_no)
        except DatasetError:
            if not skip_bad_samples:
                raise
            skipped += 1
            continue
        items.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label})
    if unused:
        log.warning("kto_dataset: columns %s are not used (KTO reads %s)", sorted(unused), ", ".join(KTO_COLUMNS))
    if skipped or dropped:
        log.warning("kto_dataset: skipped %d bad row(s), dropped %d too-long row(s)", skipped, dropped)
    if not items:
        raise DatasetError("no usable rows", file=str(source), hint="Check the file and the column names")
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_id", None) or 0
    return KTODataset(items, _split_indices(len(items), split, val_fraction, seed), pad_id=pad_id)
