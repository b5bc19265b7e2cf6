"""Llama 2 family."""

from tinytune.models._component_builders import llama_decoder
from tinytune.models.llama2._model_builders import llama2_7b, llama2_tiny

__all__ = ["llama2_7b", "llama2_tiny", "llama_decoder"]
