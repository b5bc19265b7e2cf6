"""Parameter-efficient fine-tuning: LoRA / QLoRA layers and adapter utilities."""

from tinytune.modules.peft.lora import (
    LORA_MODULES,
    LoRALinear,
    canonical_lora_modules,
    lora_linear_factory,
)
from tinytune.modules.peft.utils import (
    disable_adapters,
    get_adapter_params,
    get_adapter_state_dict,
    get_merged_state_dict,
    lora_modules,
    merge_lora,
    set_trainable_params,
)

__all__ = [
    "LORA_MODULES",
    "LoRALinear",
    "canonical_lora_modules",
    "disable_adapters",
    "get_adapter_params",
    "get_adapter_state_dict",
    "get_merged_state_dict",
    "lora_linear_factory",
    "lora_modules",
    "merge_lora",
    "set_trainable_params",
]
