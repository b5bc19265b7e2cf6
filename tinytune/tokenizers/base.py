"""The one `Tokenizer` interface shared by every back end (see docs/ARCHITECTURE.md, "Tokenizer")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

from tinytune.tokenizers.batch import encode_batch as _encode_batch


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole in raw text before the back end's own splitting.

    Mirrors one entry of `added_tokens` in a Hugging Face `tokenizer.json`.

    Args:
        content: the literal text, e.g. ``"<|im_start|>"``.
        id: its token id.
        special: True for control tokens (dropped by ``decode(..., skip_special_tokens=True)``).
        lstrip: the match also swallows whitespace on its left.
        rstrip: the match also swallows whitespace on its right.
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


class Tokenizer(ABC):
    """Common behaviour: BOS/EOS policy, special-token tables, batching and pickling.

    Back ends implement `_encode_text` (text -> ids, added tokens parsed, no BOS/EOS),
    `_decode_ids`, `_vocab_lookup`, `_state` and `_from_state`.

    Args:
        added_tokens: tokens parsed out of raw text as a whole.
        vocab_size: number of ids (max id + 1, added tokens included).
        bos_id: beginning-of-sequence id or None.
        eos_id: end-of-sequence id or None.
        pad_id: padding id or None.
        stop_tokens: ids that end generation; ``eos_id`` is always included.
        add_bos_token: whether the model expects BOS in front of every sequence. When False,
            ``encode(add_bos=True)`` adds nothing (e.g. SmolLM2, whose "BOS" is ``<|im_start|>``).
        chat_template: the Jinja chat template, if the files carry one.
        name: a short label for messages and benchmarks.
    """

    def __init__(
        self,
        *,
        added_tokens: Sequence[AddedToken],
        vocab_size: int,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        stop_tokens: Sequence[int] = (),
        add_bos_token: bool = True,
        chat_template: str | None = None,
        name: str = "tokenizer",
    ) -> None:
        self.added_tokens = list(added_tokens)
        self.special_tokens: dict[str, int] = {t.content: t.id for t in self.added_tokens if t.special}
        self._added_by_content = {t.content: t.id for t in self.added_tokens}
        self._added_by_id = {t.id: t for t in self.added_tokens}
        self._special_ids = frozenset(self.special_tokens.values())
        self.vocab_size = int(vocab_size)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        stops = list(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(stop_tokens)))
        self.stop_tokens: list[int] = stops
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.name = name

    # ---- public API -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Encodes text to ids; added/special tokens written in the text become their ids.

        Args:
            text: the input string.
            add_bos: prepend BOS when the model uses one (``add_bos_token``) and it exists.
            add_eos: append EOS when it exists.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"{self.name}: encode() expects a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        if add_bos and self.add_bos_token and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decodes ids to text.

        Args:
            ids: token ids (any int sequence, e.g. a list or a 1-D tensor's ``tolist()``).
            skip_special_tokens: drop special tokens (BOS, EOS, ``<|im_end|>``...) from the output.

        Returns:
            The text; invalid UTF-8 from partial byte sequences becomes U+FFFD.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise ValueError(f"{self.name}: cannot decode ids {bad[:5]} (valid ids are 0..{self.vocab_size - 1})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode_ids(ids)

    def token_to_id(self, token: str) -> int | None:
        """Returns the id of an added/special token or of a vocabulary entry, or None.

        Vocabulary entries are looked up in the back end's own spelling (``"Ġhello"`` for
        byte-level BPE, ``"▁hello"`` for SentencePiece) and, for BPE, also as plain text.
        """
        if token in self._added_by_content:
            return self._added_by_content[token]
        return self._vocab_lookup(token)

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = True,
        add_eos: bool = True,
        num_workers: int = 1,
        chunk_size: int | None = None,
        mp_context: str | None = None,
    ) -> list[list[int]]:
        """Encodes many texts, optionally in `num_workers` processes (order is kept).

        Args:
            texts: the strings.
            add_bos: as in :meth:`encode`.
            add_eos: as in :meth:`encode`.
            num_workers: processes to use; 1 runs inline.
            chunk_size: texts per task sent to a worker (default: about 4 tasks per worker).
            mp_context: multiprocessing start method ("fork", "spawn", "forkserver"); default
                is the platform default. The tokenizer is pickled by its construction data.

        Returns:
            One id list per text.
        """
        return _encode_batch(self, texts, add_bos, add_eos, num_workers, chunk_size, mp_context)

    # ---- pickling: rebuild from construction data (files are not re-read) ------------------
    def __reduce__(self):
        return (type(self)._from_state, (self._state(),))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_tokens={self.stop_tokens})"
        )

    def _common_state(self) -> dict[str, Any]:
        return dict(
            added_tokens=self.added_tokens,
            vocab_size=self.vocab_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            stop_tokens=self.stop_tokens,
            add_bos_token=self.add_bos_token,
            chat_template=self.chat_template,
            name=self.name,
        )

    # ---- back-end hooks ---------------------------------------------------------------------
    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Text -> ids with added tokens parsed, no BOS/EOS."""

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> ids (added tokens parsed, no BOS/EOS); back ends may override it with a
        faster loop. Must equal ``[self._encode_text(t) for t in texts]``."""
        return [self._encode_text(t) for t in texts]

    @abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Ids (already validated) -> text; added tokens render as their content."""

    @abstractmethod
    def _vocab_lookup(self, token: str) -> int | None:
        """Back-end vocabulary lookup for :meth:`token_to_id`."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer in another process."""

    @classmethod
    @abstractmethod
    def _from_state(cls, state: dict[str, Any]) -> "Tokenizer":
        """Inverse of :meth:`_state`."""
