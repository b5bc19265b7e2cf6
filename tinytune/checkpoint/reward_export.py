"""Reward models as HF ``<Arch>ForSequenceClassification`` checkpoints (one label, ``score`` head)."""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from tinytune.checkpoint.atomic import write_file_atomic, write_json_atomic
from tinytune.checkpoint.hf_writer import save_hf_checkpoint
from tinytune.checkpoint.model_info import ModelInfo

SEQ_CLS_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}


def save_reward_checkpoint(
    decoder_state_dict: Mapping[str, torch.Tensor],
    score_weight: torch.Tensor,
    info: ModelInfo,
    out_dir: str,
    pad_token_id: int,
    tokenizer_dir: str | None = None,
    **kwargs,
) -> str:
    """Writes a reward model that ``transformers.AutoModelForSequenceClassification`` loads.

    The decoder goes out as for a causal LM (:func:`save_hf_checkpoint`, LoRA merged), then the
    ``lm_head`` is replaced by ``score.weight [1, dim]`` and ``config.json`` names the
    sequence-classification architecture with ``num_labels = 1`` and the ``pad_token_id`` the
    score position is found with.

    Args:
        decoder_state_dict: the decoder's state dict (tinytune names; LoRA keys are merged).
        score_weight: ``[1, dim]`` head weight.
        info: the decoder's :class:`ModelInfo`.
        out_dir: target directory.
        pad_token_id: padding id (HF scores the last token that is not this id).
        tokenizer_dir: where to copy tokenizer files from.
        **kwargs: passed to :func:`save_hf_checkpoint` (``max_shard_size``, ``dtype``, ``lora_cfg``).

    Returns:
        ``out_dir``.
    """
    save_hf_checkpoint(decoder_state_dict, info, out_dir, tokenizer_dir=tokenizer_dir, **kwargs)
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    index = None
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        shard = index["weight_map"].get("lm_head.weight") or sorted(set(index["weight_map"].values()))[0]
    else:
        shard = "model.safetensors"
    tensors = load_file(os.path.join(out_dir, shard))
    tensors.pop("lm_head.weight", None)
    ref = next(iter(tensors.values()))
    tensors["score.weight"] = score_weight.detach().to("cpu", ref.dtype).reshape(1, info.dim).contiguous()
    write_file_atomic(os.path.join(out_dir, shard), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if index is not None:
        index["weight_map"].pop("lm_head.weight", None)
        index["weight_map"]["score.weight"] = shard
        write_json_atomic(index_path, index)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(
        {
            "architectures": [SEQ_CLS_ARCHITECTURES[info.model_type]],
            "num_labels": 1,
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "pad_token_id": int(pad_token_id),
        }
    )
    write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.isfile(gen):  # a scoring model generates nothing
        os.remove(gen)
    return out_dir
