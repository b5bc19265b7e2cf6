"""Model families: component builders and model builders.

Families are imported lazily (``tinytune.models.smollm2``) to keep ``import tinytune.models`` cheap.
"""

from tinytune.models._component_builders import (
    LINEAR_NAMES,
    LinearFactory,
    default_linear_factory,
    llama_decoder,
    qwen2_decoder,
    qwen3_decoder,
    transformer_decoder,
)

__all__ = [
    "LINEAR_NAMES",
    "LinearFactory",
    "default_linear_factory",
    "llama_decoder",
    "qwen2_decoder",
    "qwen3_decoder",
    "transformer_decoder",
]
