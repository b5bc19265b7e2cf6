"""Adversarial conversations and the HF-only reference rule for loss masks (test helpers).

The reference never uses tinytune code: text and token ids come from transformers'
``apply_chat_template`` and its tokenizer; for assistant message ``k`` the trained span is the text
that follows ``apply_chat_template(messages[:k], add_generation_prompt=True)`` in the full render,
up to and including the next end-of-turn token; a token is trained when its character span
overlaps a trained span.
"""

from __future__ import annotations

import random

IGNORE = -100

# Answers chosen to collide with prompt text, role names, special-token text and template headers.
ONE_CHAR = ["d", "e", "m", "s", "t", "a", "i", "4", "2", "|", "<", ">", "_", "n"]
ROLE_WORDS = ["user", "assistant", "system", "model", "ipython", "tool", "im_end", "eot_id", "start_header_id"]
COMMON = [
    "yes",
    "no",
    "Tokyo.",
    "It is 4.",
    "26 Jul 2024",
    "December 2023",
    "2024",
    "Today Date",
    "Paris",
    "The answer is yes.",
    "42",
]
UNICODE = [
    "日本の首都は東京です。",
    "naïve café ☕",
    "🙂",
    "Ünïcödé — “quotes”",
    "Привет, мир",
    "مرحبا",
    "a\u0301",
    "x² + y² = z²",
    "\u00a0non-breaking\u00a0",
]
MULTILINE = ["Line one.\nLine two.", "- item 1\n- item 2\n\nDone.", "```python\nprint('hi')\n```", "  indented\n"]
THINK = [
    "<think>\nJapan's capital is Tokyo.\n</think>\n\nTokyo.",
    "<think>\n\n</think>\n\nyes",
    "<think>\nuser asked; d is a letter\n</think>\n\nd",
    "<think>Count: 2+2.</think>4",
]
REASONING = ["Japan's capital is Tokyo.", "Tokyo", "The user says yes; answer yes.", "d", "\nsteps\n"]
USER_TEMPLATES = [
    "Answer yes or no: is 7 prime? {a}",
    "Say '{a}' and nothing else.",
    "{a}",
    "What is {a}?",
    "Repeat after me: {a} {a}",
    "Which role are you? (user/assistant/system)",
    "Hi!",
    "Today Date: 26 Jul 2024. What is 2+2? 4",
    "<think>not mine</think> {a}",
    "东京 {a} 🙂",
]
SYSTEMS = [
    None,
    None,
    "",
    "You are a terse assistant.",
    "Always answer '{a}'.",
    "system",
    "  padded system  ",
    "Cutting Knowledge Date: December 2023\nRemember: {a}",
]


def _answer(rng: random.Random, think: bool) -> str:
    pools = [ONE_CHAR, ROLE_WORDS, COMMON, UNICODE, MULTILINE] + ([THINK] if think else [])
    return rng.choice(rng.choice(pools))


def conversation(
    rng: random.Random, *, system: bool | str = True, think: bool = False, reasoning: bool = False
) -> list:
    """One conversation of 1-6 user/assistant rounds (system prompt: True = sometimes, "always", or
    False; optional Qwen3 reasoning)."""
    turns = rng.randint(1, 6)
    answers = [_answer(rng, think) for _ in range(turns)]
    msgs: list[dict] = []
    if system:
        sys_t = rng.choice([t for t in SYSTEMS if t is not None or system != "always"])
        if sys_t is not None:
            msgs.append({"role": "system", "content": sys_t.replace("{a}", rng.choice(answers))})
    for a in answers:
        # the user often repeats this answer, or the next one, or an earlier one
        echo = rng.choice(answers)
        msgs.append({"role": "user", "content": rng.choice(USER_TEMPLATES).replace("{a}", rng.choice([a, echo]))})
        m = {"role": "assistant", "content": a}
        if reasoning and rng.random() < 0.4 and "</think>" not in a:
            m["reasoning_content"] = rng.choice(REASONING)
        msgs.append(m)
    return msgs


def corpus(n: int, seed: int, **kw) -> list[list[dict]]:
    rng = random.Random(seed)
    return [conversation(rng, **kw) for _ in range(n)]


def render(hf_tok, source: str, messages: list[dict], **kw) -> str:
    return hf_tok.apply_chat_template(messages, chat_template=source, tokenize=False, **kw)


def reference_encoding(hf_tok, source: str, messages: list[dict], end: str, *, prompt_kws=None, **full_kw):
    """``(ids, labels)`` by the reference rule, or None when a prefix render is not a prefix.

    Args:
        hf_tok: a transformers tokenizer.
        source: the Jinja chat template.
        messages: the conversation.
        end: the end-of-turn token string.
        prompt_kws: ``k -> list of template-kwarg dicts`` to try (in order) for the prefix render
            of assistant message ``k`` (default: one try with ``full_kw``).
        **full_kw: template kwargs of the full render (``tools=``, ``enable_thinking=``).
    """
    text = render(hf_tok, source, messages, **full_kw)
    spans = []
    tools = {"tools": full_kw["tools"]} if "tools" in full_kw else {}
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        for kw in prompt_kws(k) if prompt_kws else [full_kw]:
            prompt = render(hf_tok, source, messages[:k], add_generation_prompt=True, **{**tools, **kw})
            if text.startswith(prompt):
                break
        else:
            return None
        stop = text.index(end, len(prompt)) + len(end)
        spans.append((len(prompt), stop))
    enc = hf_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trained = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    labels = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return ids, labels
