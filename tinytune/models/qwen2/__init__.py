"""Qwen 2 / 2.5 family."""

from tinytune.models._component_builders import qwen2_decoder
from tinytune.models.qwen2._model_builders import qwen2_5_0_5b, qwen2_5_1_5b, qwen2_5_7b, qwen2_tiny

__all__ = ["qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_7b", "qwen2_decoder", "qwen2_tiny"]
