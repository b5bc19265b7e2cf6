"""``config.json`` parsing: HF model config -> normalised hyperparameters (:class:`ModelInfo`).

The normalised form is what the tinytune model builders need; the original config dict is kept
so that saving writes back an equivalent ``config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from tinytune.errors import TinytuneError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class CheckpointError(TinytuneError, ValueError):
    """A checkpoint on disk cannot be read or does not match the model; the message says why."""


@dataclass
class ModelInfo:
    """Hyperparameters of a decoder checkpoint plus where it came from.

    Attributes:
        model_type: HF ``model_type`` (``llama``, ``qwen2`` or ``qwen3``).
        vocab_size, dim, num_layers, num_heads, num_kv_heads, head_dim, hidden_dim: sizes.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        rope_scaling: Llama-3.1 style scaling dict (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``) or None.
        max_seq_len: ``max_position_embeddings``.
        tie_word_embeddings: output projection shares the embedding matrix.
        qkv_bias: q/k/v projections have biases (Qwen2).
        qk_norm: per-head RMSNorm on q and k (Qwen3).
        hf_config: the full ``config.json`` dict (written back on save).
        source_dir: directory the checkpoint was read from (tokenizer files are copied from it).
    """

    model_type: str
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_base: float
    max_seq_len: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    source_dir: str | None = None


def _require(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{where}: required field {key!r} is missing from config.json")
    return cfg[key]


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """Reads RoPE theta and scaling from both the transformers 4 and 5 config layouts."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type == "llama3":
        src = scaling if scaling else params
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in src]
        if missing:
            raise CheckpointError(f"config.json: llama3 rope scaling lacks {missing}")
        return float(theta), {k: src[k] for k in keys}
    raise CheckpointError(f"config.json: rope scaling type {rope_type!r} is not supported (supported: default, llama3)")


def model_info_from_hf_config(cfg: dict, source: str = "config.json") -> ModelInfo:
    """Builds a :class:`ModelInfo` from a parsed HF ``config.json`` dict.

    Args:
        cfg: the config dict.
        source: path used in error messages.

    Raises:
        CheckpointError: unsupported ``model_type`` or a missing required field.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; tinytune loads {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    dim = int(_require(cfg, "hidden_size", source))
    heads = int(_require(cfg, "num_attention_heads", source))
    theta, scaling = _rope(cfg)
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2/2.5 always carry q/k/v biases
    else:
        qkv_bias = bool(cfg.get("attention_bias", False))
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    tied_default = model_type != "llama"
    return ModelInfo(
        model_type=model_type,
        vocab_size=int(_require(cfg, "vocab_size", source)),
        dim=dim,
        num_layers=int(_require(cfg, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or dim // heads),
        hidden_dim=int(_require(cfg, "intermediate_size", source)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=theta,
        rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tied_default)),
        qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3",
        hf_config=dict(cfg),
    )


def read_model_info(path: str) -> ModelInfo:
    """Reads ``config.json`` from a checkpoint directory (or the file itself).

    Raises:
        CheckpointError: the file is missing, is not JSON, or describes an unsupported model.
    """
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{cfg_path}: not found. An HF checkpoint directory needs a config.json "
            "(convert GGUF files with `tune convert gguf PATH OUT_DIR`)."
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    info = model_info_from_hf_config(cfg, cfg_path)
    info.source_dir = os.path.dirname(os.path.abspath(cfg_path))
    return info


def hf_config_from_model_info(info: ModelInfo, dtype: str = "float32") -> dict:
    """Returns the ``config.json`` dict to write for ``info``.

    Starts from the original config (when there is one) so unknown fields survive a round trip,
    and overwrites every field tinytune knows from the normalised values.
    """
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    cfg = dict(info.hf_config)
    cfg.update(
        {
            "architectures": [arch[info.model_type]],
            "model_type": info.model_type,
            "vocab_size": info.vocab_size,
            "hidden_size": info.dim,
            "intermediate_size": info.hidden_dim,
            "num_hidden_layers": info.num_layers,
            "num_attention_heads": info.num_heads,
            "num_key_value_heads": info.num_kv_heads,
            "head_dim": info.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": info.norm_eps,
            "max_position_embeddings": info.max_seq_len,
            "tie_word_embeddings": info.tie_word_embeddings,
            "torch_dtype": dtype,  # transformers 4 name
            "dtype": dtype,  # transformers 5 name
        }
    )
    if info.model_type == "llama":
        cfg["attention_bias"] = info.qkv_bias
        cfg.setdefault("mlp_bias", False)
    # Write RoPE settings in the layout both transformers 4 and 5 read.
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = info.rope_base
    if info.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": "llama3", **info.rope_scaling}
    else:
        cfg.pop("rope_scaling", None)
    return cfg
