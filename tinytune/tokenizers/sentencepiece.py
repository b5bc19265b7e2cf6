"""SentencePiece back end (Llama 2 / Mistral `tokenizer.model`): byte fallback, BOS/EOS."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sentencepiece as spm

from tinytune.tokenizers.base import AddedToken, Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """Wraps a SentencePiece model; control tokens written in text (``<s>``, ``</s>``, ``<unk>``)
    are parsed as their ids, and each stretch of text between them is encoded on its own, which
    is what HF's Llama tokenizer (``legacy=True``, the official Llama 2 `tokenizer.json`) does.

    Args:
        model_proto: the serialized model (the bytes of `tokenizer.model`).
        **kwargs: overrides for `Tokenizer` fields (bos_id, eos_id, pad_id, add_bos_token,
            chat_template, name, added_tokens). Defaults come from the model.
    """

    def __init__(self, model_proto: bytes, **kwargs: Any) -> None:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(model_proto)
        self._proto = model_proto
        self._sp = sp

        def opt(i: int) -> int | None:
            return None if i < 0 else i

        if "added_tokens" not in kwargs:
            kwargs["added_tokens"] = [
                AddedToken(sp.id_to_piece(i), i, special=True)
                for i in range(sp.get_piece_size())
                if sp.is_control(i) or sp.is_unknown(i)
            ]
        kwargs.setdefault("vocab_size", sp.get_piece_size())
        kwargs.setdefault("bos_id", opt(sp.bos_id()))
        kwargs.setdefault("eos_id", opt(sp.eos_id()))
        kwargs.setdefault("pad_id", opt(sp.pad_id()))
        kwargs.setdefault("name", "sentencepiece")
        super().__init__(**kwargs)
        contents = sorted((t.content for t in self.added_tokens if t.content), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "SentencePieceTokenizer":
        """Loads `tokenizer.model`; errors name the path."""
        path = Path(path)
        try:
            proto = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {path}") from None
        try:
            return cls(proto, **kwargs)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None

    def _encode_text(self, text: str) -> list[int]:
        if self._split_re is None or not self._split_re.search(text):
            return self._sp.encode(text)
        out: list[int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:
                out.append(self._added_by_content[part])
            elif part:
                out.extend(self._sp.encode(part))
        return out

    def _decode_ids(self, ids: list[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._added_by_id:
                if run:
                    pieces.append(self._sp.decode(run))
                    run = []
                pieces.append(self._added_by_id[i].content)
            else:
                run.append(i)
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def _vocab_lookup(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def _state(self) -> dict[str, Any]:
        state = self._common_state()
        state["model_proto"] = self._proto
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "SentencePieceTokenizer":
        state = dict(state)
        return cls(state.pop("model_proto"), **state)
