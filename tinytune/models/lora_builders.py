"""LoRA and QLoRA model builders for every family's model builders.

Each ``lora_<model>`` builds ``<model>`` with a LoRA ``linear_factory``; each ``qlora_<model>`` is
the same with ``quantize_base=True`` (frozen NF4 base weights in the LoRA layers). Configs name
them as ``_component_: tinytune.models.lora_builders.lora_smollm2_135m``.

Example:
    >>> model = lora_smollm2_135m(lora_attn_modules=["q_proj", "v_proj"], lora_rank=8, lora_alpha=16)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from torch import nn

from tinytune.config.recipe_settings import LoRASettings
from tinytune.modules.peft import lora_linear_factory

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def lora_factory(lora: LoRASettings) -> Callable[[str, int, int, bool], nn.Module]:
    """The ``linear_factory`` that puts adapters on ``lora.target_modules()`` (the one place LoRA
    settings become layers: builders, the plain-keys path and the distributed recipe use it)."""
    targets = lora.target_modules()
    if not targets:
        raise ValueError("LoRA: no modules to adapt (empty lora_attn_modules and apply_lora_to_mlp=False)")
    return lora_linear_factory(
        targets,
        rank=lora.lora_rank,
        alpha=lora.lora_alpha,
        dropout=lora.lora_dropout,
        quantize_base=lora.quantize_base,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init=lora.lora_init,
    )


def lora_model(base_builder: Callable[..., nn.Module], **lora_keys: Any) -> nn.Module:
    """Builds ``base_builder(linear_factory=...)`` with LoRA as the keys of :class:`LoRASettings` say.

    Args:
        base_builder: a model builder accepting ``linear_factory`` (e.g. ``smollm2_135m``).
        **lora_keys: ``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``,
            ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``quantize_base``, ``use_dora``,
            ``use_rslora``, ``lora_init``; missing keys take
            the :class:`LoRASettings` defaults (checked: unknown keys and bad values are errors).
    """
    return base_builder(linear_factory=lora_factory(LoRASettings.from_config(lora_keys)))


def _lora_signature(quantize_base: bool) -> inspect.Signature:
    """The keyword signature of a LoRA builder: the fields and defaults of :class:`LoRASettings`."""
    params = []
    for f in dataclasses.fields(LoRASettings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name == "quantize_base":
            default = quantize_base
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(params)


def _variant(target: str, quantize_base: bool) -> Callable[..., nn.Module]:
    module_name, fn_name = target.split(":")
    kind = "QLoRA (NF4 base)" if quantize_base else "LoRA"

    def builder(**lora_keys: Any) -> nn.Module:
        base = getattr(importlib.import_module(module_name), fn_name)
        return lora_model(base, **{"quantize_base": quantize_base, **lora_keys})

    builder.__signature__ = _lora_signature(quantize_base)  # what config checks and `inspect` see
    builder.__name__ = builder.__qualname__ = ("qlora_" if quantize_base else "lora_") + fn_name
    builder.__module__ = __name__
    builder.__doc__ = (
        f"{kind} variant of ``{module_name}.{fn_name}``; keyword arguments are the keys of "
        f":class:`tinytune.config.recipe_settings.LoRASettings` (``quantize_base`` defaults to {quantize_base})."
    )
    return builder


def is_lora_builder(dotted: str) -> bool:
    """Whether a ``_component_`` path names one of the ``lora_*`` / ``qlora_*`` builders here."""
    module, _, name = dotted.rpartition(".")
    return (
        module == __name__
        and name.startswith(("lora_", "qlora_"))
        and name not in ("lora_model", "lora_factory")
        and name in globals()
    )


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
