"""`load_tokenizer(path)`: back-end detection and HF `tokenizer_config.json` handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinytune.errors import TinytuneError
from tinytune.tokenizers.base import AddedToken, Tokenizer
from tinytune.tokenizers.bpe import BPETokenizer
from tinytune.tokenizers.gguf import hf_tokenizer_files_from_gguf
from tinytune.tokenizers.hf_json import (
    bpe_kwargs_from_tokenizer_json,
    build_ranks,
    read_json,
    read_merges_txt,
)
from tinytune.tokenizers.patterns import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN
from tinytune.tokenizers.sentencepiece import SentencePieceTokenizer
from tinytune.tokenizers.special_tokens import QWEN_NON_SPECIAL, llama3_special_tokens, qwen_special_tokens
from tinytune.tokenizers.tiktoken_file import is_tiktoken_file, load_tiktoken_ranks

#: Added tokens that end a turn or a document in the supported families (stop generation).
END_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>", "</s>", "<end_of_turn>")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_GUESSES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


def _token_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _chat_template(config: dict[str, Any], directory: Path | None) -> str | None:
    if directory is not None and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return tpl


def _read_config(directory: Path | None) -> dict[str, Any]:
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        return {}
    cfg = read_json(directory / "tokenizer_config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{directory / 'tokenizer_config.json'}: expected a JSON object")
    return cfg


def _generation_eos(directory: Path | None) -> list[int]:
    if directory is None or not (directory / "generation_config.json").is_file():
        return []
    eos = read_json(directory / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _config_added_tokens(config: dict[str, Any]) -> list[AddedToken]:
    dec = config.get("added_tokens_decoder") or {}
    return [
        AddedToken(
            content=v["content"],
            id=int(k),
            special=bool(v.get("special", False)),
            lstrip=bool(v.get("lstrip", False)),
            rstrip=bool(v.get("rstrip", False)),
        )
        for k, v in sorted(dec.items(), key=lambda kv: int(kv[0]))
    ]


def _template_bos(post: dict[str, Any] | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts in front of a sequence."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        for p in post.get("processors", []):
            found = _template_bos(p)
            if found:
                return found
        return None
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def _resolve_ids(
    tok_lookup, config: dict[str, Any], added: list[AddedToken], *, default_bos: str | None, default_add_bos: bool
) -> dict[str, Any]:
    """bos/eos/pad ids, add_bos_token and stop tokens from the config, else from the added tokens' names."""
    names = {t.content for t in added}

    def pick(key: str, guesses: tuple[str, ...]) -> str | None:
        if key in config:
            return _token_str(config[key])
        return next((g for g in guesses if g in names), None)

    bos = pick("bos_token", (default_bos,) if default_bos else _BOS_GUESSES)
    eos = pick("eos_token", _EOS_GUESSES)
    pad = _token_str(config.get("pad_token"))

    def to_id(name: str | None, key: str) -> int | None:
        if name is None:
            return None
        i = tok_lookup(name)
        if i is None:
            raise ValueError(f"tokenizer_config.json: {key}={name!r} is not in the vocabulary")
        return i

    return dict(
        bos_id=to_id(bos, "bos_token"),
        eos_id=to_id(eos, "eos_token"),
        pad_id=to_id(pad, "pad_token"),
        add_bos_token=bool(config.get("add_bos_token", default_add_bos)),
        stop_tokens=[t.id for t in added if t.content in END_TOKENS],
    )


def _finish_bpe(
    kwargs: dict[str, Any],
    config: dict[str, Any],
    directory: Path | None,
    *,
    default_bos=None,
    default_add_bos=False,
    name: str,
) -> BPETokenizer:
    added = kwargs["added_tokens"]
    by_content = {t.content: t.id for t in added}
    ranks = kwargs["mergeable_ranks"]
    r2i = kwargs.get("rank_to_id")
    unranked = {data: i for i, data in (kwargs.get("decode_only") or {}).items()}

    def lookup(s: str) -> int | None:
        if s in by_content:
            return by_content[s]
        r = ranks.get(s.encode("utf-8"))
        if r is None:
            return unranked.get(s.encode("utf-8"))  # e.g. a GGUF's <|endoftext|> that no merge builds
        return r2i[r] if r2i is not None else r

    ids = _resolve_ids(lookup, config, added, default_bos=default_bos, default_add_bos=default_add_bos)
    ids["stop_tokens"] = ids["stop_tokens"] + _generation_eos(directory)
    return BPETokenizer(**kwargs, **ids, chat_template=_chat_template(config, directory), name=name)


def hf_json_tokenizer(
    path: str | Path, *, config: dict[str, Any] | None = None, tokenizer_json: dict[str, Any] | None = None
) -> Tokenizer:
    """Byte-level BPE from an HF `tokenizer.json` (Llama 3 HF, Qwen2/2.5/3, SmolLM2), run on tiktoken.

    Args:
        path: the `tokenizer.json` file or its directory (a sibling `tokenizer_config.json`
            supplies bos/eos/pad, `add_bos_token` and `chat_template`).
        config: an already parsed `tokenizer_config.json` (overrides the sibling file).
        tokenizer_json: an already parsed `tokenizer.json` (then `path` is only used in messages).
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    directory = file.parent if file.parent.is_dir() else None
    data = tokenizer_json if tokenizer_json is not None else read_json(file)
    cfg = config if config is not None else _read_config(directory)
    kwargs = bpe_kwargs_from_tokenizer_json(data, str(file))
    # A tokenizer_config.json may add tokens the tokenizer.json lacks.
    known = {t.id for t in kwargs["added_tokens"]}
    extra = [t for t in _config_added_tokens(cfg) if t.id not in known]
    if extra:
        kwargs["added_tokens"] = kwargs["added_tokens"] + extra
        kwargs["vocab_size"] = max(kwargs["vocab_size"], max(t.id for t in extra) + 1)
    post_bos = _template_bos(data.get("post_processor"))
    return _finish_bpe(
        kwargs,
        cfg,
        directory,
        default_bos=post_bos,
        default_add_bos=post_bos is not None,
        name=f"hf-bpe:{file.parent.name}",
    )


def vocab_merges_tokenizer(directory: str | Path) -> Tokenizer:
    """Byte-level BPE from `vocab.json` + `merges.txt` (GPT-2 / Qwen2 slow-tokenizer files).

    The pre-tokenizer comes from `tokenizer_config.json`'s ``tokenizer_class``: Qwen2 classes use
    the Qwen2 regex and NFC, anything else GPT-2's regex. Added tokens come from
    ``added_tokens_decoder``.
    """
    directory = Path(directory)
    vocab = read_json(directory / "vocab.json")
    merges = read_merges_txt(directory / "merges.txt")
    cfg = _read_config(directory)
    cls = str(cfg.get("tokenizer_class", ""))
    qwen = cls.startswith("Qwen2")
    added = _config_added_tokens(cfg)
    built = build_ranks(vocab, merges, {t.id for t in added}, False, str(directory / "vocab.json"))
    kwargs = dict(
        mergeable_ranks=built["mergeable_ranks"],
        rank_to_id=built["rank_to_id"],
        missing_bytes=built["missing_bytes"],
        decode_only=built["decode_only"],
        pat_str=QWEN2_PATTERN if qwen else GPT2_PATTERN,
        nfc=qwen,
        added_tokens=added,
        vocab_size=max([*vocab.values(), *(t.id for t in added)]) + 1,
    )
    return _finish_bpe(kwargs, cfg, directory, name=f"hf-bpe:{directory.name}")


def tiktoken_tokenizer(path: str | Path, family: str | None = None, config: dict[str, Any] | None = None) -> Tokenizer:
    """A tiktoken BPE file with its family's regex and special tokens.

    Args:
        path: the file (Llama 3 `tokenizer.model`, `qwen.tiktoken`).
        family: "llama3" or "qwen"; guessed from the file name and size when None.
        config: parsed `tokenizer_config.json`; its ``added_tokens_decoder``, bos/eos/pad and
            ``chat_template`` replace the family defaults.
    """
    path = Path(path)
    cfg = config if config is not None else _read_config(path.parent)
    ranks = load_tiktoken_ranks(path)
    if family is None:
        if "qwen" in path.name.lower() or len(ranks) == 151643:
            family = "qwen"
        elif len(ranks) == 128000:
            family = "llama3"
        else:
            raise ValueError(
                f"{path}: cannot tell the tokenizer family of a tiktoken file with {len(ranks)} ranks; "
                "use tinytune.tokenizers.llama3_tokenizer / qwen2_tokenizer / qwen3_tokenizer"
            )
    if family == "llama3":
        pat, nfc, specials = LLAMA3_PATTERN, False, llama3_special_tokens("3.1")
        added = [AddedToken(s, i, special=True) for s, i in specials.items()]
        defaults = dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)
    elif family == "qwen":
        pat, nfc, specials = QWEN2_PATTERN, True, qwen_special_tokens("3")
        added = [AddedToken(s, i, special=s not in QWEN_NON_SPECIAL) for s, i in specials.items()]
        defaults = dict(bos=None, eos="<|endoftext|>", add_bos=False)
    else:
        raise ValueError(f"unknown tiktoken family {family!r}; use 'llama3' or 'qwen'")
    if cfg.get("added_tokens_decoder"):
        added = _config_added_tokens(cfg)
    if "bos_token" not in cfg and defaults["bos"]:
        cfg = {**cfg, "bos_token": defaults["bos"]}
    if "eos_token" not in cfg:
        cfg = {**cfg, "eos_token": defaults["eos"]}
    if family == "qwen" and "pad_token" not in cfg:
        cfg = {**cfg, "pad_token": "<|endoftext|>"}
    if family == "llama3" and "pad_token" not in cfg and any(t.content == "<|finetune_right_pad_id|>" for t in added):
        cfg = {**cfg, "pad_token": "<|finetune_right_pad_id|>"}
    kwargs = dict(
        mergeable_ranks=ranks,
        pat_str=pat,
        nfc=nfc,
        added_tokens=added,
        vocab_size=max(max(ranks.values()), max((t.id for t in added), default=-1)) + 1,
    )
    return _finish_bpe(kwargs, cfg, path.parent, default_add_bos=defaults["add_bos"], name=f"{family}:{path.name}")


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer built from a GGUF file's metadata (via `hf_tokenizer_files_from_gguf`)."""
    path = Path(path)
    files = hf_tokenizer_files_from_gguf(path)
    return hf_json_tokenizer(
        path,
        config=json.loads(files["tokenizer_config.json"]),
        tokenizer_json=json.loads(files["tokenizer.json"]),
    )


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """SentencePiece `tokenizer.model` (Llama 2, Mistral); a sibling `tokenizer_config.json` is honoured."""
    path = Path(path)
    file = path / "tokenizer.model" if path.is_dir() else path
    cfg = _read_config(file.parent)
    tok = SentencePieceTokenizer.from_file(file, name=f"sentencepiece:{file.name}")
    if not cfg:
        return tok
    added = list(tok.added_tokens)
    known = {t.id for t in added}
    added += [t for t in _config_added_tokens(cfg) if t.id not in known]
    by_content = {t.content: t.id for t in added}
    ids = _resolve_ids(
        lambda s: by_content[s] if s in by_content else tok.token_to_id(s),
        cfg,
        added,
        default_bos=None,
        default_add_bos=True,
    )
    ids["stop_tokens"] += _generation_eos(file.parent)
    return SentencePieceTokenizer(
        tok._proto, added_tokens=added, chat_template=_chat_template(cfg, file.parent), name=tok.name, **ids
    )


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class TokenizerError(TinytuneError, ValueError):
    """A tokenizer file or directory that cannot be used (the message names the file)."""


class TokenizerNotFoundError(TinytuneError, FileNotFoundError):
    """No tokenizer at the given path (the message names the path and the files looked for)."""


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer, detecting the back end (see :func:`_load_tokenizer`).

    Raises:
        TokenizerNotFoundError: (a FileNotFoundError) naming the path and the files looked for.
        TokenizerError: (a ValueError) naming the file when its content is unusable.
    """
    try:
        return _load_tokenizer(path)
    except TinytuneError:
        raise
    except FileNotFoundError as e:
        raise TokenizerNotFoundError(str(e)) from None
    except ValueError as e:
        raise TokenizerError(f"tokenizer {path}: {e}") from None


def _load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer, detecting the back end.

    Accepts a directory holding `tokenizer.json`, `tokenizer.model` (SentencePiece or tiktoken),
    `*.tiktoken`, `vocab.json` + `merges.txt`, or a single `.gguf`; or any of those files.
    `tokenizer_config.json` (chat template, bos/eos/pad, `add_bos_token`, added tokens),
    `chat_template.jinja` and `generation_config.json` (extra stop ids) are read when present.

    Args:
        path: file or directory.

    Returns:
        A `Tokenizer`.

    Raises:
        FileNotFoundError: naming the path and the files looked for.
        ValueError: naming the file when its content is unusable.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        candidates = [
            path / "tokenizer.json",
            path / "tokenizer.model",
            *sorted(path.glob("*.tiktoken")),
        ]
        for c in candidates:
            if c.is_file():
                return _load_tokenizer(c)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return vocab_merges_tokenizer(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_tokenizer(ggufs[0])
        raise FileNotFoundError(
            f"no tokenizer found in {path}: looked for tokenizer.json, tokenizer.model, *.tiktoken, "
            f"vocab.json+merges.txt or a single *.gguf (found {len(ggufs)} .gguf files)"
        )
    if path.suffix == ".gguf" or _is_gguf(path):
        return gguf_tokenizer(path)
    if path.suffix == ".json":
        if path.name == "vocab.json":
            return vocab_merges_tokenizer(path.parent)
        return hf_json_tokenizer(path)
    if is_tiktoken_file(path):
        return tiktoken_tokenizer(path)
    return sentencepiece_tokenizer(path)
