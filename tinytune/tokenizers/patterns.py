"""Pre-tokenization regexes (tiktoken / fancy-regex syntax) and their derivation from `tokenizer.json`."""

from __future__ import annotations

from typing import Any

#: GPT-2's byte-level pre-tokenizer (HF `ByteLevel(use_regex=True)`).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: Llama 3 (tiktoken `tokenizer.model` and HF `Split` regex): digits in runs of up to three.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen / Qwen2 / Qwen2.5 / Qwen3: single digits.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def gpt2_pattern_after_digits(individual_digits: bool) -> str:
    """GPT-2 regex applied to the pieces left by HF `Digits` (SmolLM2: ``individual_digits=True``).

    HF first cuts digits out (each digit alone, or whole digit runs), then runs the GPT-2 regex
    on each remaining segment. One combined regex does the same: digits get their own
    alternative, the GPT-2 digit alternative is dropped (a segment holds no digits), and the
    "whitespace not followed by non-space" lookahead also stops before a digit, because a digit
    ends the segment.
    """
    digits = r"\p{N}" if individual_digits else r"\p{N}+"
    return digits + r"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for p in pre_tokenizer.get("pretokenizers", []):
            out.extend(_steps(p))
        return out
    return [pre_tokenizer]


def pattern_from_pre_tokenizer(pre_tokenizer: dict[str, Any] | None, source: str = "tokenizer.json") -> str:
    """Turns a byte-level `pre_tokenizer` section of `tokenizer.json` into one tiktoken regex.

    Supported shapes (the ones used by Llama 3, Qwen2/2.5/3, SmolLM2 and GPT-2 style files):
    ``[Split(Regex, Isolated), ByteLevel(use_regex=False)]``, ``[ByteLevel(use_regex=True)]`` and
    ``[Digits, ByteLevel(use_regex=True)]``.

    Args:
        pre_tokenizer: the JSON section.
        source: file name for error messages.

    Returns:
        The regex string.

    Raises:
        ValueError: for any other pre-tokenizer layout.
    """
    steps = _steps(pre_tokenizer)
    kinds = [s.get("type") for s in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or kinds[-1] != "ByteLevel":
        raise ValueError(
            f"{source}: unsupported pre_tokenizer {kinds}; tinytune's BPE back end needs a byte-level "
            "tokenizer whose pre_tokenizer ends with ByteLevel"
        )
    bl = byte_level[0]
    if bl.get("add_prefix_space", False):
        raise ValueError(f"{source}: ByteLevel(add_prefix_space=True) is not supported")
    if kinds == ["ByteLevel"]:
        if not bl.get("use_regex", True):
            raise ValueError(f"{source}: ByteLevel(use_regex=False) without a Split regex is not supported")
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not bl.get("use_regex", True):
        split = steps[0]
        pattern = split.get("pattern", {})
        if "Regex" not in pattern or split.get("behavior") != "Isolated" or split.get("invert", False):
            raise ValueError(f"{source}: only Split(Regex, behavior=Isolated, invert=False) is supported, got {split}")
        return pattern["Regex"]
    if kinds == ["Digits", "ByteLevel"] and bl.get("use_regex", True):
        return gpt2_pattern_after_digits(bool(steps[0].get("individual_digits", False)))
    raise ValueError(f"{source}: unsupported pre_tokenizer layout {kinds}")
