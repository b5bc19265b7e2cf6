"""Building tinytune models from HF checkpoints and GGUF files (meta-device init + assign)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from tinytune.checkpoint.adapters import is_lora_key
from tinytune.checkpoint.builder_check import check_builder_matches
from tinytune.checkpoint.gguf_reader import read_gguf
from tinytune.checkpoint.hf_reader import find_weight_files, iter_shards, list_keys
from tinytune.checkpoint.keys import hf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo, read_model_info
from tinytune.errors import NonFiniteError
from tinytune.models import llama_decoder, qwen2_decoder, qwen3_decoder


def _builders() -> dict[str, Callable[..., nn.Module]]:
    """HF ``model_type`` -> component builder (imported lazily to keep this module light)."""

    return {"llama": llama_decoder, "qwen2": qwen2_decoder, "qwen3": qwen3_decoder}


def build_model(info: ModelInfo, linear_factory: Callable | None = None) -> nn.Module:
    """Builds the tinytune model a :class:`ModelInfo` describes (on the current default device).

    Args:
        info: hyperparameters.
        linear_factory: passed to the component builder (e.g. a LoRA factory).
    """
    builders = _builders()
    if info.model_type not in builders:
        raise CheckpointError(f"no builder for model_type {info.model_type!r}; supported: {sorted(builders)}")
    if info.model_type == "llama" and info.qkv_bias:
        raise CheckpointError("llama checkpoints with attention_bias=true are not supported")
    kwargs: dict[str, Any] = dict(
        vocab_size=info.vocab_size,
        dim=info.dim,
        n_layers=info.num_layers,
        n_heads=info.num_heads,
        n_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        hidden_dim=info.hidden_dim,
        max_seq_len=info.max_seq_len,
        rope_base=info.rope_base,
        norm_eps=info.norm_eps,
        tie_embeddings=info.tie_word_embeddings,
        linear_factory=linear_factory,
    )
    if info.model_type == "llama":
        kwargs["rope_scaling"] = info.rope_scaling
    elif info.rope_scaling:
        raise CheckpointError(f"rope scaling is only supported for llama, not {info.model_type}")
    return builders[info.model_type](**kwargs)


def base_read_in_full(model: nn.Module) -> bool:
    """Whether a LoRA layer of ``model`` reads its base weight when it initialises or stores it:
    DoRA's magnitude (row norms of the adapted weight), PiSSA (an SVD of the base), an NF4 base
    (quantised from the loaded weight). Those need the checkpoint at full precision."""
    return any(
        getattr(m, "quantize_base", False) or getattr(m, "use_dora", False) or getattr(m, "init", None) == "pissa"
        for m in model.modules()
        if hasattr(m, "reset_lora_parameters")
    )


def _materialize_missing(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Gives LoRA modules whose adapters were not in the checkpoint real storage and fresh init."""
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.is_meta for t in own):
            module.to_empty(device=device, recurse=False)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters()
            for sub in (getattr(module, "lora_a", None), getattr(module, "lora_b", None)):
                if sub is not None:
                    sub.to(dtype)


def load_state_into_meta_model(
    model: nn.Module,
    shards: Iterable[tuple[str, dict[str, torch.Tensor]]],
    where: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    frozen_dtype: torch.dtype | None = None,
) -> None:
    """Assigns checkpoint tensors into a model built on the meta device, one shard at a time.

    Parameters the checkpoint lacks are an error, except LoRA adapters, which get their fresh
    initialisation.

    ``frozen_dtype`` is for a LoRA run under mixed precision, which keeps its frozen base in bf16
    and its fresh adapters in fp32. Loading the base in ``dtype`` and casting it afterwards gives
    the same bits (the cast rounds once either way) but holds an fp32 copy of the whole model
    first: twice the memory a bf16 base needs, at load and, as freed heap, after it. So the
    checkpoint goes to ``frozen_dtype`` directly and the adapters are initialised in ``dtype`` as
    before (same random draws), unless a LoRA layer reads its base to initialise or store it
    (:func:`base_read_in_full`: DoRA, PiSSA, NF4), which needs full precision: then everything
    loads in ``dtype`` and the caller casts the frozen weights as before.

    Args:
        model: model whose parameters are on the meta device (or real: then they are replaced).
        shards: ``(file, state_dict)`` pairs with tinytune names.
        where: checkpoint path for error messages.
        device: where the loaded tensors go.
        dtype: dtype of floating tensors (and of the fresh LoRA adapters).
        frozen_dtype: dtype of the checkpoint's tensors when all of them stay frozen (see above).

    Raises:
        CheckpointError: unexpected key, shape mismatch, or missing keys (named with the file).
        NonFiniteError: a tensor holding NaN/Inf (named with the file).
    """
    device = torch.device(device)
    adapter_dtype = dtype
    if frozen_dtype is not None and not base_read_in_full(model):
        dtype = frozen_dtype
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    loaded: set[str] = set()
    for file, sd in shards:
        for k, t in sd.items():
            if k not in expected:
                raise CheckpointError(
                    f"{file}: unexpected key {k!r}: the model has no such parameter "
                    "(wrong model_type / builder for this checkpoint?)"
                )
            if tuple(t.shape) != expected[k]:
                raise CheckpointError(
                    f"{file}: key {k!r} has shape {tuple(t.shape)} but the model expects {expected[k]}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteError(
                    f"{file}: tensor {k!r} holds {bad} NaN/Inf value(s) of {t.numel()}; the checkpoint is corrupt "
                    "(a bad download, conversion or disk). Re-download or re-convert it; training on it gives NaN"
                )
        sd = {k: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)) for k, t in sd.items()}
        model.load_state_dict(sd, strict=False, assign=True)
        loaded.update(sd)
        del sd
    missing = sorted(k for k in expected if k not in loaded and not is_lora_key(k))
    if missing:
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise CheckpointError(f"{where}: checkpoint lacks parameters {missing[:6]}{more}")
    _materialize_missing(model, device, adapter_dtype)
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise CheckpointError(f"{where}: parameters left uninitialised after loading: {still[:6]}")


def _checkpoint_has_lm_head(path: str) -> bool:
    for file in find_weight_files(path):
        if "lm_head.weight" in list_keys(file):
            return True
    return False


def load_hf_model(
    path: str,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    model_builder: Callable[[], nn.Module] | None = None,
    linear_factory: Callable | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Loads an HF checkpoint directory into a tinytune model.

    Reads ``config.json`` to pick the builder (llama incl. SmolLM2 / Llama 2 / Llama 3.x with
    rope scaling, qwen2, qwen3), builds the model on the meta device and assigns the weights
    shard by shard (``*.safetensors`` via ``safe_open``, or ``pytorch_model*.bin`` with
    ``weights_only=True``), so peak memory stays near one model copy. A checkpoint without
    ``lm_head.weight`` gets tied embeddings.

    Args:
        path: checkpoint directory (a ``.gguf`` file is passed on to :func:`load_gguf_model`).
        dtype: dtype of the model's floating parameters (``torch.bfloat16`` or ``"bf16"`` etc.).
        device: where the parameters go.
        model_builder: zero-argument callable building the model instead of the config-driven
            builder (e.g. a LoRA builder); every hyperparameter must match config.json
            (:func:`tinytune.checkpoint.builder_check.check_builder_matches`).
        linear_factory: passed to the config-driven builder (e.g. a LoRA factory).
        frozen_dtype: LoRA under mixed precision (see :func:`load_state_into_meta_model`):
            the checkpoint's weights, all frozen, are read straight into this dtype and the fresh
            adapters are made in ``dtype``.

    Returns:
        ``(model, info)``.

    Raises:
        CheckpointError: unreadable config, unsupported model, missing / unexpected keys or
            shape mismatches (the message names the key and the file).
    """
    if os.path.isfile(path) and path.endswith(".gguf"):
        return load_gguf_model(
            path, dtype, device, linear_factory=linear_factory, model_builder=model_builder, frozen_dtype=frozen_dtype
        )
    dtype = resolve_dtype(dtype)
    path = os.path.abspath(path)
    info = read_model_info(path)
    keymap = hf_key_map(info.model_type)
    if not _checkpoint_has_lm_head(path):
        info.tie_word_embeddings = True
    drop = {"output.weight"} if info.tie_word_embeddings else set()
    with torch.device("meta"):
        model = model_builder() if model_builder is not None else build_model(info, linear_factory)
    if model_builder is not None:
        check_builder_matches(model, info, path)
    load_state_into_meta_model(
        model, iter_shards(path, keymap, dtype=None, drop=drop), path, device, dtype, frozen_dtype
    )
    return model, info


def load_gguf_model(
    path: str,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    linear_factory: Callable | None = None,
    model_builder: Callable[[], nn.Module] | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Loads a llama-architecture GGUF file (dequantized) into a tinytune model.

    Args:
        path: ``.gguf`` file.
        dtype: parameter dtype.
        device: parameter device.
        linear_factory: passed to the builder (e.g. a LoRA factory).
        model_builder: zero-argument callable building the model instead (shapes must match).
        frozen_dtype: as in :func:`load_hf_model`.

    Returns:
        ``(model, info)``.
    """

    dtype = resolve_dtype(dtype)
    g = read_gguf(path)
    drop = {"output.weight"} if g.info.tie_word_embeddings else set()
    with torch.device("meta"):
        model = model_builder() if model_builder is not None else build_model(g.info, linear_factory)
    if model_builder is not None:
        check_builder_matches(model, g.info, path)
    sd = {k: v for k, v in g.state_dict.items() if k not in drop}
    load_state_into_meta_model(model, [(path, sd)], path, device, dtype, frozen_dtype)
    return model, g.info


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.dtype`` or a name like ``"bf16"`` / ``"float32"`` -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]
