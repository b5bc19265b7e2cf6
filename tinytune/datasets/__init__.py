"""Datasets for SFT: readers, sample styles, prompt templates, exact loss masks, packing, collate,
length-grouped sampling, and a memory-mapped token cache.

Config builders: :func:`sft_dataset` (alias ``chat_dataset``), :func:`text_dataset`,
:func:`preference_dataset`, :func:`kto_dataset`, :func:`chitchat_dataset`, :func:`chatterbot_dataset`.
"""

from tinytune.datasets.cache import TokenCache, default_cache_dir
from tinytune.datasets.collate import packed_collate, padded_collate, preference_collate
from tinytune.datasets.corpora import chatterbot_dataset, chitchat_dataset
from tinytune.datasets.data_errors import DatasetError
from tinytune.datasets.encoding import IGNORE_INDEX, SampleEncoder, labels_from_mask
from tinytune.datasets.packing import PackedDataset, pack_bins
from tinytune.datasets.readers import iter_rows
from tinytune.datasets.sampler import GroupByLengthSampler
from tinytune.datasets.sft import (
    PreferenceDataset,
    TokenizedDataset,
    chat_dataset,
    preference_dataset,
    sft_dataset,
    text_dataset,
)
from tinytune.datasets.show import data_summary, dataset_stats, show_dataset
from tinytune.datasets.templates import TemplateError, get_template
from tinytune.datasets.unpaired import KTODataset, kto_collate, kto_dataset

__all__ = [
    "IGNORE_INDEX",
    "DatasetError",
    "GroupByLengthSampler",
    "KTODataset",
    "PackedDataset",
    "PreferenceDataset",
    "SampleEncoder",
    "TemplateError",
    "TokenCache",
    "TokenizedDataset",
    "chat_dataset",
    "chatterbot_dataset",
    "chitchat_dataset",
    "data_summary",
    "dataset_stats",
    "default_cache_dir",
    "get_template",
    "iter_rows",
    "kto_collate",
    "kto_dataset",
    "labels_from_mask",
    "pack_bins",
    "packed_collate",
    "padded_collate",
    "preference_collate",
    "preference_dataset",
    "sft_dataset",
    "show_dataset",
    "text_dataset",
]
