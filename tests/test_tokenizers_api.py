"""Tokenizer interface behaviour: BOS/EOS policy, batching in processes, pickling, detection, errors."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

import tinytune.tokenizers as T
from tests import tokenizer_refs as R


@pytest.fixture(scope="module")
def llama3():
    return T.llama3_tokenizer(R.llama3_dir() / "tokenizer.model")


def test_llama3_31_layout_and_bos_eos(llama3):
    assert llama3.bos_id == 128000 and llama3.eos_id == 128001 and llama3.pad_id == 128004
    assert llama3.token_to_id("<|eot_id|>") == 128009 and llama3.token_to_id("<|eom_id|>") == 128008
    assert llama3.token_to_id("<|python_tag|>") == 128010
    assert llama3.token_to_id("<|reserved_special_token_247|>") == 128255
    assert llama3.stop_tokens == [128001, 128008, 128009]
    assert llama3.vocab_size == 128256
    ids = llama3.encode("Hello world")
    assert ids == [128000, 9906, 1917, 128001]
    assert llama3.encode("Hello world", add_bos=False, add_eos=False) == [9906, 1917]
    assert llama3.decode(ids) == "Hello world"
    assert llama3.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>Hello world<|end_of_text|>"
    assert llama3.token_to_id("Hello") == 9906 and llama3.token_to_id("Ġworld") == 1917
    assert llama3.token_to_id("no-such-token-xyz") is None


def test_encode_batch_two_workers_equals_inline(llama3):
    texts = R.corpus()
    one = llama3.encode_batch(texts, num_workers=1)
    two = llama3.encode_batch(texts, num_workers=2)
    assert one == two == [llama3.encode(t) for t in texts]
    assert llama3.encode_batch(texts[:7], add_bos=False, add_eos=False, num_workers=2, chunk_size=3) == [
        llama3.encode(t, add_bos=False, add_eos=False) for t in texts[:7]
    ]


def test_encode_batch_spawn_pickles_construction_data(tmp_path):
    # spawn workers get the tokenizer by pickle: rebuilt from its ranks/spec, not from the file
    src = R.qwen_tiktoken()
    copy = tmp_path / "qwen.tiktoken"
    shutil.copy(src, copy)
    tok = T.qwen2_tokenizer(copy)
    copy.unlink()
    texts = R.corpus()[:40]
    assert tok.encode_batch(texts, num_workers=2, mp_context="spawn") == [tok.encode(t) for t in texts]


def test_pickle_roundtrip_all_backends(tmp_path):
    d = tmp_path / "sp"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(R.train_sentencepiece([s for s in R.corpus() if s.strip()]))
    toks = [T.load_tokenizer(d), T.qwen3_tokenizer(R.qwen_tiktoken())]
    for tok in toks:
        clone = pickle.loads(pickle.dumps(tok))
        for text in R.corpus()[:60]:
            assert clone.encode(text) == tok.encode(text)
        assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.stop_tokens) == (
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
            tok.stop_tokens,
        )


def test_load_tokenizer_detection(tmp_path):
    ldir = R.llama3_dir()
    # directory with tokenizer.json -> HF json path; tokenizer.model alone -> tiktoken path
    assert isinstance(T.load_tokenizer(ldir), T.BPETokenizer)
    only_model = tmp_path / "llama3"
    only_model.mkdir()
    shutil.copy(ldir / "tokenizer.model", only_model / "tokenizer.model")
    tok = T.load_tokenizer(only_model)
    assert tok.name.startswith("llama3") and tok.encode("hi") == [128000, 6151, 128001]
    qdir = tmp_path / "qwen"
    qdir.mkdir()
    shutil.copy(R.qwen_tiktoken(), qdir / "qwen.tiktoken")
    assert T.load_tokenizer(qdir).token_to_id("<|im_end|>") == 151645


def test_tokenizer_config_overrides_and_chat_template(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    shutil.copy(R.qwen_tiktoken(), d / "qwen.tiktoken")
    cfg = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        "added_tokens_decoder": {
            str(151643 + i): {"content": s, "special": True}
            for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        },
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    tok = T.load_tokenizer(d)
    assert tok.eos_id == 151645 and tok.pad_id == 151643 and tok.bos_id is None
    assert tok.chat_template == cfg["chat_template"]
    assert set(tok.stop_tokens) == {151643, 151645}
    assert tok.token_to_id("<think>") is None  # config's added tokens replace the family defaults
    assert tok.encode("x", add_eos=True)[-1] == 151645
    (d / "chat_template.jinja").write_text("JINJA")
    assert T.load_tokenizer(d).chat_template == "JINJA"


def test_vocab_json_merges_txt_dir_matches_tokenizer_json(tmp_path):
    # Write SmolLM2's vocab/merges in slow-tokenizer format and compare with the tokenizer.json path.
    files = T.hf_tokenizer_files_from_gguf(R.smollm2_gguf())
    data = json.loads(files["tokenizer.json"])
    d = tmp_path / "gpt2style"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in data["model"]["merges"]) + "\n")
    cfg = json.loads(files["tokenizer_config.json"])
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    slow = T.load_tokenizer(d)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(
        json.dumps(
            {
                **data,
                "pre_tokenizer": {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": True,
                },
            }
        )
    )
    # vocab.json+merges.txt carry no pre-tokenizer: GPT2Tokenizer means the GPT-2 regex.
    for text in R.corpus()[:120]:
        assert slow.encode(text, add_bos=False, add_eos=False) == hf.encode(text, add_special_tokens=False).ids


def test_ids_not_following_merge_order_are_remapped():
    # A toy vocab whose ids are NOT in merge order: tiktoken ranks must follow merges, ids via a table.
    from tokenizers import Tokenizer

    from tinytune.tokenizers.byte_level import byte_to_unicode

    alphabet = [byte_to_unicode()[b] for b in range(256)]
    vocab = {c: i + 10 for i, c in enumerate(alphabet)}
    merges = [("a", "b"), ("b", "c"), ("ab", "c"), ("Ġ", "a")]
    vocab.update({"ab": 5, "bc": 3, "abc": 0, "Ġa": 7})
    data = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    hf = Tokenizer.from_str(json.dumps(data))
    tok = T.hf_json_tokenizer("toy/tokenizer.json", config={}, tokenizer_json=data)
    assert tok._rank_to_id is not None
    for text in ["abc", "abcbc", "bcab", " abc ab bc", "xabcx", "cab abca"]:
        assert tok.encode(text, add_bos=False, add_eos=False) == hf.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_tokenizer(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer found in .*empty"):
        T.load_tokenizer(empty)
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        T.load_tokenizer(bad)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="garbage.model: not a readable SentencePiece model"):
        T.load_tokenizer(garbage)
    tk = tmp_path / "x.tiktoken"
    tk.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"x.tiktoken:2"):
        T.qwen2_tokenizer(tk)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ValueError, match="fake.gguf: not a readable GGUF file"):
        T.load_tokenizer(fake)
    with pytest.raises(ValueError, match="cannot decode ids"):
        T.qwen2_tokenizer(R.qwen_tiktoken()).decode([10**7])
