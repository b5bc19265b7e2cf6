"""The training recipes' ``export_gguf`` option: write the fine-tuned model as a GGUF file too."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from tinytune.checkpoint.gguf_writer import check_gguf_type, write_gguf
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo
from tinytune.config import ConfigError


def export_gguf_type(cfg: Any) -> str | None:
    """The ``export_gguf`` type (``f16``, ``bf16``, ``q8_0``, ``f32``) or None; read before training so a
    bad value fails at once.

    Raises:
        ConfigError: a type tinytune cannot write.
    """
    from tinytune.training.setup import cfg_get  # noqa: PLC0415  (setup imports the recipe helpers)

    # settings key: export_gguf (str | null, default null: f16 | bf16 | q8_0 | f32; writes output_dir/model-TYPE.gguf)
    value = cfg_get(cfg, "export_gguf")
    if value is None or value is False:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"export_gguf: expected one of f16, bf16, q8_0, f32 (or null), got {value!r}")
    try:
        return check_gguf_type(value, "export_gguf")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def export_gguf(gguf_type: str | None, state_dict: Mapping[str, torch.Tensor], info: ModelInfo, tokenizer_dir: str,
                out_dir: str, chat_template: str | None = None) -> dict[str, str]:
    """Writes ``out_dir/model-TYPE.gguf`` when ``gguf_type`` is set.

    Returns:
        ``{"gguf": path}`` for the summary, or ``{}``.
    """
    if not gguf_type:
        return {}
    path = os.path.join(out_dir, f"model-{gguf_type}.gguf")
    write_gguf(state_dict, info, path, gguf_type, tokenizer_dir=tokenizer_dir, chat_template=chat_template)
    print(f"wrote {path}")
    return {"gguf": path}
