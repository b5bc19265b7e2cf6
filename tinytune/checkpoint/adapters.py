"""LoRA weights: merging into base weights, and PEFT-format adapter save/load.

tinytune LoRA names (docs/ARCHITECTURE.md): ``<proj>.lora_a.weight [r, in]`` and
``<proj>.lora_b.weight [out, r]`` next to the base ``<proj>.weight``. PEFT names the same
tensors ``base_model.model.<hf proj>.lora_A.weight`` / ``lora_B.weight``; DoRA's magnitude
``<proj>.lora_magnitude.weight [out]`` is PEFT's ``<hf proj>.lora_magnitude_vector``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinytune.checkpoint.atomic import write_file_atomic, write_json_atomic
from tinytune.checkpoint.keys import hf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo
from tinytune.checkpoint.tensors import to_plain_tensor
from tinytune.config.recipe_settings import LoRASettings
from tinytune.modules.peft.lora import pissa_as_lora

_LORA_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".lora_magnitude.weight")
PEFT_PREFIX = "base_model.model."


def is_lora_key(name: str) -> bool:
    """True for ``...lora_a.weight`` / ``...lora_b.weight`` / ``...lora_magnitude.weight`` (DoRA) keys."""
    return name.endswith(_LORA_SUFFIXES)


def _cfg_get(cfg: Mapping[str, Any] | LoRASettings | None, *names: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, LoRASettings):  # the recipes' one LoRA definition
        cfg = cfg.peft_config()
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def lora_rank_alpha(
    lora_cfg: Mapping[str, Any] | None, state_dict: Mapping[str, torch.Tensor] | None = None
) -> tuple[int, float]:
    """``(rank, alpha)`` from a LoRA config (``lora_rank``/``rank``/``r``, ``lora_alpha``/``alpha``).

    The rank falls back to the shape of the first ``lora_a`` weight; alpha is required.
    """
    rank = _cfg_get(lora_cfg, "lora_rank", "rank", "r")
    alpha = _cfg_get(lora_cfg, "lora_alpha", "alpha")
    if rank is None and state_dict is not None:
        for k, t in state_dict.items():
            if k.endswith(".lora_a.weight"):
                rank = t.shape[0]
                break
    if rank is None or alpha is None:
        raise CheckpointError(
            "LoRA settings are incomplete: need lora_rank and lora_alpha (got "
            f"{dict(lora_cfg) if lora_cfg is not None else None})"
        )
    return int(rank), float(alpha)


def lora_scaling_from(
    lora_cfg: Mapping[str, Any] | None,
    model: nn.Module | None,
    state_dict: Mapping[str, torch.Tensor],
) -> float:
    """The LoRA scaling ``alpha / rank`` (``use_rslora``: ``alpha / sqrt(rank)``) from ``lora_cfg`` or,
    failing that, the model's modules."""
    if lora_cfg is None and model is not None:
        for m in model.modules():
            if hasattr(m, "lora_a") and hasattr(m, "scaling"):
                return float(m.scaling)
    rank, alpha = lora_rank_alpha(lora_cfg, state_dict)
    return alpha / rank**0.5 if _cfg_get(lora_cfg, "use_rslora", default=False) else alpha / rank


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Returns a state dict with every LoRA pair merged: ``W + scaling * B @ A`` (fp32 math); with a DoRA
    magnitude ``m`` the merged rows are rescaled to ``m / ||W + scaling * B @ A||_row``.

    Raises:
        CheckpointError: a ``lora_a`` without its ``lora_b`` or base weight.
    """
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for k in state_dict:
        if not k.endswith(".lora_a.weight"):
            continue
        prefix = k[: -len(".lora_a.weight")]
        b_key, w_key = prefix + ".lora_b.weight", prefix + ".weight"
        if b_key not in state_dict or w_key not in state_dict:
            raise CheckpointError(f"LoRA weight {k!r} lacks {b_key!r} or the base {w_key!r}")
        w = state_dict[w_key]
        if type(w) is not torch.Tensor and not isinstance(w, nn.Parameter):
            w = w.get_original_weight() if hasattr(w, "get_original_weight") else w.to(torch.float32)
        a = state_dict[k].detach().float()  # [r, in]
        b = state_dict[b_key].detach().float()  # [out, r]
        merged = w.detach().float() + scaling * (b @ a)  # [out, in]
        mag = state_dict.get(prefix + ".lora_magnitude.weight")
        if mag is not None:  # DoRA
            merged = (mag.detach().float() / merged.norm(dim=1))[:, None] * merged
        out[w_key] = merged.to(w.dtype)
    return out


def _peft_key(name: str, info: ModelInfo) -> str:
    """``layers.0.attn.q_proj.lora_a.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    keymap = hf_key_map(info.model_type)
    if name.endswith(".lora_magnitude.weight"):
        base, tail = name[: -len(".lora_magnitude.weight")] + ".weight", "lora_magnitude_vector"
    else:
        base = name[: -len(".lora_a.weight")] + ".weight"
        tail = "lora_A.weight" if name.endswith(".lora_a.weight") else "lora_B.weight"
    hf = keymap.to_external(base)
    if hf is None:
        raise CheckpointError(f"LoRA key {name!r}: its base {base!r} has no HF name")
    return f"{PEFT_PREFIX}{hf[: -len('.weight')]}.{tail}"


def _tinytune_key(peft_key: str, info: ModelInfo, file: str) -> str:
    keymap = hf_key_map(info.model_type)
    core = peft_key[len(PEFT_PREFIX) :] if peft_key.startswith(PEFT_PREFIX) else peft_key
    for ab, ours in (
        (".lora_A.weight", ".lora_a.weight"),
        (".lora_B.weight", ".lora_b.weight"),
        (".lora_magnitude_vector", ".lora_magnitude.weight"),
    ):
        if core.endswith(ab):
            base = keymap.to_tinytune(core[: -len(ab)] + ".weight")
            if base is not None:
                return base[: -len(".weight")] + ours
    raise CheckpointError(f"{file}: adapter key {peft_key!r} is not a LoRA weight tinytune knows")


def adapter_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of a model or state dict (tinytune names)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return {k: v for k, v in sd.items() if is_lora_key(k)}


def save_peft_adapter(
    model: nn.Module | Mapping[str, torch.Tensor],
    info: ModelInfo,
    out_dir: str,
    lora_cfg: Mapping[str, Any],
    base_model_name_or_path: str | None = None,
) -> str:
    """Writes ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's LoRA format.

    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` loads the result.

    Args:
        model: LoRA model or its (adapter) state dict with tinytune names.
        info: model info (key table family, base model path).
        out_dir: target directory.
        lora_cfg: a :class:`LoRASettings`, or a mapping with ``lora_rank`` (or ``rank``/``r``),
            ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init`` (``pissa`` adapters are written
            as the equivalent rank-``2r`` plain LoRA on the original base, as peft converts them;
            needs ``model`` to be the module, or a state dict holding each adapter's initial
            factors as ``<proj>.pissa_a0`` / ``<proj>.pissa_b0``).
        base_model_name_or_path: recorded in the config (default: ``info.source_dir``).

    Returns:
        ``out_dir``.
    """

    sd = adapter_state_dict(model)
    if not sd:
        raise CheckpointError("save_peft_adapter: the model has no LoRA weights (lora_a/lora_b)")
    rank, alpha = lora_rank_alpha(lora_cfg, sd)
    use_rslora = bool(_cfg_get(lora_cfg, "use_rslora", default=False))
    init = str(_cfg_get(lora_cfg, "init", "lora_init", default="default"))
    if init == "pissa":
        # peft's PiSSA -> LoRA conversion: the delta s (B A - B0 A0) as rank 2r on the original base
        if isinstance(model, nn.Module):
            for name, m in model.named_modules():
                if hasattr(m, "peft_lora_delta"):
                    prefix = f"{name}." if name else ""
                    sd[prefix + "lora_a.weight"], sd[prefix + "lora_b.weight"], _ = m.peft_lora_delta()
        else:  # a state dict with the initial factors beside the adapters (gathered from a sharded model)
            for key in [k for k in sd if k.endswith(".lora_a.weight")]:
                prefix = key[: -len("lora_a.weight")]
                a0, b0 = model.get(prefix + "pissa_a0"), model.get(prefix + "pissa_b0")
                if a0 is None or b0 is None:
                    raise CheckpointError(
                        f"save_peft_adapter: PiSSA adapter {key!r} without its initial factors "
                        f"({prefix}pissa_a0 / pissa_b0); pass the model or add them to the state dict"
                    )
                sd[key], sd[prefix + "lora_b.weight"] = pissa_as_lora(sd[key], sd[prefix + "lora_b.weight"], a0, b0)
        rank, alpha = 2 * rank, alpha * (2**0.5 if use_rslora else 2.0)
    tensors = {_peft_key(k, info): to_plain_tensor(v, None) for k, v in sd.items()}
    targets = sorted(
        {k.split(".")[-3] if not k.endswith("lora_magnitude_vector") else k.split(".")[-2] for k in tensors}
    )
    os.makedirs(out_dir, exist_ok=True)
    write_file_atomic(
        os.path.join(out_dir, "adapter_model.safetensors"),
        lambda p: save_file(tensors, p, metadata={"format": "pt"}),
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or info.source_dir or info.hf_config.get("_name_or_path"),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(_cfg_get(lora_cfg, "lora_dropout", "dropout", default=0.0)),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        # PiSSA is exported converted to plain LoRA (above); gaussian only names the init
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "modules_to_save": None,
        "use_rslora": use_rslora,
        "use_dora": any(k.endswith(".lora_magnitude.weight") for k in sd),
    }
    write_json_atomic(os.path.join(out_dir, "adapter_config.json"), config)
    return out_dir


def load_peft_adapter(adapter_dir: str, info: ModelInfo, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Reads a PEFT LoRA adapter into tinytune names; loads it into ``model`` when given.

    Raises:
        CheckpointError: missing files, an unknown key, or (with ``model``) a key or shape the
            model does not have.
    """

    file = os.path.join(adapter_dir, "adapter_model.safetensors")
    cfg_file = os.path.join(adapter_dir, "adapter_config.json")
    for p in (file, cfg_file):
        if not os.path.isfile(p):
            raise CheckpointError(
                f"{p}: not found; a PEFT adapter dir has adapter_model.safetensors and adapter_config.json"
            )
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    sd = {_tinytune_key(k, info, file): v for k, v in load_file(file).items()}
    if model is not None:
        own = model.state_dict()
        for k, v in sd.items():
            if k not in own:
                raise CheckpointError(f"{file}: adapter weight {k!r} has no matching LoRA module in the model")
            if tuple(own[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{file}: {k!r} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
        missing = sorted(k for k in own if is_lora_key(k) and k not in sd)
        if missing:
            raise CheckpointError(f"{file}: adapter lacks {missing[:4]} that the model has")
        model.load_state_dict(sd, strict=False)
    return sd
