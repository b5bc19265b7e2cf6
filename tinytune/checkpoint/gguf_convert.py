"""GGUF -> HF checkpoint directory (weights, config, generation config, tokenizer, chat template)."""

from __future__ import annotations

import os

import torch

from tinytune.checkpoint.atomic import atomic_directory, write_json_atomic
from tinytune.checkpoint.gguf_reader import read_gguf
from tinytune.checkpoint.hf_writer import save_hf_checkpoint
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo
from tinytune.tokenizers.gguf import hf_tokenizer_files_from_gguf

MARKER = "tinytune_convert.json"  # written last; its presence means the directory is complete


def write_gguf_tokenizer(gguf_path: str, out_dir: str) -> list[str]:
    """Writes the HF tokenizer files (incl. chat template) stored in a GGUF's metadata.

    Uses ``tinytune.tokenizers.gguf.hf_tokenizer_files_from_gguf``.

    Returns:
        The file names written.
    """

    try:
        files = hf_tokenizer_files_from_gguf(gguf_path)
    except (ValueError, NotImplementedError, KeyError) as e:
        raise CheckpointError(
            f"{gguf_path}: the tokenizer in this GGUF cannot be converted ({e}); convert the weights "
            "alone with --no-tokenizer (tokenizer=False) and copy tokenizer files from elsewhere"
        ) from None
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(content)
    return sorted(files)


def convert_gguf_to_hf(
    gguf_path: str,
    out_dir: str,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    tokenizer: bool = True,
    overwrite: bool = False,
) -> tuple[str, ModelInfo]:
    """Converts a llama-architecture GGUF into an HF checkpoint directory, atomically.

    Every tensor is dequantized, q/k rows are restored to rotate-half order, names go through
    the GGUF and HF key tables, and ``config.json`` gets ``model_type: llama`` (tied
    embeddings when the GGUF has no ``output`` tensor). The directory is assembled in a temp dir
    and renamed into place, so an interrupted conversion leaves nothing behind.

    Args:
        gguf_path: input ``.gguf``.
        out_dir: output directory (must not exist unless ``overwrite``).
        dtype: dtype of the written weights.
        max_shard_size: safetensors shard size.
        tokenizer: also write the tokenizer files + chat template from the GGUF metadata.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``(out_dir, info)``.
    """
    g = read_gguf(gguf_path, dtype=torch.float32)
    g.info.hf_config.setdefault("_name_or_path", str(g.metadata.get("general.name", os.path.basename(gguf_path))))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_hf_checkpoint(g.state_dict, g.info, tmp, max_shard_size=max_shard_size, dtype=dtype)
        written = write_gguf_tokenizer(gguf_path, tmp) if tokenizer else []
        write_json_atomic(
            os.path.join(tmp, MARKER),
            {
                "source": os.path.abspath(gguf_path),
                "source_size": os.path.getsize(gguf_path),
                "tensor_types": sorted(set(g.tensor_types.values())),
                "tokenizer_files": written,
            },
        )
    g.info.source_dir = os.path.abspath(out_dir)
    return os.path.abspath(out_dir), g.info
