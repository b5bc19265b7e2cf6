"""GGUF vocabularies with tokens no merge can build (``<|endoftext|>`` at id 0 as a NORMAL token):
loading works, and every id decodes (and texts encode) as HF ``tokenizers`` does on the files the
converter writes."""

from __future__ import annotations

import pickle
import random

import pytest

gguf = pytest.importorskip("gguf")

from tokenizers import Tokenizer  # noqa: E402

from tinytune.tokenizers import hf_tokenizer_files_from_gguf, load_tokenizer  # noqa: E402


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (written out here, independent of tinytune)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def write_gguf(path: str) -> list[str]:
    bl = byte_level_alphabet()
    tokens = (
        ["<|endoftext|>"]
        + [bl[b] for b in range(256)]
        + [
            "Ġt",
            "he",
            "Ġthe",
            "Ġhe",
            "ll",
            "Ġhe" + "ll",
            "<|im_start|>",
            "<|im_end|>",
            "Ġhello",
            "Ġunreachable",
            "<tool_call>",
            "âĢ",
            "ðŁĻĤ",
        ]
    )
    types = [1] * len(tokens)  # NORMAL, including <|endoftext|>
    for control in ("<|im_start|>", "<|im_end|>"):
        types[tokens.index(control)] = 3
    types[tokens.index("<tool_call>")] = 4  # USER_DEFINED
    merges = ["Ġ t", "h e", "Ġt he", "Ġ he", "l l", "Ġhe ll"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "orphans.gguf")
    tokens = write_gguf(path)
    return path, tokens


def test_orphan_tokens_load_and_decode_like_hf(files):
    path, tokens = files
    hf = Tokenizer.from_str(hf_tokenizer_files_from_gguf(path)["tokenizer.json"])
    tok = load_tokenizer(path)  # used to fail: bos_token '<|endoftext|>' is not in the vocabulary
    assert tok.bos_id == 0 and tok.pad_id == 0 and tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("Ġunreachable") == tokens.index("Ġunreachable")
    assert tok.vocab_size == len(tokens)
    for skip in (False, True):
        for i in range(len(tokens)):
            assert tok.decode([i], skip_special_tokens=skip) == hf.decode([i], skip_special_tokens=skip), i
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokens)) for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    for text in [
        "the hello hell<|endoftext|> the",
        "<|im_start|>user\nhello<|im_end|>",
        " unreachable 🙂",
        "<tool_call>he",
    ]:
        assert tok.encode(text, add_bos=False, add_eos=False) == hf.encode(text, add_special_tokens=False).ids, text
    again = pickle.loads(pickle.dumps(tok))
    assert again.decode([0, 5, tokens.index("Ġunreachable")], skip_special_tokens=False) == tok.decode(
        [0, 5, tokens.index("Ġunreachable")], skip_special_tokens=False
    )
