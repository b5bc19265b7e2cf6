"""Per-family tokenizer constructors (usable as `_component_` targets in configs).

Special-token ids follow the families' published HF `tokenizer_config.json` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tinytune.tokenizers.autodetect import load_tokenizer
from tinytune.tokenizers.autodetect import sentencepiece_tokenizer as _load_sentencepiece
from tinytune.tokenizers.base import AddedToken, Tokenizer
from tinytune.tokenizers.bpe import BPETokenizer
from tinytune.tokenizers.patterns import LLAMA3_PATTERN, QWEN2_PATTERN
from tinytune.tokenizers.special_tokens import QWEN_NON_SPECIAL, llama3_special_tokens, qwen_special_tokens
from tinytune.tokenizers.tiktoken_file import load_tiktoken_ranks


# ---- Llama 3 -----------------------------------------------------------------------------------
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
        path,
        LLAMA3_PATTERN,
        specials,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad="<|finetune_right_pad_id|>" if version == "3.1" else None,
        stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        add_bos_token=True,
        nfc=False,
        chat_template=chat_template,
        name=f"llama{version}",
    )


# ---- Qwen ----------------------------------------------------------------------------------------
def _qwen(path: str | Path, version: str, chat_template: str | None) -> Tokenizer:
    specials = qwen_special_tokens(version)
    return _tiktoken_tokenizer(
        path,
        QWEN2_PATTERN,
        specials,
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        stops=["<|endoftext|>", "<|im_end|>"],
        add_bos_token=False,
        nfc=True,
        chat_template=chat_template,
        name=f"qwen{version}",
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
    tok = load_tokenizer(path)
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        if tok.token_to_id(name) is None:
            raise ValueError(f"{path}: not a SmolLM2 tokenizer ({name} is missing)")
    return tok


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """SentencePiece `tokenizer.model` (Llama 2, Mistral v0.1-v0.3): BOS ``<s>``, EOS ``</s>``, byte fallback."""
    return _load_sentencepiece(path)


llama2_tokenizer = sentencepiece_tokenizer
mistral_tokenizer = sentencepiece_tokenizer
