"""Writing HF-format checkpoints: sharded safetensors, index, config, generation config, tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tinytune.checkpoint.adapters import is_lora_key, lora_scaling_from, merge_lora_state_dict
from tinytune.checkpoint.atomic import fsync_dir, write_file_atomic, write_json_atomic
from tinytune.checkpoint.keys import hf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo, hf_config_from_model_info
from tinytune.checkpoint.tensors import to_plain_tensor

# Files copied verbatim from the source checkpoint directory when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"200MB"``, ``"10KB"``, ``"1000"`` or an int -> bytes (decimal units, like HF)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or an int")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(num * mult[unit])


def state_dict_to_hf(
    state_dict: Mapping[str, torch.Tensor], info: ModelInfo, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Renames a tinytune state dict to HF keys (dropping a tied ``output.weight``).

    Raises:
        CheckpointError: a key has no HF equivalent (e.g. LoRA keys that were not merged).
    """
    keymap = hf_key_map(info.model_type)
    if not info.tie_word_embeddings and "output.weight" not in state_dict:
        raise CheckpointError(
            "state dict has no 'output.weight' but info.tie_word_embeddings is False; "
            "set info.tie_word_embeddings = True for a model with tied embeddings"
        )
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name == "output.weight" and info.tie_word_embeddings:
            continue
        if is_lora_key(name):
            raise CheckpointError(
                f"state dict key {name!r} is a LoRA weight; merge it first (pass lora_cfg= to "
                "save_hf_checkpoint, or use save_peft_adapter to save the adapter alone)"
            )
        hf = keymap.to_external(name)
        if hf is None:
            raise CheckpointError(f"state dict key {name!r} has no HF name in the {info.model_type} key table")
        out[hf] = to_plain_tensor(t, dtype)
    return out


def _tokenizer_source(info: ModelInfo, tokenizer_dir: str | None) -> str | None:
    src = tokenizer_dir or info.source_dir
    return src if src and os.path.isdir(src) else None


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
    """Copies the known tokenizer files from ``src_dir`` to ``out_dir``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
            write_file_atomic(os.path.join(out_dir, name), lambda p, s=src: shutil.copyfile(s, p))
            copied.append(name)
    return copied


def generation_config_for(info: ModelInfo, src_dir: str | None) -> dict:
    """The source ``generation_config.json`` if there is one, else one built from the config ids."""
    if src_dir:
        p = os.path.join(src_dir, "generation_config.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return json.load(f)
    cfg = {
        k: info.hf_config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if info.hf_config.get(k) is not None
    }
    return {"_from_model_config": True, **cfg}


def save_hf_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    info: ModelInfo,
    out_dir: str,
    tokenizer_dir: str | None = None,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    lora_cfg: Mapping[str, Any] | None = None,
) -> str:
    """Writes an HF checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when larger than ``max_shard_size``), ``config.json``,
    ``generation_config.json`` and the tokenizer files of ``tokenizer_dir`` (default: the
    directory the model was loaded from). Each file is written to a temp name and renamed.

    LoRA weights in the state dict are merged (``W + alpha/r * B @ A``); the scaling comes from
    ``lora_cfg`` (``lora_rank``/``lora_alpha``) or from the model's LoRA modules.

    Args:
        model_or_state_dict: a tinytune model or its state dict (tinytune names).
        info: the :class:`ModelInfo` the model was loaded/built with.
        out_dir: target directory (created; stale shards of an earlier save are removed).
        tokenizer_dir: where to copy tokenizer files from.
        max_shard_size: bytes or a string like ``"2GB"``.
        dtype: cast floating tensors (default: keep).
        lora_cfg: LoRA settings for merging.

    Returns:
        ``out_dir``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        sd = dict(model_or_state_dict.state_dict())
        model = model_or_state_dict
    else:
        sd, model = dict(model_or_state_dict), None
    if any(is_lora_key(k) for k in sd):
        sd = merge_lora_state_dict(sd, lora_scaling_from(lora_cfg, model, sd))
    hf_sd = state_dict_to_hf(sd, info, dtype)
    del sd
    os.makedirs(out_dir, exist_ok=True)
    limit = parse_size(max_shard_size)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in hf_sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n

    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for old in os.listdir(out_dir):  # stale files of an earlier save with another shard count
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", old) and old not in names:
            os.remove(os.path.join(out_dir, old))
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards):
        write_file_atomic(os.path.join(out_dir, name), lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        write_json_atomic(
            os.path.join(out_dir, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    first = next(iter(hf_sd.values()))
    dtype_name = _DTYPE_NAMES.get(first.dtype, "float32")
    write_json_atomic(os.path.join(out_dir, "config.json"), hf_config_from_model_info(info, dtype_name))
    src = _tokenizer_source(info, tokenizer_dir)
    write_json_atomic(os.path.join(out_dir, "generation_config.json"), generation_config_for(info, src))
    if src:
        copy_tokenizer_files(src, out_dir)
    fsync_dir(out_dir)
    return out_dir
