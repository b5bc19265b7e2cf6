"""GGUF tokenizer metadata -> HF tokenizer files (`tokenizer.json`, `tokenizer_config.json`, ...).

The checkpoint helper (`tune convert gguf`) writes the returned files next to the converted
weights; `load_tokenizer("model.gguf")` builds a tokenizer from the same files in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinytune.tokenizers.patterns import LLAMA3_PATTERN, QWEN2_PATTERN

# llama.cpp `tokenizer.ggml.token_type` values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def _split_byte_level(pattern: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


#: `tokenizer.ggml.pre` -> (normalizer, pre_tokenizer, ignore_merges)
_PRE_TOKENIZERS: dict[str, tuple[dict | None, dict, bool]] = {
    "smollm": (
        None,
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        False,
    ),
    "gpt-2": (None, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, False),
    "llama-bpe": (None, _split_byte_level(LLAMA3_PATTERN), True),
    "qwen2": ({"type": "NFC"}, _split_byte_level(QWEN2_PATTERN), False),
}
_PRE_TOKENIZERS["default"] = _PRE_TOKENIZERS["gpt-2"]
_PRE_TOKENIZERS["llama3"] = _PRE_TOKENIZERS["llama-bpe"]


def read_gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """Reads the `tokenizer.*` keys (and the context length) of a GGUF file with `gguf.GGUFReader`.

    Returns:
        ``{key: value}`` with arrays as Python lists.

    Raises:
        FileNotFoundError / ValueError: naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        import gguf  # noqa: PLC0415 (optional: gguf)
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/... on garbage
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    arch = None
    for key, field in reader.fields.items():
        if key == "general.architecture":
            arch = field.contents()
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or (arch and key == f"{arch}.context_length"):
            meta[key] = field.contents()
    meta["general.architecture"] = arch
    if "tokenizer.ggml.model" not in meta:
        raise ValueError(f"{path}: GGUF file carries no tokenizer (no tokenizer.ggml.model key)")
    return meta


def hf_tokenizer_files_from_meta(meta: dict[str, Any], source: str = "GGUF") -> dict[str, str]:
    """Builds HF tokenizer files from GGUF tokenizer metadata (see `hf_tokenizer_files_from_gguf`)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') GGUF tokenizers "
            "can be converted (for SentencePiece models use the original tokenizer.model)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}")
    normalizer, pre_tokenizer, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    added = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (_CONTROL, _USER_DEFINED, _UNKNOWN):
            added.append(
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": typ != _USER_DEFINED,
                }
            )

    def token(key: str) -> str | None:
        i = meta.get(key)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise ValueError(f"{source}: {key}={i} is outside the vocabulary (size {len(tokens)})")
        return tokens[int(i)]

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    pad, unk = token("tokenizer.ggml.padding_token_id"), token("tokenizer.ggml.unknown_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    post: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        single: list[dict] = []
        pair: list[dict] = []
        specials: dict[str, Any] = {}
        for flag, tok in ((add_bos, bos), (add_eos, eos)):
            if flag and tok is not None:
                specials[tok] = {"id": tok, "ids": [tokens.index(tok)], "tokens": [tok]}
        if add_bos and bos is not None:
            single.append({"SpecialToken": {"id": bos, "type_id": 0}})
            pair.append({"SpecialToken": {"id": bos, "type_id": 0}})
        single.append({"Sequence": {"id": "A", "type_id": 0}})
        pair.append({"Sequence": {"id": "A", "type_id": 0}})
        if add_eos and eos is not None:
            single.append({"SpecialToken": {"id": eos, "type_id": 0}})
            pair.append({"SpecialToken": {"id": eos, "type_id": 0}})
        pair.append({"Sequence": {"id": "B", "type_id": 1}})
        template = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}
        post = {"type": "Sequence", "processors": [post, template]}

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": _BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    if len(tokenizer_json["model"]["vocab"]) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicate entries")

    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in added
        },
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    extra = [a["content"] for a in added if a["special"] and a["content"] not in (bos, eos, pad, unk)]
    if extra:
        config["additional_special_tokens"] = extra
    arch = meta.get("general.architecture")
    if arch and meta.get(f"{arch}.context_length"):
        config["model_max_length"] = int(meta[f"{arch}.context_length"])
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    special_map = {
        k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)) if v
    }
    if extra:
        special_map["additional_special_tokens"] = extra
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2),
    }


def hf_tokenizer_files_from_gguf(path: str | Path) -> dict[str, str]:
    """Converts a GGUF file's tokenizer metadata to HF tokenizer files.

    Handles byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with the
    pre-tokenizers named by ``tokenizer.ggml.pre`` ("smollm", "llama-bpe", "qwen2", "gpt-2").
    Control tokens become special added tokens, user-defined ones non-special added tokens;
    BOS/EOS/pad/unk, ``add_bos_token`` and ``tokenizer.chat_template`` go to `tokenizer_config.json`.
    Both `tokenizers.Tokenizer.from_file` and `tinytune.tokenizers.load_tokenizer` read the
    written files identically.

    Args:
        path: the `.gguf` file.

    Returns:
        ``{"tokenizer.json": str, "tokenizer_config.json": str, "special_tokens_map.json": str}``;
        write each string to a file of that name.
    """
    return hf_tokenizer_files_from_meta(read_gguf_tokenizer_metadata(path), source=str(path))
