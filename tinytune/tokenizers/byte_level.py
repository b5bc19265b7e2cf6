"""GPT-2 byte-level alphabet: the reversible map between raw bytes and printable characters.

Byte-level BPE files (`tokenizer.json`, `vocab.json` + `merges.txt`, GGUF "gpt2" vocabularies)
spell every token as a string of printable stand-in characters, one per byte (a space is ``Ġ``,
a newline ``Ċ``). tiktoken works on raw bytes, so tokens are converted with these tables.
"""

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Returns the byte -> printable character table used by GPT-2 style byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Returns the inverse of :func:`byte_to_unicode`."""
    return {c: b for b, c in byte_to_unicode().items()}


def token_to_bytes(token: str) -> bytes | None:
    """Converts a byte-level token string to raw bytes; None when it uses characters outside the alphabet."""
    table = unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def bytes_to_token(data: bytes) -> str:
    """Converts raw bytes to their byte-level token spelling."""
    table = byte_to_unicode()
    return "".join(table[b] for b in data)
