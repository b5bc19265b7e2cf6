"""Byte-level BPE on tiktoken's Rust core, shared by the tiktoken-file and HF-json back ends."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Sequence

import regex
import tiktoken

from tinytune.tokenizers.base import AddedToken, Tokenizer
from tinytune.tokenizers.byte_level import bytes_to_token, token_to_bytes


def _missing_byte_regex(missing: Sequence[int]) -> re.Pattern | None:
    """A regex matching any character whose UTF-8 form contains one of `missing` bytes.

    Only lead bytes and ASCII are handled precisely; a missing continuation byte (0x80-0xBF)
    would make almost every non-ASCII text suspect, so then every non-ASCII char matches.
    """
    ranges: list[tuple[int, int]] = []
    for b in sorted(set(missing)):
        if b < 0x80:
            ranges.append((b, b))
        elif b < 0xC0:
            ranges.append((0x80, 0x10FFFF))
        elif 0xC2 <= b <= 0xDF:
            lo = (b - 0xC0) << 6
            ranges.append((lo, lo + 0x3F))
        elif 0xE0 <= b <= 0xEF:
            lo = (b - 0xE0) << 12
            ranges.append((max(lo, 0x800), lo + 0xFFF))
        elif 0xF0 <= b <= 0xF4:
            lo = (b - 0xF0) << 18
            ranges.append((max(lo, 0x10000), min(lo + 0x3FFFF, 0x10FFFF)))
        # 0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8 produced from a Python str.
    if not ranges:
        return None
    cls = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)
    return re.compile(f"[{cls}]")


class BPETokenizer(Tokenizer):
    """Byte-level BPE encoded by `tiktoken.Encoding` (Rust), with HF-compatible details.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank and first looks a
    whole pre-token up in the vocabulary; with ranks that follow the merge priority this equals
    HF's merge-list BPE (see `hf_json.py` for the conversion and its checks).

    Args:
        mergeable_ranks: token bytes -> rank (the merge priority; equals the id unless `rank_to_id`).
        pat_str: the pre-tokenization regex (tiktoken / fancy-regex syntax).
        added_tokens: tokens parsed out of the text before BPE.
        rank_to_id: optional table mapping tiktoken ranks (and added-token ranks, see below) to
            ids, for vocabularies whose ids do not follow merge priority.
        missing_bytes: bytes absent from the vocabulary; HF drops them, so do we.
        decode_only: id -> bytes of vocabulary tokens that encoding never produces (no merge
            builds them) but that decode like any other id, as in HF.
        nfc: apply Unicode NFC normalization first (Qwen2 `normalizer: NFC`).
        **kwargs: forwarded to `Tokenizer` (vocab_size, bos_id, eos_id, ...).
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pat_str: str,
        added_tokens: Sequence[AddedToken],
        *,
        rank_to_id: Sequence[int] | None = None,
        missing_bytes: Sequence[int] = (),
        decode_only: dict[int, bytes] | None = None,
        nfc: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(added_tokens=added_tokens, **kwargs)
        self._decode_only = dict(decode_only or {})
        self._decode_only_by_bytes = {data: i for i, data in self._decode_only.items()}
        self._ranks = mergeable_ranks
        self._pat_str = pat_str
        self._rank_to_id_arg = list(rank_to_id) if rank_to_id is not None else None
        self._rank_to_id = self._rank_to_id_arg
        self._missing_bytes = sorted(set(missing_bytes))
        self._nfc = nfc

        ranks = dict(mergeable_ranks)
        next_rank = max(list(ranks.values()) + [self.vocab_size - 1]) + 1
        # tiktoken needs all 256 single bytes; absent ones get phantom ranks and are dropped.
        self._phantom: set[int] = set()
        for b in self._missing_bytes:
            ranks[bytes([b])] = next_rank
            self._phantom.add(next_rank)
            next_rank += 1
        if self._rank_to_id is None:
            special_ranks = {t.content: t.id for t in self.added_tokens}
            self._id_to_rank = None
        else:
            special_ranks = {}
            table = list(self._rank_to_id) + [-1] * max(0, next_rank - len(self._rank_to_id))
            for t in self.added_tokens:
                special_ranks[t.content] = len(table)
                table.append(t.id)
            self._rank_to_id = table
            self._id_to_rank = {i: r for r, i in enumerate(table) if i >= 0}
        self._enc = tiktoken.Encoding(self.name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_ranks)
        self._added_set = frozenset(special_ranks)
        self._missing_re = _missing_byte_regex(self._missing_bytes)
        self._slow_regex = None
        contents = [t.content for t in self.added_tokens]
        prefix_clash = (
            any(a != b and b.startswith(a) for a in contents for b in contents) if len(contents) < 2000 else True
        )
        needs_strip = any(t.lstrip or t.rstrip for t in self.added_tokens)
        # tiktoken matches specials leftmost-first in arbitrary order; HF matches leftmost-longest.
        self._native_specials = not (prefix_clash or needs_strip)
        self._added_first_chars = tuple(sorted({c[0] for c in contents if c}))
        self._split_re = None
        if not self._native_specials and self.added_tokens:
            alts = []
            for t in sorted(self.added_tokens, key=lambda t: -len(t.content)):
                alts.append(("\\s*" if t.lstrip else "") + re.escape(t.content) + ("\\s*" if t.rstrip else ""))
            self._split_re = re.compile("(" + "|".join(alts) + ")")
            self._strip_lookup = {t.content: t for t in self.added_tokens}

    # ---- encoding -----------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._missing_re is not None and self._missing_re.search(text):
            ranks = self._encode_with_missing(text)
        elif self._native_specials:
            ranks = self._enc.encode(text, allowed_special=self._added_set, disallowed_special=())
        else:
            ranks = []
            for chunk, is_added in self._split(text):
                if is_added:
                    ranks.append(self._enc._special_tokens[chunk])
                elif chunk:
                    ranks.extend(self._enc.encode_ordinary(chunk))
        if self._rank_to_id is not None:
            table = self._rank_to_id
            return [table[r] for r in ranks]
        return ranks

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Like ``[self._encode_text(t) for t in texts]``, faster: texts that hold no added-token
        text, no byte missing from the vocabulary and need no normalization go straight to
        tiktoken's ``encode_ordinary`` (no per-call special-token set), the rest take `_encode_text`."""
        ordinary = getattr(getattr(self._enc, "_core_bpe", None), "encode_ordinary", None) or self._enc.encode_ordinary
        firsts = self._added_first_chars
        missing = self._missing_re
        table = self._rank_to_id
        out: list[list[int]] = []
        for t in texts:
            if (
                (self._nfc and not t.isascii())
                or (missing is not None and missing.search(t))
                or (firsts and any(c in t for c in firsts))
            ):
                out.append(self._encode_text(t))
                continue
            try:
                ranks = ordinary(t)
            except UnicodeEncodeError:  # lone surrogates: tiktoken's public wrapper repairs them
                out.append(self._encode_text(t))
                continue
            out.append(ranks if table is None else [table[r] for r in ranks])
        return out

    def _split(self, text: str):
        """Yields (chunk, is_added_token) with HF's leftmost-longest matching and lstrip/rstrip."""
        if self._split_re is None:
            yield text, False
            return
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2 == 0:
                yield part, False
            else:
                yield part.strip() if part not in self._strip_lookup else part, True

    def _encode_with_missing(self, text: str) -> list[int]:
        """Slow path for text holding bytes the vocabulary lacks: pre-tokenize, drop them, then BPE."""
        if self._slow_regex is None:
            self._slow_regex = regex.compile(self._pat_str)
        drop = bytes(self._missing_bytes)
        out: list[int] = []
        chunks = self._split(text) if not self._native_specials else self._split_native(text)
        for chunk, is_added in chunks:
            if is_added:
                out.append(self._enc._special_tokens[chunk])
                continue
            for piece in self._slow_regex.findall(chunk):
                data = piece.encode("utf-8").translate(None, drop)
                if data:
                    out.extend(self._enc._encode_single_piece(data))
        return out

    def _split_native(self, text: str):
        if not self.added_tokens:
            yield text, False
            return
        alts = sorted((t.content for t in self.added_tokens), key=len, reverse=True)
        pattern = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")")
        for i, part in enumerate(pattern.split(text)):
            yield part, i % 2 == 1

    # ---- decoding -----------------------------------------------------------------------------
    def _decode_ids(self, ids: list[int]) -> str:
        if self._decode_only and any(i in self._decode_only for i in ids):
            parts: list[bytes] = []
            run: list[int] = []
            for i in ids + [-1]:
                if i >= 0 and i not in self._decode_only:
                    run.append(i)
                    continue
                if run:
                    parts.append(self._decode_bytes(run))
                    run = []
                if i >= 0:
                    parts.append(self._decode_only[i])
            return b"".join(parts).decode("utf-8", errors="replace")
        return self._decode_bytes(ids).decode("utf-8", errors="replace")

    def _decode_bytes(self, ids: list[int]) -> bytes:
        if self._id_to_rank is not None:
            try:
                ids = [self._id_to_rank[i] for i in ids]
            except KeyError as e:
                raise ValueError(f"{self.name}: id {e.args[0]} is not assigned to any token") from None
        try:
            return self._enc.decode_bytes(ids)
        except KeyError as e:
            raise ValueError(f"{self.name}: id {e.args[0]} is not assigned to any token") from None

    def _vocab_lookup(self, token: str) -> int | None:
        for data in (token_to_bytes(token), token.encode("utf-8")):
            if data is not None and data in self._ranks:
                r = self._ranks[data]
                return self._rank_to_id[r] if self._rank_to_id is not None else r
            if data is not None and data in self._decode_only_by_bytes:
                return self._decode_only_by_bytes[data]
        return None

    def id_to_token(self, token_id: int) -> str:
        """Returns the byte-level spelling of a vocabulary id (added tokens: their content)."""
        if token_id in self._added_by_id:
            return self._added_by_id[token_id].content
        if token_id in self._decode_only:
            return bytes_to_token(self._decode_only[token_id])
        rank = self._id_to_rank[token_id] if self._id_to_rank is not None else token_id
        return bytes_to_token(self._enc.decode_single_token_bytes(rank))

    # ---- pickling -----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = self._common_state()
        state.update(
            mergeable_ranks=self._ranks,
            pat_str=self._pat_str,
            rank_to_id=self._rank_to_id_arg,
            missing_bytes=self._missing_bytes,
            decode_only=self._decode_only,
            nfc=self._nfc,
        )
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "BPETokenizer":
        state = dict(state)
        return cls(state.pop("mergeable_ranks"), state.pop("pat_str"), state.pop("added_tokens"), **state)
