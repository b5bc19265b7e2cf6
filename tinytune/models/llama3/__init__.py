"""Llama 3.x family."""

from tinytune.models._component_builders import llama_decoder
from tinytune.models.llama3._model_builders import llama3_1_8b, llama3_2_1b, llama3_2_3b, llama3_tiny

__all__ = ["llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "llama3_tiny", "llama_decoder"]
