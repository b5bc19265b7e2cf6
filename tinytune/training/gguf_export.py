"""The training recipes' ``export_gguf`` option: write the fine-tuned model as a GGUF file too."""

from __future__ import annotations

import os
from typing import Mapping

import torch

from tinytune.checkpoint.gguf_writer import check_gguf_type, write_gguf
from tinytune.checkpoint.model_info import ModelInfo


def export_gguf(
    gguf_type: str | None,
    state_dict: Mapping[str, torch.Tensor],
    info: ModelInfo,
    tokenizer_dir: str,
    out_dir: str,
    chat_template: str | None = None,
) -> dict[str, str]:
    """Writes ``out_dir/model-TYPE.gguf`` when ``gguf_type`` (the ``export_gguf`` setting, checked by
    the settings layer) is set.

    Returns:
        ``{"gguf": path}`` for the summary, or ``{}``.
    """
    if not gguf_type:
        return {}
    gguf_type = check_gguf_type(gguf_type, "export_gguf")
    path = os.path.join(out_dir, f"model-{gguf_type}.gguf")
    write_gguf(state_dict, info, path, gguf_type, tokenizer_dir=tokenizer_dir, chat_template=chat_template)
    print(f"wrote {path}")
    return {"gguf": path}
