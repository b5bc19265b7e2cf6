"""Checks that an explicit model builder builds the architecture the checkpoint's config.json describes.

A builder (``model._component_: ...lora_smollm2_135m``) fixes sizes and constants in code; the
checkpoint's ``config.json`` describes the weights. Shapes that disagree fail when the weights
are loaded, but constants (``rope_theta``, ``rms_norm_eps``) and some head layouts do not change
any shape: the model would train with the builder's values while the export keeps config.json's.
Every field is compared up front instead, with config.json's names in the message.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tinytune.checkpoint.model_info import CheckpointError, ModelInfo
from tinytune.modules.position_embeddings import check_rope_scaling


def model_hparams(model: nn.Module) -> dict[str, Any]:
    """The hyperparameters a built decoder embodies, under HF ``config.json`` names (works on meta).

    Fields the model does not expose (not a tinytune decoder) are left out.
    """
    out: dict[str, Any] = {}
    emb = getattr(model, "tok_embeddings", None)
    layers = getattr(model, "layers", None)
    if emb is not None:
        out["vocab_size"], out["hidden_size"] = int(emb.weight.shape[0]), int(emb.weight.shape[1])
    if layers is None or len(layers) == 0:
        return out
    out["num_hidden_layers"] = len(layers)
    attn = getattr(layers[0], "attn", None)
    if attn is not None:
        out["num_attention_heads"] = int(attn.n_heads)
        out["num_key_value_heads"] = int(attn.n_kv_heads)
        out["head_dim"] = int(attn.head_dim)
        out["qk_norm"] = attn.q_norm is not None
        rope = getattr(attn, "pos_embeddings", None)
        if rope is not None:
            out["rope_theta"] = float(rope.base)
            out["rope_scaling"] = getattr(rope, "rope_scaling", None)
    sd_shapes = {k: tuple(v.shape) for k, v in layers[0].state_dict(keep_vars=True).items()}
    for key in ("mlp.gate_proj.weight", "mlp.gate_proj.base.weight"):
        if key in sd_shapes:
            out["intermediate_size"] = int(sd_shapes[key][0])
            break
    out["attention_bias"] = any(k.startswith("attn.q_proj") and k.endswith("bias") for k in sd_shapes)
    norm = getattr(layers[0], "sa_norm", None)
    if norm is not None and hasattr(norm, "eps"):
        out["rms_norm_eps"] = float(norm.eps)
    if hasattr(model, "is_tied"):
        out["tie_word_embeddings"] = bool(model.is_tied)
    return out


def info_hparams(info: ModelInfo) -> dict[str, Any]:
    """The same fields as :func:`model_hparams`, from a checkpoint's :class:`ModelInfo`."""
    return {
        "vocab_size": info.vocab_size,
        "hidden_size": info.dim,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_heads,
        "num_key_value_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "qk_norm": bool(info.qk_norm),
        "rope_theta": float(info.rope_base),
        "rope_scaling": check_rope_scaling(info.rope_scaling),
        "intermediate_size": info.hidden_dim,
        "attention_bias": bool(info.qkv_bias),
        "rms_norm_eps": float(info.norm_eps),
        "tie_word_embeddings": bool(info.tie_word_embeddings),
    }


def check_builder_matches(model: nn.Module, info: ModelInfo, where: str) -> None:
    """Refuses a built model whose hyperparameters differ from the checkpoint's config.json.

    Raises:
        CheckpointError: naming every differing field with both values.
    """
    built, want = model_hparams(model), info_hparams(info)
    diffs = [f"{k}: builder {built[k]!r}, config.json {want[k]!r}" for k in want if k in built and built[k] != want[k]]
    if diffs:
        raise CheckpointError(
            f"{where}/config.json: the model builder disagrees with the checkpoint in {len(diffs)} field(s): "
            + "; ".join(diffs)
            + ". Use the builder for this checkpoint, or drop model._component_ and keep only "
            "the LoRA keys (model.lora_attn_modules, lora_rank, ...) to build from config.json"
        )
