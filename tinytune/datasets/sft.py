"""Dataset builders usable from configs: ``sft_dataset``, ``text_dataset``, ``preference_dataset``.

Every builder reads rows, converts them to samples (``styles``), renders and tokenizes them with
exact loss masks (``templates``, ``encoding``) in worker processes into a memory-mapped token
cache (``cache``), then serves items lazily from it. A second build with the same inputs opens
the cache and does no tokenization.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from tinytune.datasets.cache import (
    TokenCache,
    build_cache,
    cache_key,
    default_cache_dir,
    fingerprint_source,
    fingerprint_template,
    fingerprint_tokenizer,
    load_or_build,
)
from tinytune.datasets.collate import preference_collate
from tinytune.datasets.data_errors import BadSampleLog, DatasetError
from tinytune.datasets.encoding import DEFAULT_TRUNCATION, SampleEncoder
from tinytune.datasets.packing import PackedDataset
from tinytune.datasets.readers import _plain, apply_column_map, iter_rows
from tinytune.datasets.styles import STYLES, ChatSample, PreferenceSample, check_tags, row_to_sample
from tinytune.datasets.templates import get_template

log = logging.getLogger("tinytune.datasets")

SPLITS = ("train", "validation", "all")


class TokenizedDataset(Dataset):
    """SFT items ``{"tokens": list[int], "labels": list[int]}`` read lazily from a token cache.

    Args:
        cache: the token cache.
        indices: which cached sequences this dataset exposes (None: all).
    """

    def __init__(self, cache: TokenCache, indices: np.ndarray | None = None, cache_hit: bool = False):
        self.cache = cache
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.cache_hit = cache_hit

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every item, int64 [n]."""
        return self.cache.lengths[self.indices]

    @property
    def meta(self) -> dict:
        """What the cache recorded when it was built (rows, skipped, dropped, timings)."""
        return self.cache.meta

    def __getitem__(self, i: int) -> dict:
        tokens, labels = self.cache.get(int(self.indices[i]))
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}


class PreferenceDataset(Dataset):
    """DPO items ``chosen_tokens, chosen_labels, rejected_tokens, rejected_labels`` from a token cache.

    ``collate_fn`` pads a batch of pairs into one ``[2b, s]`` batch (chosen rows first).
    """

    def __init__(self, cache: TokenCache, indices: np.ndarray | None = None, pad_id: int = 0, cache_hit: bool = False):
        self.cache = cache
        n = len(cache) // 2
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.collate_fn = functools.partial(preference_collate, pad_id=pad_id)
        self.cache_hit = cache_hit

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        """Longer of chosen/rejected per pair, int64 [n]."""
        lens = self.cache.lengths
        return np.maximum(lens[2 * self.indices], lens[2 * self.indices + 1])

    @property
    def meta(self) -> dict:
        return self.cache.meta

    def __getitem__(self, i: int) -> dict:
        k = int(self.indices[i])
        ct, cl = self.cache.get(2 * k)
        rt, rl = self.cache.get(2 * k + 1)
        return {
            "chosen_tokens": ct.tolist(),
            "chosen_labels": cl.tolist(),
            "rejected_tokens": rt.tolist(),
            "rejected_labels": rl.tolist(),
        }


def convert_row(
    row: Any,
    file: str,
    row_no: int,
    *,
    style: str,
    column_map: Mapping | None,
    system_prompt: str | None,
    want: str,
    tags: Mapping | None = None,
) -> Any:
    """Column-maps and converts one row to a sample (picklable for worker processes).

    Raises:
        DatasetError: for bad rows (missing columns, empty answers, roles out of order).
    """
    sample = row_to_sample(apply_column_map(row, column_map, file, row_no), style, file, row_no, tags)
    if want == "preference" and not isinstance(sample, PreferenceSample):
        raise DatasetError(
            f"expected a chosen/rejected pair, got a {type(sample).__name__}",
            file=file,
            row=row_no,
            hint="Use style: preference with `chosen`/`rejected` columns (see column_map)",
        )
    if want == "sft" and isinstance(sample, PreferenceSample):
        raise DatasetError(
            "a chosen/rejected pair in an SFT dataset",
            file=file,
            row=row_no,
            hint="Use preference_dataset for DPO data, or map a single answer column",
        )
    if system_prompt and isinstance(sample, ChatSample) and sample.messages[0]["role"] != "system":
        sample.messages.insert(0, {"role": "system", "content": system_prompt})
    if system_prompt and isinstance(sample, PreferenceSample) and sample.chosen[0]["role"] != "system":
        for conv in (sample.chosen, sample.rejected):
            conv.insert(0, {"role": "system", "content": system_prompt})
    return sample


def _resolve_template(tokenizer, template, prompt_type, chat_template, style):
    if prompt_type:
        if template is not None:
            raise DatasetError(
                f"both `template` ({template!r}) and `prompt_type` ({prompt_type!r}) are set",
                hint="Keep one: `prompt_type` names a MindSpeed prompt type, `template` a tinytune one",
            )
        template = f"mindspeed:{prompt_type}"
    if template is None:
        if style == "text":
            return None
        template = "hf" if (chat_template or getattr(tokenizer, "chat_template", None)) else "chatml"
        log.info(
            "no template given: using %r (%s)",
            template,
            "the tokenizer's chat template" if template == "hf" else "the tokenizer has no chat template",
        )
    kwargs = {"chat_template": chat_template} if template == "hf" and chat_template else {}
    return get_template(_plain(template), **kwargs).bind(tokenizer)


def _split_indices(n: int, split: str, val_fraction: float, seed: int) -> np.ndarray | None:
    if split not in SPLITS:
        raise DatasetError(
            f"unknown split {split!r}; choose from {', '.join(SPLITS)}", hint="Fix `split` in the dataset config"
        )
    if split == "all" or (split == "train" and not val_fraction):
        return None
    if not val_fraction or not 0 < val_fraction < 1:
        raise DatasetError(
            f"split={split!r} needs 0 < val_fraction < 1 (got {val_fraction})",
            hint="Set val_fraction (e.g. 0.05) or use a separate validation source",
        )
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise DatasetError(
            f"val_fraction={val_fraction} holds out all {n} samples", hint="Use a smaller val_fraction or more data"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_val] if split == "validation" else perm[n_val:])


def _default_workers(num_workers: int | None) -> int:
    if num_workers is not None:
        return max(1, int(num_workers))
    return max(1, min(4, os.cpu_count() or 1))


def build_token_cache(
    tokenizer,
    rows: Callable[[BadSampleLog], Iterable],
    source_fp: Any,
    *,
    kind: str,
    style: str,
    template=None,
    column_map: Mapping | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    mask_history: bool = False,
    truncation: str = DEFAULT_TRUNCATION,
    enable_thinking: bool | None = None,
    skip_bad_samples: bool = False,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    name: str = "dataset",
    tags: Mapping | None = None,
) -> tuple[TokenCache, bool]:
    """Opens or builds the token cache for a data source (shared by all builders).

    Args:
        tokenizer: tinytune tokenizer.
        rows: ``bad_log -> iterable of (file, row_number, row)`` (called only on a cache miss).
        source_fp: JSON-able fingerprint of the data (part of the cache key).
        kind: ``"sft"`` or ``"preference"``.
        (others: see :func:`sft_dataset`.)

    Returns:
        ``(cache, cache_hit)``.
    """
    if style not in STYLES:
        raise DatasetError(
            f"unknown style {style!r}; choose from {', '.join(STYLES)}", hint="Fix `style` in the dataset config"
        )
    column_map = _plain(column_map)
    tags = check_tags(_plain(tags))
    encoder = SampleEncoder(
        tokenizer,
        template,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        mask_history=mask_history,
        truncation=truncation,
        enable_thinking=enable_thinking,
    )
    parts = {
        "kind": kind,
        "source": source_fp,
        "tokenizer": fingerprint_tokenizer(tokenizer),
        "template": fingerprint_template(template),
        "style": style,
        "column_map": column_map,
        "system_prompt": system_prompt,
        "max_seq_len": max_seq_len,
        "train_on_input": train_on_input,
        "mask_history": mask_history,
        "truncation": truncation,
        "enable_thinking": enable_thinking,
        "skip_bad_samples": skip_bad_samples,
        "tags": tags,
    }
    key = cache_key(parts)
    cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
    to_sample = functools.partial(
        convert_row, style=style, column_map=column_map, system_prompt=system_prompt, want=kind, tags=tags
    )
    workers = _default_workers(num_workers)

    def build(path: str) -> TokenCache:
        bad = BadSampleLog()
        cache = build_cache(
            path,
            rows(bad if skip_bad_samples else None),
            encoder,
            to_sample,
            num_workers=workers,
            skip_bad_samples=skip_bad_samples,
            bad=bad,
            group=2 if kind == "preference" else 1,
            extra_meta={"name": name, "key_parts": parts},
        )
        m = cache.meta
        log.info(
            "%s: tokenized %d rows -> %d sequences, %d tokens in %.1fs with %d worker(s); cache %s",
            name,
            m["rows"],
            m["sequences"],
            m["tokens"],
            m["build_seconds"],
            workers,
            path,
        )
        bad.report(name)
        report_meta(name, m, built=True)
        return cache

    cache, hit = load_or_build(cache_dir, key, build)
    if hit:
        m = cache.meta
        log.info("%s: token cache hit (%d sequences) at %s", name, m["sequences"], cache.path)
        if m.get("skipped_bad") or m.get("dropped"):
            log.warning(
                "%s: this cache skipped %d bad row(s) and dropped %s when built",
                name,
                m.get("skipped_bad", 0),
                m.get("dropped") or "nothing",
            )
        report_meta(name, m, built=False)
    return cache, hit


def report_meta(name: str, meta: Mapping, *, built: bool) -> None:
    """Warns once per dataset about truncated samples and columns no style read."""
    truncated = meta.get("truncated") or {}
    if truncated:
        log.warning(
            "%s: truncated %s of %d row(s) to max_seq_len (by reason; `tune prepare-data --show` shows samples)",
            name,
            dict(sorted(truncated.items())),
            meta.get("rows", 0),
        )
    unused = meta.get("unused_columns") or {}
    if unused:
        log.warning(
            "%s: column(s) %s are in the data but the sample style does not use them (rows: %s); map them "
            "with `column_map` or drop them from the data",
            name,
            ", ".join(repr(c) for c in sorted(unused)),
            ", ".join(f"{c}={n}" for c, n in sorted(unused.items())),
        )


def _finish_sft(
    tokenizer,
    cache: TokenCache,
    hit: bool,
    *,
    split: str,
    val_fraction: float,
    seed: int,
    packed: bool,
    max_seq_len: int | None,
    packing_strategy: str,
):
    ds = TokenizedDataset(cache, _split_indices(len(cache), split, val_fraction, seed), cache_hit=hit)
    if not packed:
        return ds
    if not max_seq_len:
        raise DatasetError("packed: true needs max_seq_len", hint="Set max_seq_len in the dataset config")
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_id", None) or 0
    packed_ds = PackedDataset(ds, max_seq_len, pad_id=pad_id, strategy=packing_strategy)
    packed_ds.cache_hit = hit
    return packed_ds


def sft_dataset(
    tokenizer,
    source: Any,
    *,
    style: str = "auto",
    template: Any = None,
    prompt_type: str | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    column_map: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    mask_history: bool = False,
    truncation: str = DEFAULT_TRUNCATION,
    enable_thinking: bool | None = None,
    packed: bool = False,
    packing_strategy: str = "ffd",
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_samples: bool = False,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    tags: Mapping[str, str] | None = None,
):
    """Supervised fine-tuning dataset from files or a list of rows.

    Args:
        tokenizer: tinytune tokenizer.
        source: a file (.json .jsonl .csv .parquet .arrow .txt), a directory, a glob, a list of
            those, or a Python list of row dicts; or a ``datasets`` source (hub id, hub-style or
            ``save_to_disk`` folder, ``datasets.Dataset``: see :func:`tinytune.datasets.hf_source.hf_dataset`
            for its options).
        style: ``auto`` (per row from its keys), ``alpaca``, ``sharegpt``, ``messages``,
            ``prompt_completion``, ``text``.
        template: template name (see ``tinytune.datasets.templates``), a dict of template
            fields, or None (``hf`` when the tokenizer has a chat template, else ``chatml``).
        prompt_type: MindSpeed ``prompt_type`` name (overrides ``template``).
        chat_template: Jinja source or file for ``template: hf``.
        system_prompt: system message added to conversations that have none.
        column_map: ``{tinytune_field: dataset_column}``, e.g. ``{instruction: prompt, output: answer}``.
        max_seq_len: longest sample (see ``truncation``); required for packing.
        train_on_input: train on prompt tokens too.
        mask_history: train only on the last assistant turn.
        truncation: ``balanced`` (default: the prompt keeps a share, cut from the left; a cut
            answer loses its end-of-turn), ``prompt_first``, ``right`` or ``drop``; every
            truncated or dropped sample is counted by reason (see ``SampleEncoder``).
        tags: ShareGPT tag names (``role_tag content_tag user_tag assistant_tag system_tag
            observation_tag function_tag``), as MindSpeed's ``--map-keys`` ``tags``.
        enable_thinking: Qwen3: True/False/None (as-is).
        packed: pack samples into ``max_seq_len`` rows (items gain ``input_pos``/``seq_lens``).
        packing_strategy: ``ffd`` (best-fit decreasing) or ``greedy``.
        split: ``train``, ``validation`` or ``all``; with ``val_fraction`` a seeded hold-out.
        val_fraction: share held out for ``validation``.
        seed: split seed.
        skip_bad_samples: count and skip bad rows instead of raising ``DatasetError``.
        cache_dir: token cache directory (default ``$TINYTUNE_HOME/data_cache``).
        num_workers: tokenizer processes (default min(4, CPUs)).

    Returns:
        A map-style dataset of ``{"tokens", "labels"}`` items (``PackedDataset`` when packed),
        with a ``lengths`` array for length grouping and ``cache_hit``.
    """
    from tinytune.datasets import hf_source  # noqa: PLC0415  (hf_source builds on this module: a cycle)

    if hf_source.is_hf_source(source):  # hub id, save_to_disk / hub-style folder, `datasets` object
        return hf_source.sft_to_hf_dataset(
            tokenizer,
            source,
            split=split,
            val_fraction=val_fraction,
            style=style,
            template=template,
            prompt_type=prompt_type,
            chat_template=chat_template,
            system_prompt=system_prompt,
            column_map=column_map,
            max_seq_len=max_seq_len,
            train_on_input=train_on_input,
            mask_history=mask_history,
            truncation=truncation,
            enable_thinking=enable_thinking,
            packed=packed,
            packing_strategy=packing_strategy,
            skip_bad_samples=skip_bad_samples,
            cache_dir=cache_dir,
            num_workers=num_workers,
            tags=tags,
        )
    tmpl = _resolve_template(tokenizer, template, prompt_type, chat_template, style)
    cache, hit = build_token_cache(
        tokenizer,
        lambda bad: iter_rows(source, bad),
        fingerprint_source(source),
        kind="sft",
        style=style,
        template=tmpl,
        column_map=column_map,
        system_prompt=system_prompt,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        mask_history=mask_history,
        truncation=truncation,
        enable_thinking=enable_thinking,
        skip_bad_samples=skip_bad_samples,
        cache_dir=cache_dir,
        num_workers=num_workers,
        tags=tags,
        name=f"sft_dataset({source if isinstance(source, str) else type(source).__name__})",
    )
    return _finish_sft(
        tokenizer,
        cache,
        hit,
        split=split,
        val_fraction=val_fraction,
        seed=seed,
        packed=packed,
        max_seq_len=max_seq_len,
        packing_strategy=packing_strategy,
    )


chat_dataset = sft_dataset


def text_dataset(
    tokenizer,
    source: Any,
    *,
    column_map: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    packed: bool = False,
    **kwargs,
):
    """Continued pre-training on plain text: every token is trained; long texts are cut into
    ``max_seq_len`` chunks. Takes the same options as :func:`sft_dataset`."""
    return sft_dataset(
        tokenizer, source, style="text", column_map=column_map, max_seq_len=max_seq_len, packed=packed, **kwargs
    )


def preference_dataset(
    tokenizer,
    source: Any,
    *,
    template: Any = None,
    prompt_type: str | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    column_map: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    truncation: str = DEFAULT_TRUNCATION,
    enable_thinking: bool | None = None,
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_samples: bool = False,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    tags: Mapping[str, str] | None = None,
) -> PreferenceDataset:
    """DPO pairs: ``chosen``/``rejected`` as texts, turns or message lists, with a shared prompt from
    ``prompt`` (text or messages), alpaca ``instruction``/``input``/``history`` (MindSpeed's
    pairwise alpaca) or ShareGPT ``conversations`` (optional ``system``, ``tools``), or as full
    conversations. Only the final answer of each side is trained. Items hold
    ``chosen_tokens, chosen_labels, rejected_tokens, rejected_labels``; ``dataset.collate_fn`` pads
    a batch into ``[2b, s]`` (chosen first). Options as in :func:`sft_dataset`."""
    tmpl = _resolve_template(tokenizer, template, prompt_type, chat_template, "preference")
    cache, hit = build_token_cache(
        tokenizer,
        lambda bad: iter_rows(source, bad),
        fingerprint_source(source),
        kind="preference",
        style="preference",
        template=tmpl,
        column_map=column_map,
        system_prompt=system_prompt,
        max_seq_len=max_seq_len,
        mask_history=True,
        truncation=truncation,
        enable_thinking=enable_thinking,
        skip_bad_samples=skip_bad_samples,
        cache_dir=cache_dir,
        num_workers=num_workers,
        tags=tags,
        name="preference_dataset",
    )
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_id", None) or 0
    return PreferenceDataset(
        cache, _split_indices(len(cache) // 2, split, val_fraction, seed), pad_id=pad_id, cache_hit=hit
    )
