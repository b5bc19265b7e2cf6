"""The end-of-run export of a single-device policy: the PEFT adapter (LoRA) and the HF model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from tinytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from tinytune.config.recipe_settings import LoRASettings
from tinytune.modules.peft import get_adapter_params, get_merged_state_dict


def export_hf_model(
    model: nn.Module, info: Any, out_dir: str, checkpoint_dir: str, lora: LoRASettings | None = None
) -> dict[str, str]:
    """Writes ``out_dir/hf_model`` (HF safetensors) and, for a model with adapters, ``out_dir/adapter`` (PEFT).

    Args:
        model: the trained model (LoRA: exported merged, ``W + (alpha / rank) B A``).
        info: the checkpoint's model info.
        out_dir: the run's output directory.
        checkpoint_dir: the base checkpoint (its tokenizer files are copied; the adapter names it).
        lora: the LoRA settings of a model with adapters (written into ``adapter_config.json``).

    Returns:
        ``{"adapter_dir" (LoRA only), "hf_dir"}`` for the run summary.
    """
    paths = {}
    if get_adapter_params(model):
        paths["adapter_dir"] = save_peft_adapter(
            model, info, os.path.join(out_dir, "adapter"), lora, base_model_name_or_path=checkpoint_dir
        )
        sd = get_merged_state_dict(model)
    else:
        sd = model.state_dict()
    paths["hf_dir"] = save_hf_checkpoint(sd, info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir)
    return paths
