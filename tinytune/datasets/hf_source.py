"""Data from the Hugging Face ``datasets`` library (optional extra ``tinytune[hf]``).

``source`` may be a hub dataset id (``tatsu-lab/alpaca`` or ``hf://tatsu-lab/alpaca``), a hub-style
local folder (``README.md`` + ``data/<split>-*.parquet``, or any folder ``load_dataset`` reads), a
``save_to_disk`` folder, or an in-memory ``datasets.Dataset`` / ``DatasetDict`` /
``IterableDataset``. Rows then go through the same styles, templates, masking, packing and
token cache as file sources (:func:`tinytune.datasets.sft.build_token_cache`). With
``streaming: true`` rows are read and tokenized on the fly (:class:`StreamingSFTDataset`).

``datasets`` is imported inside the functions: it is an optional dependency.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

from torch.utils.data import IterableDataset

from tinytune.datasets.data_errors import DatasetError
from tinytune.datasets.encoding import DEFAULT_TRUNCATION, DROP_REASONS, SampleEncoder
from tinytune.datasets.readers import _plain
from tinytune.datasets.sft import _finish_sft, _resolve_template, build_token_cache, convert_row
from tinytune.datasets.styles import check_tags

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_EXT = re.compile(r"\.(jsonl?|csv|parquet|arrow|ipc|feather|txt)$", re.IGNORECASE)


def _datasets():
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise DatasetError(
            "this source needs the `datasets` library", hint="pip install 'tinytune[hf]' (or pip install datasets)"
        ) from None
    return datasets


def is_datasets_object(source: Any) -> bool:
    """True for ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset`` objects (no import)."""
    return type(source).__module__.split(".")[0] == "datasets"


def is_save_to_disk_dir(path: str) -> bool:
    """A ``save_to_disk`` folder: ``state.json`` (a Dataset) or ``dataset_dict.json`` (a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def is_hub_style_dir(path: str) -> bool:
    """A folder laid out like a hub dataset repo: ``README.md`` and a ``data/`` folder."""
    return os.path.isfile(os.path.join(path, "README.md")) and os.path.isdir(os.path.join(path, "data"))


def is_hf_source(source: Any) -> bool:
    """Whether :func:`hf_dataset` (the ``datasets`` library) should read ``source``.

    True for ``datasets`` objects, ``hf://`` ids, ``save_to_disk`` folders, hub-style folders, and
    ``ORG/NAME`` strings that are not an existing local path and have no data-file extension.
    """
    source = _plain(source)
    if is_datasets_object(source):
        return True
    if not isinstance(source, str):
        return False
    if source.startswith("hf://"):
        return True
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return is_save_to_disk_dir(path) or is_hub_style_dir(path)
    return not os.path.exists(path) and bool(_REPO_ID.match(source)) and not _FILE_EXT.search(source)


def _pick_split(obj: Any, split: str, label: str) -> Any:
    """``obj[split]`` for a DatasetDict; the object itself otherwise."""
    if isinstance(obj, Mapping):  # DatasetDict / IterableDatasetDict
        if split not in obj:
            raise DatasetError(
                f"split: {split!r} is not a split of {label}; available: {sorted(obj)}",
                hint="Fix `split` in the dataset config",
            )
        return obj[split]
    return obj


def load_hf_source(
    source: Any,
    *,
    name: str | None = None,
    split: str = "train",
    data_files: Any = None,
    revision: str | None = None,
    streaming: bool = False,
) -> tuple[Any, str]:
    """Opens a ``datasets`` source.

    Args:
        source: see the module docstring.
        name: subset (``load_dataset``'s config name).
        split: split name or ``load_dataset`` split expression (``train[:95%]``).
        data_files: ``load_dataset``'s ``data_files``.
        revision: hub branch, tag or commit.
        streaming: return an ``IterableDataset``.

    Returns:
        ``(dataset, label)``: a ``datasets.Dataset`` (``IterableDataset`` when streaming) and a
        short description for messages.

    Raises:
        DatasetError: a dataset or split that does not exist, no network, options that do not
            apply to the source.
    """
    datasets = _datasets()
    source = _plain(source)
    if is_datasets_object(source):
        label = f"<{type(source).__name__}>"
        ds = _pick_split(source, split, label)
        if streaming and isinstance(ds, datasets.Dataset):
            ds = ds.to_iterable_dataset()
        return ds, label
    path = os.path.expanduser(source[len("hf://") :] if source.startswith("hf://") else source)
    if os.path.isdir(path) and is_save_to_disk_dir(path):
        if name or data_files or revision:
            raise DatasetError(
                "name / data_files / revision do not apply to a save_to_disk folder",
                file=path,
                hint="Remove them from the dataset config",
            )
        ds = _pick_split(datasets.load_from_disk(path), split, path)
        return (ds.to_iterable_dataset() if streaming else ds), path
    try:
        ds = datasets.load_dataset(
            path, name, split=split, data_files=_plain(data_files), revision=revision, streaming=streaming
        )
    except datasets.exceptions.DatasetNotFoundError:
        raise DatasetError(
            f"source: dataset {source!r} does not exist on the Hugging Face Hub (or is gated/private: "
            "log in with `hf auth login` or set HF_TOKEN)",
            hint="Check the id at https://huggingface.co/datasets",
        ) from None
    except ConnectionError as e:
        raise DatasetError(
            f"source: dataset {source!r} is not in the local datasets cache and the hub cannot be "
            f"reached ({e}); no local file or folder of that name exists either",
            hint="Connect and rerun, or save it with save_to_disk on a machine with network and "
            "point `source` at that folder",
        ) from None
    except ValueError as e:
        m = re.search(r"Unknown split \"(.*?)\"\. Should be one of (\[.*?\])", str(e))
        if m:
            raise DatasetError(
                f"split: {m.group(1)!r} is not a split of {source}; available: {m.group(2)}",
                hint="Fix `split` in the dataset config",
            ) from None
        if "BuilderConfig" in str(e) or "Config name is missing" in str(e):
            raise DatasetError(
                f"name: subset {name!r} of {source}: {e}", hint="Fix `name` (the subset) in the dataset config"
            ) from None
        raise DatasetError(f"source: {source!r}: {e}", hint="Check the dataset options") from None
    except FileNotFoundError as e:
        raise DatasetError(f"source: {source!r}: {e}", hint="Check `source` and `data_files`") from None
    return ds, source


def check_columns(columns: list[str] | None, column_map: Mapping[str, str] | None, label: str) -> None:
    """Every column ``column_map`` names must exist (checked once, before any row is read).

    Raises:
        DatasetError: ``column_map.FIELD: column 'X' is not in SOURCE; columns: [...]``.
    """
    if not column_map or columns is None:
        return
    for field, column in _plain(column_map).items():
        if column not in columns:
            raise DatasetError(
                f"column_map.{field}: column {column!r} is not in {label}; columns: {sorted(columns)}",
                hint="Fix `column_map` in the dataset config",
            )


def _rows(ds: Any, label: str, max_samples: int | None) -> Iterator[tuple[str, int, dict]]:
    it = iter(ds)
    if max_samples is not None:
        it = itertools.islice(it, int(max_samples))
    for i, row in enumerate(it, 1):
        yield label, i, row


def _fingerprint(ds: Any, label: str) -> Any:
    fp = getattr(ds, "_fingerprint", None)
    if fp is None:  # iterable or unknown: no stable content hash, so no cache reuse
        return {"hf_uncached": os.urandom(8).hex()}
    return {"hf": label, "fingerprint": fp}


class StreamingSFTDataset(IterableDataset):
    """Rows of a streaming ``datasets.IterableDataset``, converted and tokenized on the fly.

    Yields ``{"tokens", "labels"}`` items (too-long samples are handled by ``truncation``; a
    ``drop`` skips them). Resumable: :meth:`state_dict` records how many source rows were read,
    :meth:`load_state_dict` skips that many. Iterating again starts a new pass (``epoch`` + 1).
    """

    def __init__(
        self,
        ds: Any,
        encoder: SampleEncoder,
        to_sample: Any,
        label: str,
        max_samples: int | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        self.ds = ds
        self.encoder = encoder
        self.to_sample = to_sample
        self.label = label
        self.max_samples = max_samples
        self.skip_bad_samples = skip_bad_samples
        self.rows_read = 0  # source rows consumed in the current pass
        self.epoch = 0
        self.dropped: dict[str, int] = {}  # by reason (encoding.DROP_REASONS)
        self.truncated: dict[str, int] = {}  # by reason
        self.cache_hit = False

    @property
    def dropped_too_long(self) -> int:
        """Samples dropped by ``truncation: drop``."""
        return self.dropped.get("too_long", 0)

    def __iter__(self) -> Iterator[dict]:
        start = self.rows_read
        rows = itertools.islice(iter(self.ds), start, self.max_samples)
        for i, row in enumerate(rows, start + 1):
            self.rows_read = i
            try:
                (res,) = self.encoder.encode_samples([self.to_sample(row, self.label, i)])
                if isinstance(res, str) and res not in DROP_REASONS:  # the template could not render it
                    raise DatasetError(res, file=self.label, row=i, hint="Fix the row or set skip_bad_samples: true")
            except DatasetError:
                if not self.skip_bad_samples:
                    raise
                continue
            if isinstance(res, str):  # dropped (truncation: drop, or nothing left to train)
                self.dropped[res] = self.dropped.get(res, 0) + 1
                continue
            reason = self.encoder.last_reasons[0]
            if reason:
                self.truncated[reason] = self.truncated.get(reason, 0) + 1
            for e in res:
                yield {"tokens": list(e.tokens), "labels": list(e.labels)}
        self.epoch += 1
        self.rows_read = 0

    def state_dict(self) -> dict[str, int]:
        """The position: source rows read in the current pass, and the pass."""
        return {"rows_read": self.rows_read, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continues after ``state["rows_read"]`` rows of pass ``state["epoch"]``."""
        self.rows_read = int(state["rows_read"])
        self.epoch = int(state["epoch"])


def hf_dataset(
    tokenizer,
    source: Any,
    *,
    name: str | None = None,
    split: str = "train",
    data_files: Any = None,
    revision: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
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
    skip_bad_samples: bool = False,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    tags: Mapping[str, str] | None = None,
):
    """SFT dataset from the ``datasets`` library.

    Args:
        tokenizer: tinytune tokenizer.
        source: hub id, hub-style folder, ``save_to_disk`` folder or ``datasets`` object.
        name: subset (config name) of a hub dataset.
        split: split or split expression (``train``, ``train[:95%]``; hold out with ``train[95%:]``).
        data_files: ``load_dataset``'s ``data_files``.
        revision: hub branch, tag or commit.
        streaming: read and tokenize on the fly (needs ``max_steps``; no packing, no epochs).
        max_samples: use only the first N rows.
        (others: see :func:`tinytune.datasets.sft_dataset`.)

    Returns:
        A map-style dataset like :func:`sft_dataset`'s, or a :class:`StreamingSFTDataset`.
    """
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise DatasetError(
            f"max_samples: expected a positive integer, got {max_samples!r}",
            hint="Fix `max_samples` in the dataset config",
        )
    ds, label = load_hf_source(
        source, name=name, split=split, data_files=data_files, revision=revision, streaming=streaming
    )
    check_columns(getattr(ds, "column_names", None), column_map, label)
    tmpl = _resolve_template(tokenizer, template, prompt_type, chat_template, style)
    if streaming:
        if packed:
            raise DatasetError(
                "packed: true does not apply to streaming: true (packing needs all lengths up front)",
                hint="Set packed: false, or streaming: false",
            )
        encoder = SampleEncoder(
            tokenizer,
            tmpl,
            max_seq_len=max_seq_len,
            train_on_input=train_on_input,
            mask_history=mask_history,
            truncation=truncation,
            enable_thinking=enable_thinking,
        )
        to_sample = partial(
            convert_row,
            style=style,
            column_map=_plain(column_map),
            system_prompt=system_prompt,
            want="sft",
            tags=check_tags(_plain(tags)),
        )
        return StreamingSFTDataset(ds, encoder, to_sample, label, max_samples, skip_bad_samples)
    if max_samples is not None:
        ds = ds.select(range(min(int(max_samples), len(ds))))
    fp = {**_fingerprint(ds, label), "split": split, "name": name, "max_samples": max_samples}
    cache, hit = build_token_cache(
        tokenizer,
        lambda bad: _rows(ds, label, None),
        fp,
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
        name=f"hf_dataset({label})",
    )
    return _finish_sft(
        tokenizer,
        cache,
        hit,
        split="all",
        val_fraction=0.0,
        seed=0,
        packed=packed,
        max_seq_len=max_seq_len,
        packing_strategy=packing_strategy,
    )


def sft_to_hf_dataset(tokenizer, source: Any, *, split: str, val_fraction: float, **kwargs):
    """:func:`tinytune.datasets.sft_dataset` with a ``datasets`` source: its ``train`` split.

    Raises:
        DatasetError: ``split``/``val_fraction`` hold-outs, which ``datasets`` sources express
            as split expressions in :func:`hf_dataset` instead.
    """
    if split != "train" or val_fraction:
        raise DatasetError(
            f"split={split!r} / val_fraction={val_fraction} hold-outs do not apply to a `datasets` "
            f"source ({source if isinstance(source, str) else type(source).__name__})",
            hint="Use _component_: tinytune.datasets.hf_source.hf_dataset with split: 'train[:95%]' "
            "for training and split: 'train[95%:]' for validation",
        )
    return hf_dataset(tokenizer, source, split="train", **kwargs)
