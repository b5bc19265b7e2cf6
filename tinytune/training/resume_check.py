"""The run fingerprint of a recipe config: what a checkpoint must match to be resumed by this run.

See :mod:`tinytune.checkpoint.fingerprint` for what is compared and how a mismatch is reported.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tinytune.checkpoint.fingerprint import run_fingerprint

# Config keys that change the training trajectory: a checkpoint written with other values is not
# this run's. Keys left out may change between the parts of one run: max_steps / epochs (the LR
# schedule is recomputed), logging, validation cadence, checkpoint cadence and retention,
# stop_after_steps, nan_policy, output and export settings, device placement and activation checkpointing.
# Every key is declared by some training recipe's settings (tinytune.config.recipe_settings; tested).
# batch_size and gradient_accumulation_steps are not here: the batch stream and
# tinytune.training.checkpointing.check_same_accumulation refuse those with their own messages.
TRAJECTORY_KEYS = (
    "seed",
    "dtype",
    "shuffle",
    "padding_free",
    "clip_grad_norm",
    "optimizer",
    "lr_scheduler",
    "model",
    "validation.split_ratio",
    "validation.split_size",
    "pad_to_multiple_of",
    "loraplus_lr_ratio",
    "neftune_noise_alpha",
    "beta",
    "label_smoothing",
    "loss",
    "gamma",  # dpo
    "desirable_weight",
    "undesirable_weight",  # kto
)
# The data is compared by content instead of by its config node (tinytune.checkpoint.fingerprint.dataset_identity:
# token-cache key = file digests + tokenizer + template + max_seq_len ..., sample count and order), so a moved
# but identical data file still resumes.


def trajectory_settings(cfg: DictConfig) -> dict[str, Any]:
    """``{key: plain value}`` of every :data:`TRAJECTORY_KEYS` entry (None when unset)."""
    out = {}
    for key in TRAJECTORY_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def config_fingerprint(cfg: DictConfig, model: nn.Module, dataset: Any, info: Any = None) -> dict[str, Any]:
    """This run's fingerprint: trained parameters, base model config, dataset identity, settings.

    Args:
        cfg: the recipe config.
        model: the model being trained (trainable parameters set).
        dataset: the training dataset.
        info: the base checkpoint's :class:`~tinytune.checkpoint.ModelInfo` (its ``hf_config``).

    Under ``torch.distributed`` this is a collective (every rank calls it).
    """
    fp = run_fingerprint(
        model=model,
        base_model_config=getattr(info, "hf_config", None),
        dataset=dataset,
        settings=trajectory_settings(cfg),
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # collective: pipeline stages hold different layers, so the run's trained parameters are the
        # union over the ranks (FSDP / TP ranks name the same parameters with their global shapes)
        layouts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(layouts, fp["trainable"])
        fp["trainable"] = {k: v for layout in layouts for k, v in sorted(layout.items())}
    return fp
