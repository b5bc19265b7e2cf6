"""LoRA and QLoRA model builders for every family's model builders.

Each ``lora_<model>`` builds ``<model>`` with a LoRA ``linear_factory``; each ``qlora_<model>`` is
the same with ``quantize_base=True`` (frozen NF4 base weights in the LoRA layers). Configs name
them as ``_component_: tinytune.models.lora_builders.lora_smollm2_135m``.

Example:
    >>> model = lora_smollm2_135m(lora_attn_modules=["q_proj", "v_proj"], lora_rank=8, lora_alpha=16)
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

from torch import nn

from tinytune.modules.peft import lora_linear_factory

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def lora_target_modules(
    lora_attn_modules: Sequence[str], apply_lora_to_mlp: bool = False, apply_lora_to_output: bool = False
) -> list[str]:
    """The projection names a LoRA builder adapts (attention list + all MLP projections + output)."""
    names = list(lora_attn_modules or [])
    if apply_lora_to_mlp:
        names += list(MLP_MODULES)
    if apply_lora_to_output:
        names.append("output")
    return names


def lora_model(
    base_builder: Callable[..., nn.Module],
    lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    use_dora: bool = False,
    use_rslora: bool = False,
    lora_init: str = "default",
) -> nn.Module:
    """Builds ``base_builder(linear_factory=...)`` with LoRA on the chosen projections.

    Args:
        base_builder: a model builder accepting ``linear_factory`` (e.g. ``smollm2_135m``).
        lora_attn_modules: attention projections to adapt (``q_proj k_proj v_proj o_proj``, or
            the short names ``q k v o``).
        apply_lora_to_mlp: also adapt ``gate_proj up_proj down_proj``.
        apply_lora_to_output: also adapt the output projection (ignored for tied embeddings,
            where no separate output linear exists).
        lora_rank, lora_alpha, lora_dropout: LoRA hyperparameters (scaling ``alpha / rank``).
        quantize_base: QLoRA: keep the adapted layers' frozen base weights in NF4.
        use_dora, use_rslora, lora_init: LoRA variants: DoRA magnitudes, ``alpha / sqrt(rank)``
            scaling, adapter init ``default | gaussian | pissa`` (:class:`tinytune.modules.peft.LoRALinear`).
    """
    targets = lora_target_modules(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output)
    if not targets:
        raise ValueError("LoRA builder: no modules to adapt (empty lora_attn_modules and apply_lora_to_mlp=False)")
    factory = lora_linear_factory(targets, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                  quantize_base=quantize_base, use_dora=use_dora, use_rslora=use_rslora,
                                  init=lora_init)
    return base_builder(linear_factory=factory)


def _variant(target: str, quantize_base: bool) -> Callable[..., nn.Module]:
    module_name, fn_name = target.split(":")
    kind = "QLoRA (NF4 base)" if quantize_base else "LoRA"

    def builder(
        lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
        apply_lora_to_mlp: bool = True,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        quantize_base: bool = quantize_base,
        use_dora: bool = False,
        use_rslora: bool = False,
        lora_init: str = "default",
    ) -> nn.Module:
        base = getattr(importlib.import_module(module_name), fn_name)
        return lora_model(
            base, lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
            apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, quantize_base=quantize_base, use_dora=use_dora, use_rslora=use_rslora,
            lora_init=lora_init,
        )

    builder.__name__ = builder.__qualname__ = ("qlora_" if quantize_base else "lora_") + fn_name
    builder.__module__ = __name__
    builder.__doc__ = (
        f"{kind} variant of ``{module_name}.{fn_name}``; arguments as in :func:`lora_model` "
        f"(``quantize_base`` defaults to {quantize_base})."
    )
    return builder


# SmolLM2
lora_smollm2_135m = _variant("tinytune.models.smollm2:smollm2_135m", False)
lora_smollm2_360m = _variant("tinytune.models.smollm2:smollm2_360m", False)
lora_smollm2_1_7b = _variant("tinytune.models.smollm2:smollm2_1_7b", False)
lora_smollm2_tiny = _variant("tinytune.models.smollm2:smollm2_tiny", False)
qlora_smollm2_135m = _variant("tinytune.models.smollm2:smollm2_135m", True)
qlora_smollm2_360m = _variant("tinytune.models.smollm2:smollm2_360m", True)
qlora_smollm2_1_7b = _variant("tinytune.models.smollm2:smollm2_1_7b", True)
qlora_smollm2_tiny = _variant("tinytune.models.smollm2:smollm2_tiny", True)
# Llama 3.x
lora_llama3_2_1b = _variant("tinytune.models.llama3:llama3_2_1b", False)
lora_llama3_2_3b = _variant("tinytune.models.llama3:llama3_2_3b", False)
lora_llama3_1_8b = _variant("tinytune.models.llama3:llama3_1_8b", False)
lora_llama3_tiny = _variant("tinytune.models.llama3:llama3_tiny", False)
qlora_llama3_2_1b = _variant("tinytune.models.llama3:llama3_2_1b", True)
qlora_llama3_2_3b = _variant("tinytune.models.llama3:llama3_2_3b", True)
qlora_llama3_1_8b = _variant("tinytune.models.llama3:llama3_1_8b", True)
qlora_llama3_tiny = _variant("tinytune.models.llama3:llama3_tiny", True)
# Llama 2
lora_llama2_7b = _variant("tinytune.models.llama2:llama2_7b", False)
lora_llama2_tiny = _variant("tinytune.models.llama2:llama2_tiny", False)
qlora_llama2_7b = _variant("tinytune.models.llama2:llama2_7b", True)
qlora_llama2_tiny = _variant("tinytune.models.llama2:llama2_tiny", True)
# Qwen2.5
lora_qwen2_5_0_5b = _variant("tinytune.models.qwen2:qwen2_5_0_5b", False)
lora_qwen2_5_1_5b = _variant("tinytune.models.qwen2:qwen2_5_1_5b", False)
lora_qwen2_5_7b = _variant("tinytune.models.qwen2:qwen2_5_7b", False)
lora_qwen2_tiny = _variant("tinytune.models.qwen2:qwen2_tiny", False)
qlora_qwen2_5_0_5b = _variant("tinytune.models.qwen2:qwen2_5_0_5b", True)
qlora_qwen2_5_1_5b = _variant("tinytune.models.qwen2:qwen2_5_1_5b", True)
qlora_qwen2_5_7b = _variant("tinytune.models.qwen2:qwen2_5_7b", True)
qlora_qwen2_tiny = _variant("tinytune.models.qwen2:qwen2_tiny", True)
# Qwen3
lora_qwen3_0_6b = _variant("tinytune.models.qwen3:qwen3_0_6b", False)
lora_qwen3_1_7b = _variant("tinytune.models.qwen3:qwen3_1_7b", False)
lora_qwen3_4b = _variant("tinytune.models.qwen3:qwen3_4b", False)
lora_qwen3_8b = _variant("tinytune.models.qwen3:qwen3_8b", False)
lora_qwen3_tiny = _variant("tinytune.models.qwen3:qwen3_tiny", False)
qlora_qwen3_0_6b = _variant("tinytune.models.qwen3:qwen3_0_6b", True)
qlora_qwen3_1_7b = _variant("tinytune.models.qwen3:qwen3_1_7b", True)
qlora_qwen3_4b = _variant("tinytune.models.qwen3:qwen3_4b", True)
qlora_qwen3_8b = _variant("tinytune.models.qwen3:qwen3_8b", True)
qlora_qwen3_tiny = _variant("tinytune.models.qwen3:qwen3_tiny", True)
