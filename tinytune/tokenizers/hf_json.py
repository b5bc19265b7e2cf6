"""HF byte-level BPE files (`tokenizer.json`, or `vocab.json` + `merges.txt`) -> tiktoken ranks.

The conversion: undo the byte-level character map (``Ġ`` -> space byte), give every token
produced by merge number ``k`` a rank that grows with ``k``, and let tiktoken merge lowest rank
first. Where the vocabulary ids already grow with the merge order (Llama 3, Qwen2, SmolLM2),
ranks are the ids and no remapping happens; otherwise a rank -> id table is kept.
Tokens no merge can build are left out of the ranks (HF's merge-list BPE can never emit them)
unless the model sets ``ignore_merges`` (then HF, like tiktoken, looks whole pieces up first);
they stay decodable (``decode_only``), as in HF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinytune.tokenizers.base import AddedToken
from tinytune.tokenizers.byte_level import token_to_bytes
from tinytune.tokenizers.patterns import pattern_from_pre_tokenizer


def _normalizer_is_nfc(normalizer: dict[str, Any] | None, source: str) -> bool:
    if normalizer is None:
        return False
    kind = normalizer.get("type")
    if kind == "NFC":
        return True
    if kind == "Sequence":
        subs = [_normalizer_is_nfc(n, source) for n in normalizer.get("normalizers", [])]
        if len(subs) <= 1:
            return bool(subs and subs[0])
    raise ValueError(f"{source}: unsupported normalizer {normalizer!r} (only NFC or none)")


def parse_merges(merges: list[Any], source: str) -> list[tuple[str, str]]:
    """Accepts both merge spellings: ``"a b"`` strings and ``["a", "b"]`` pairs."""
    out = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{source}: merge #{i} {m!r} is not 'left right'")
            out.append((parts[0], parts[1]))
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            out.append((m[0], m[1]))
        else:
            raise ValueError(f"{source}: merge #{i} {m!r} is neither 'a b' nor ['a', 'b']")
    return out


def build_ranks(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added_ids: set[int],
    ignore_merges: bool,
    source: str,
) -> dict[str, Any]:
    """Builds tiktoken ranks from a byte-level vocab and its merge list.

    Returns:
        dict with ``mergeable_ranks``, ``rank_to_id`` (None when ranks are the ids),
        ``missing_bytes``, ``decode_only`` (id -> bytes of the tokens no merge can build and that
        are not ranked: never produced by encoding, but decoded like any id) and ``stats``.
    """
    id_bytes: dict[int, bytes] = {}
    bad: list[str] = []
    for tok, i in vocab.items():
        if i in added_ids:
            continue
        data = token_to_bytes(tok)
        if data is None:
            bad.append(tok)
            continue
        id_bytes[i] = data
    if bad and len(bad) > 0.01 * max(1, len(vocab)):
        raise ValueError(
            f"{source}: {len(bad)} vocabulary entries are not byte-level tokens (e.g. {bad[:3]}); "
            "this is not a byte-level BPE vocabulary"
        )
    bytes_id = {b: i for i, b in id_bytes.items()}
    single = {b[0]: i for b, i in bytes_id.items() if len(b) == 1}
    missing = [b for b in range(256) if b not in single]

    # Merge order: first merge that produces each token.
    order: list[bytes] = []
    seen: set[bytes] = set()
    for k, (a, b) in enumerate(merges):
        ab = token_to_bytes(a + b)
        if ab is None or ab not in bytes_id:
            raise ValueError(f"{source}: merge #{k} ({a!r}, {b!r}) produces {a + b!r}, which is not in the vocab")
        if len(ab) > 1 and ab not in seen:
            seen.add(ab)
            order.append(ab)
    reachable = set(single.values()) | {bytes_id[t] for t in order}
    orphans = [i for i in id_bytes if i not in reachable]

    ids_in_order = [bytes_id[t] for t in order]
    monotonic = all(x < y for x, y in zip(ids_in_order, ids_in_order[1:]))
    keep_orphans = ignore_merges
    if monotonic and (not keep_orphans or not orphans):
        ranks = {id_bytes[i]: i for i in reachable}
        rank_to_id = None
    else:
        # Ranks: single bytes first, then merge order, then (ignore_merges) orphans last.
        ranks = {}
        rank_to_id = []
        for b in sorted(single):
            ranks[bytes([b])] = len(rank_to_id)
            rank_to_id.append(single[b])
        for t in order:
            ranks[t] = len(rank_to_id)
            rank_to_id.append(bytes_id[t])
        if keep_orphans:
            for i in sorted(orphans):
                ranks[id_bytes[i]] = len(rank_to_id)
                rank_to_id.append(i)
    return dict(
        mergeable_ranks=ranks,
        rank_to_id=rank_to_id,
        missing_bytes=missing,
        decode_only={} if keep_orphans else {i: id_bytes[i] for i in orphans},
        stats=dict(orphans=len(orphans), monotonic=monotonic, non_byte_level=len(bad)),
    )


def added_tokens_from_json(entries: list[dict[str, Any]]) -> list[AddedToken]:
    """`added_tokens` list of tokenizer.json -> `AddedToken`s."""
    return [
        AddedToken(
            content=e["content"],
            id=int(e["id"]),
            special=bool(e.get("special", False)),
            lstrip=bool(e.get("lstrip", False)),
            rstrip=bool(e.get("rstrip", False)),
        )
        for e in entries
    ]


def bpe_kwargs_from_tokenizer_json(data: dict[str, Any], source: str = "tokenizer.json") -> dict[str, Any]:
    """Reads a parsed `tokenizer.json` into `BPETokenizer` keyword arguments.

    Args:
        data: the parsed JSON.
        source: the file path, for error messages.

    Returns:
        kwargs: mergeable_ranks, pat_str, added_tokens, rank_to_id, missing_bytes, decode_only, nfc,
        vocab_size.

    Raises:
        ValueError: when the file is not a byte-level BPE tokenizer this back end can run.
    """
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: model.type is {model.get('type')!r}; only byte-level 'BPE' is supported here")
    if model.get("byte_fallback"):
        raise ValueError(
            f"{source}: BPE with byte_fallback (SentencePiece-style) is not byte-level; use tokenizer.model"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{source}: continuing_subword_prefix/end_of_word_suffix are not supported")
    if model.get("dropout"):
        raise ValueError(f"{source}: BPE dropout is not supported")
    decoder = data.get("decoder") or {}
    if decoder and decoder.get("type") != "ByteLevel":
        raise ValueError(f"{source}: decoder {decoder.get('type')!r} is not ByteLevel")
    pat_str = pattern_from_pre_tokenizer(data.get("pre_tokenizer"), source)
    nfc = _normalizer_is_nfc(data.get("normalizer"), source)
    added = added_tokens_from_json(data.get("added_tokens") or [])
    vocab = model.get("vocab") or {}
    merges = parse_merges(model.get("merges") or [], source)
    built = build_ranks(vocab, merges, {t.id for t in added}, bool(model.get("ignore_merges", False)), source)
    max_id = max([*vocab.values(), *(t.id for t in added)], default=-1)
    return dict(
        mergeable_ranks=built["mergeable_ranks"],
        rank_to_id=built["rank_to_id"],
        missing_bytes=built["missing_bytes"],
        decode_only=built["decode_only"],
        pat_str=pat_str,
        nfc=nfc,
        added_tokens=added,
        vocab_size=max_id + 1,
    )


def read_json(path: Path) -> Any:
    """Reads a JSON file with an error that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """Reads `merges.txt` (optional ``#version`` header, one ``left right`` pair per line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return parse_merges([ln for ln in lines if ln.strip()], str(path))
