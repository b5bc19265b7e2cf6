"""tiktoken BPE files (`<base64 token> <rank>` per line): Llama 3 `tokenizer.model`, `qwen.tiktoken`."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path


def is_tiktoken_file(path: str | Path) -> bool:
    """True when the file starts like a tiktoken BPE file (and not a SentencePiece protobuf)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Reads a tiktoken BPE file into ``{token_bytes: rank}``.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: naming the path and line for malformed content.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, expected a tiktoken BPE file") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}:{n}: expected '<base64 token> <rank>', got {line[:60]!r}; is this really a tiktoken file?"
            ) from None
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken file")
    return ranks
