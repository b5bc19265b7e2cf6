"""Tokenizers: one `Tokenizer` interface over SentencePiece, tiktoken files and HF byte-level BPE.

HF `tokenizer.json` / `vocab.json`+`merges.txt` vocabularies run on tiktoken's Rust core; the
`tokenizers` package is not needed at run time. See docs/ARCHITECTURE.md ("Tokenizer").
"""

from tinytune.tokenizers.autodetect import (
    gguf_tokenizer,
    hf_json_tokenizer,
    load_tokenizer,
    tiktoken_tokenizer,
    vocab_merges_tokenizer,
)
from tinytune.tokenizers.base import AddedToken, Tokenizer
from tinytune.tokenizers.bpe import BPETokenizer
from tinytune.tokenizers.families import (
    llama2_tokenizer,
    llama3_tokenizer,
    mistral_tokenizer,
    qwen2_tokenizer,
    qwen3_tokenizer,
    sentencepiece_tokenizer,
    smollm2_tokenizer,
)
from tinytune.tokenizers.gguf import hf_tokenizer_files_from_gguf
from tinytune.tokenizers.sentencepiece import SentencePieceTokenizer
from tinytune.tokenizers.special_tokens import llama3_special_tokens, qwen_special_tokens

__all__ = [
    "AddedToken",
    "BPETokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "gguf_tokenizer",
    "hf_json_tokenizer",
    "hf_tokenizer_files_from_gguf",
    "llama2_tokenizer",
    "llama3_special_tokens",
    "llama3_tokenizer",
    "load_tokenizer",
    "mistral_tokenizer",
    "qwen2_tokenizer",
    "qwen3_tokenizer",
    "qwen_special_tokens",
    "sentencepiece_tokenizer",
    "smollm2_tokenizer",
    "tiktoken_tokenizer",
    "vocab_merges_tokenizer",
]
