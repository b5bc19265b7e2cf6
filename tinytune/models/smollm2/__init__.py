"""SmolLM2 family (Llama architecture, tied embeddings)."""

from tinytune.models._component_builders import llama_decoder
from tinytune.models.smollm2._model_builders import smollm2_1_7b, smollm2_135m, smollm2_360m, smollm2_tiny

__all__ = ["llama_decoder", "smollm2_135m", "smollm2_1_7b", "smollm2_360m", "smollm2_tiny"]
