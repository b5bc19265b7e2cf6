"""Checkpoints: HF safetensors in/out, PEFT adapters, GGUF import, bundled model, training state."""

from tinytune.checkpoint.adapters import load_peft_adapter, merge_lora_state_dict, save_peft_adapter
from tinytune.checkpoint.bundled import ensure_bundled, ensure_smollm2, tinytune_home
from tinytune.checkpoint.gguf_convert import convert_gguf_to_hf
from tinytune.checkpoint.gguf_reader import GGUFModel, permute_qk, read_gguf, unpermute_qk
from tinytune.checkpoint.hf_writer import save_hf_checkpoint
from tinytune.checkpoint.keys import KeyMap, gguf_key_map, hf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo, read_model_info
from tinytune.checkpoint.model_loading import build_model, load_gguf_model, load_hf_model, resolve_dtype
from tinytune.checkpoint.reward_export import save_reward_checkpoint
from tinytune.checkpoint.training_state import (
    TrainingCheckpointer,
    apply_training_state,
    rng_state,
    set_rng_state,
)

__all__ = [
    "CheckpointError",
    "GGUFModel",
    "KeyMap",
    "ModelInfo",
    "TrainingCheckpointer",
    "apply_training_state",
    "build_model",
    "convert_gguf_to_hf",
    "ensure_bundled",
    "ensure_smollm2",
    "gguf_key_map",
    "hf_key_map",
    "load_gguf_model",
    "load_hf_model",
    "load_peft_adapter",
    "merge_lora_state_dict",
    "permute_qk",
    "read_gguf",
    "read_model_info",
    "save_reward_checkpoint",
    "resolve_dtype",
    "rng_state",
    "save_hf_checkpoint",
    "save_peft_adapter",
    "set_rng_state",
    "tinytune_home",
    "unpermute_qk",
]
