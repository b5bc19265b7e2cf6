"""Per-family tokenizer constructors (usable as `_component_` targets in configs).

Special-token ids follow the families' published HF `tokenizer_config.json` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tinytune.tokenizers.base import AddedToken, Tokenizer
from tinytune.tokenizers.bpe import BPETokenizer
from tinytune.tokenizers.patterns import LLAMA3_PATTERN, QWEN2_PATTERN
from tinytune.tokenizers.tiktoken_file import load_tiktoken_ranks

# ---- Llama 3 -----------------------------------------------------------------------------------
LLAMA3_NUM_BASE = 128000
LLAMA3_NUM_RESERVED = 256


def llama3_special_tokens(version: str = "3.1") -> dict[str, int]:
    """Llama 3 special tokens from id 128000.

    Args:
        version: "3.0" (Llama 3) or "3.1" (Llama 3.1 / 3.2 / 3.3, adds ``<|eom_id|>``,
            ``<|python_tag|>`` and ``<|finetune_right_pad_id|>``).
    """
    if version == "3.0":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "R", "R", "R", "R",
                 "<|start_header_id|>", "<|end_header_id|>", "R", "<|eot_id|>"]
    elif version == "3.1":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "R", "R", "<|finetune_right_pad_id|>", "R",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    else:
        raise ValueError(f"unknown Llama 3 tokenizer version {version!r}; use '3.0' or '3.1'")
    out: dict[str, int] = {}
    reserved = 0
    for i in range(LLAMA3_NUM_RESERVED):
        name = named[i] if i < len(named) else "R"
        if name == "R":
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        out[name] = LLAMA3_NUM_BASE + i
    return out


def _tiktoken_tokenizer(
    path: str | Path,
    pat_str: str,
    specials: dict[str, int],
    *,
    bos: str | None,
    eos: str | None,
    pad: str | None,
    stops: Sequence[str],
    add_bos_token: bool,
    nfc: bool,
    chat_template: str | None,
    name: str,
    non_special: frozenset[str] = frozenset(),
) -> Tokenizer:
    ranks = load_tiktoken_ranks(path)
    clash = sorted(set(ranks.values()) & set(specials.values()))
    if clash:
        raise ValueError(f"{path}: special-token ids {clash[:5]} collide with BPE ranks; wrong file for {name}?")
    added = [AddedToken(content=s, id=i, special=s not in non_special) for s, i in specials.items()]
    vocab_size = max(max(ranks.values()), max(specials.values(), default=-1)) + 1
    return BPETokenizer(
        ranks,
        pat_str,
        added,
        nfc=nfc,
        vocab_size=vocab_size,
        bos_id=specials[bos] if bos else None,
        eos_id=specials[eos] if eos else None,
        pad_id=specials[pad] if pad else None,
        stop_tokens=[specials[s] for s in stops if s in specials],
        add_bos_token=add_bos_token,
        chat_template=chat_template,
        name=name,
    )


def llama3_tokenizer(path: str | Path, version: str = "3.1", chat_template: str | None = None) -> Tokenizer:
    """Llama 3 / 3.x tokenizer from Meta's tiktoken `tokenizer.model`.

    BOS ``<|begin_of_text|>`` (added by ``encode(add_bos=True)``), EOS ``<|end_of_text|>``;
    stop tokens ``<|end_of_text|>``, ``<|eom_id|>`` (3.1), ``<|eot_id|>``.
    Pad is ``<|finetune_right_pad_id|>`` for 3.1 and None for 3.0.

    Args:
        path: the tiktoken `tokenizer.model` file.
        version: "3.0" or "3.1" special-token layout (see `llama3_special_tokens`).
        chat_template: optional Jinja template to attach.
    """
    specials = llama3_special_tokens(version)
    return _tiktoken_tokenizer(
        path, LLAMA3_PATTERN, specials,
        bos="<|begin_of_text|>", eos="<|end_of_text|>",
        pad="<|finetune_right_pad_id|>" if version == "3.1" else None,
        stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        add_bos_token=True, nfc=False, chat_template=chat_template, name=f"llama{version}",
    )


# ---- Qwen ----------------------------------------------------------------------------------------
QWEN_SPECIAL_START = 151643
QWEN2_5_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
#: Tokens HF marks ``special: false`` (they stay in decoded text with skip_special_tokens=True).
QWEN_NON_SPECIAL = {
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
}


def qwen_special_tokens(version: str = "3") -> dict[str, int]:
    """Qwen added tokens from id 151643: "2" gives the first three (Qwen2), "2.5" 22, "3" 26."""
    names = {"2": QWEN2_5_SPECIALS[:3], "2.5": QWEN2_5_SPECIALS, "3": QWEN2_5_SPECIALS + QWEN3_EXTRA}
    if version not in names:
        raise ValueError(f"unknown Qwen tokenizer version {version!r}; use '2', '2.5' or '3'")
    return {s: QWEN_SPECIAL_START + i for i, s in enumerate(names[version])}


def _qwen(path: str | Path, version: str, chat_template: str | None) -> Tokenizer:
    specials = qwen_special_tokens(version)
    return _tiktoken_tokenizer(
        path, QWEN2_PATTERN, specials,
        bos=None, eos="<|endoftext|>", pad="<|endoftext|>", stops=["<|endoftext|>", "<|im_end|>"],
        add_bos_token=False, nfc=True, chat_template=chat_template, name=f"qwen{version}",
        non_special=frozenset(QWEN_NON_SPECIAL),
    )


def qwen2_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Qwen2 / Qwen2.5 tokenizer from `qwen.tiktoken` (or `vocab.json`+`merges.txt` dirs via `load_tokenizer`).

    No BOS; EOS and pad ``<|endoftext|>`` (151643); stop tokens ``<|endoftext|>``, ``<|im_end|>``
    (151645); NFC normalization as in HF; Qwen2.5 added tokens 151643-151664.
    """
    return _qwen(path, "2.5", chat_template)


def qwen3_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Qwen3 tokenizer: Qwen2.5 plus ``<tool_response>``, ``</tool_response>``, ``<think>`` (151667), ``</think>`` (151668)."""
    return _qwen(path, "3", chat_template)


# ---- SmolLM2 / Llama 2 / Mistral --------------------------------------------------------------------
def smollm2_tokenizer(path: str | Path) -> Tokenizer:
    """SmolLM2 tokenizer from an HF dir / `tokenizer.json` or directly from a SmolLM2 `.gguf`.

    ChatML: ``<|im_start|>`` = 1, ``<|im_end|>`` = 2 (EOS and pad in the instruct model), no BOS
    added; stop tokens ``<|im_end|>`` and ``<|endoftext|>`` (0).
    """
    from tinytune.tokenizers.loader import load_tokenizer

    tok = load_tokenizer(path)
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        if tok.token_to_id(name) is None:
            raise ValueError(f"{path}: not a SmolLM2 tokenizer ({name} is missing)")
    return tok


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """SentencePiece `tokenizer.model` (Llama 2, Mistral v0.1-v0.3): BOS ``<s>``, EOS ``</s>``, byte fallback."""
    from tinytune.tokenizers.loader import sentencepiece_tokenizer as _load

    return _load(path)


llama2_tokenizer = sentencepiece_tokenizer
mistral_tokenizer = sentencepiece_tokenizer
