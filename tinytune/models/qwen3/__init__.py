"""Qwen3 family."""

from tinytune.models._component_builders import qwen3_decoder
from tinytune.models.qwen3._model_builders import qwen3_0_6b, qwen3_1_7b, qwen3_4b, qwen3_8b, qwen3_tiny

__all__ = ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_decoder", "qwen3_tiny"]
