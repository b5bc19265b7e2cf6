"""Reading HF checkpoint weights lazily, one shard at a time, under tinytune names."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from tinytune.checkpoint.keys import KeyMap
from tinytune.checkpoint.model_info import CheckpointError


def find_weight_files(path: str) -> list[str]:
    """Lists the weight files of an HF checkpoint directory, in load order.

    Looks for (first match wins) ``model.safetensors.index.json``, ``*.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model*.bin``.

    Raises:
        CheckpointError: no weight files, or an index that names a missing shard.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    raise CheckpointError(f"{index}: names shard {name!r}, which is not in {path}")
            return [os.path.join(path, n) for n in files]
    st = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if st:
        return st
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        return bins
    raise CheckpointError(
        f"{path}: no weights found (expected model.safetensors, sharded *.safetensors with "
        "model.safetensors.index.json, or pytorch_model*.bin)"
    )


def list_keys(file: str) -> list[str]:
    """Tensor names stored in one weight file (reads only the header for safetensors)."""
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    return list(_load_bin(file).keys())


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"{file}: cannot be read as a PyTorch weights file with weights_only=True ({e})"
        ) from None


def _iter_file(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from _load_bin(file).items()


def iter_shards(
    path: str, keymap: KeyMap, dtype: torch.dtype | None = None, drop: set[str] | None = None
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yields ``(file, state_dict)`` per weight file with tinytune names.

    Only one shard's tensors are alive at a time (the caller drops them before the next).

    Args:
        path: checkpoint directory.
        keymap: HF <-> tinytune key map of the family.
        dtype: convert floating tensors to this dtype (None keeps the stored dtype).
        drop: tinytune names to skip (e.g. ``output.weight`` for a tied model).

    Raises:
        CheckpointError: a key in a file that the key table does not know.
    """
    drop = drop or set()
    for file in find_weight_files(path):
        out: dict[str, torch.Tensor] = {}
        for key, tensor in _iter_file(file):
            if keymap.is_ignored(key):
                continue
            name = keymap.to_tinytune(key)
            if name is None:
                raise CheckpointError(
                    f"{file}: unexpected key {key!r} (no row of the key table matches it; "
                    "is the config.json model_type right?)"
                )
            if name in drop:
                continue
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[name] = tensor
        yield file, out
