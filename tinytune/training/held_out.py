"""Held-out questions with expected answers: the fraction a model answers correctly.

Config (``sample_generation.held_out``): a list of ``{prompt: str, expect: str | list[str]}``.
An answer is correct when it contains every ``expect`` string (case-insensitive). The training
recipes answer these before and after training (with ``sample_generation.prompts``) and put
``held_out_correct_before`` / ``held_out_correct_after`` (fractions) into the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from tinytune.config import ConfigError


@dataclass(frozen=True)
class HeldOutQuestion:
    """One question and the strings a correct answer contains."""

    prompt: str
    expect: tuple[str, ...]

    def is_correct(self, answer: str) -> bool:
        """True when ``answer`` contains every expected string (case-insensitive)."""
        low = answer.lower()
        return all(e.lower() in low for e in self.expect)


def parse_held_out(node: Any, where: str = "sample_generation.held_out") -> list[HeldOutQuestion]:
    """Reads the ``held_out`` list; None or empty gives ``[]``.

    Raises:
        ConfigError: not a list, an item without a string ``prompt``, an empty or non-string
            ``expect``, or an unknown item key.
    """
    if node is None:
        return []
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, list):
        raise ConfigError(f"{where}: expected a list of {{prompt, expect}} items, got {type(node).__name__}")
    out = []
    for i, item in enumerate(node):
        key = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{key}: expected {{prompt: ..., expect: ...}}, got {item!r}")
        unknown = sorted(set(item) - {"prompt", "expect"})
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; items take prompt and expect")
        prompt, expect = item.get("prompt"), item.get("expect")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{key}.prompt: a non-empty string is required, got {prompt!r}")
        expect = [expect] if isinstance(expect, str) else expect
        if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e for e in expect):
            raise ConfigError(f"{key}.expect: a non-empty string or list of strings is required, got {expect!r}")
        out.append(HeldOutQuestion(prompt, tuple(expect)))
    return out


def fraction_correct(questions: Sequence[HeldOutQuestion], answers: Sequence[str]) -> float:
    """Share of ``answers`` that are correct for their ``questions`` (0.0 for none)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        return 0.0
    return sum(q.is_correct(a) for q, a in zip(questions, answers)) / len(questions)
