"""Sample styles: turn a raw row into messages (chat), plain text, or a chosen/rejected pair.

Styles: ``alpaca`` (instruction/input/output/system/history), ``sharegpt`` (conversations with
from/value), ``messages`` (OpenAI role/content), ``text`` (continued pre-training) and
``preference`` (chosen/rejected as text with a shared prompt, or as message lists). ``auto`` picks
per row from the keys present.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tinytune.datasets.errors import DatasetError

STYLES = ("auto", "alpaca", "sharegpt", "messages", "text", "preference")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}

PROMPT_ROLES = ("user", "tool")


@dataclass
class ChatSample:
    """A conversation: list of ``{"role", "content"[, "reasoning_content"]}`` dicts."""

    messages: list[dict]


@dataclass
class TextSample:
    """Raw text for continued pre-training (every token is trained)."""

    text: str


@dataclass
class PreferenceSample:
    """Two conversations sharing a prompt; they differ only in the last assistant turn."""

    chosen: list[dict]
    rejected: list[dict]


def detect_style(row: Mapping) -> str:
    """Guesses the style of one row from its keys."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return "unknown"


def _need(row: Mapping, key: str, file: str, row_no: int, style: str) -> Any:
    if key not in row or row[key] is None:
        raise DatasetError(f"missing column {key!r} for style {style!r}; row has {sorted(row)}", file=file,
                           row=row_no, hint="Map your column names with `column_map` (e.g. "
                                            f"column_map: {{{key}: your_column}}) or pick another `style`")
    return row[key]


def _text(value: Any, what: str, file: str, row_no: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DatasetError(f"{what} must be a string, got {type(value).__name__}", file=file, row=row_no,
                           hint="Fix the row or set skip_bad_samples: true")
    return value


def validate_conversation(messages: list[dict], file: str, row_no: int, *, need_answer: bool = True) -> list[dict]:
    """Checks role order and non-empty answers.

    Rules: an optional system message first; then prompt turns (user/tool) and assistant turns
    alternate, starting with a prompt turn; a training conversation ends with a non-empty
    assistant turn.

    Raises:
        DatasetError: naming the message index and the problem.
    """
    hint = "Fix the conversation or set skip_bad_samples: true"
    if not messages:
        raise DatasetError("empty conversation", file=file, row=row_no, hint=hint)
    start = 1 if messages[0]["role"] == "system" else 0
    expect_prompt = True
    for k, m in enumerate(messages[start:], start):
        role = m["role"]
        if role == "system":
            raise DatasetError(f"message {k}: a system message is only allowed first", file=file, row=row_no,
                               hint=hint)
        if role not in ("user", "assistant", "tool"):
            raise DatasetError(f"message {k}: unknown role {role!r} (use system/user/assistant/tool)", file=file,
                               row=row_no, hint=hint)
        is_prompt = role in PROMPT_ROLES
        if is_prompt != expect_prompt:
            want = "user" if expect_prompt else "assistant"
            raise DatasetError(f"message {k}: role {role!r} out of order (expected {want}; roles must alternate "
                               f"user/assistant after an optional system message)", file=file, row=row_no, hint=hint)
        if role == "assistant" and not (m["content"].strip() or (m.get("reasoning_content") or "").strip()):
            raise DatasetError(f"message {k}: empty assistant answer", file=file, row=row_no, hint=hint)
        expect_prompt = not expect_prompt
    if need_answer and (len(messages) == start or messages[-1]["role"] != "assistant"):
        raise DatasetError("conversation does not end with an assistant answer", file=file, row=row_no,
                           hint="Drop the trailing prompt turn, or set skip_bad_samples: true")
    return messages


def _alpaca(row: Mapping, file: str, row_no: int) -> ChatSample:
    instruction = _text(_need(row, "instruction", file, row_no, "alpaca"), "instruction", file, row_no)
    output = _text(_need(row, "output", file, row_no, "alpaca"), "output", file, row_no)
    inp = _text(row.get("input"), "input", file, row_no)
    messages: list[dict] = []
    system = _text(row.get("system"), "system", file, row_no)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DatasetError("history must be a list of [question, answer] pairs", file=file, row=row_no,
                           hint="Fix the row or set skip_bad_samples: true")
    for pair in history:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DatasetError(f"history entry {pair!r} is not a [question, answer] pair", file=file, row=row_no,
                               hint="Fix the row or set skip_bad_samples: true")
        messages.append({"role": "user", "content": _text(pair[0], "history question", file, row_no)})
        messages.append({"role": "assistant", "content": _text(pair[1], "history answer", file, row_no)})
    prompt = f"{instruction}\n{inp}" if inp else instruction
    if not prompt.strip():
        raise DatasetError("empty instruction", file=file, row=row_no, hint="Fix the row or set skip_bad_samples: true")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return ChatSample(validate_conversation(messages, file, row_no))


def _sharegpt_messages(conv: Any, row: Mapping, file: str, row_no: int) -> list[dict]:
    if not isinstance(conv, list):
        raise DatasetError("`conversations` must be a list of {from, value} objects", file=file, row=row_no,
                           hint="Fix the row or set skip_bad_samples: true")
    messages: list[dict] = []
    system = row.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, "system", file, row_no)})
    for k, turn in enumerate(conv):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DatasetError(f"conversation turn {k} needs `from` and `value` keys, got {turn!r:.80}", file=file,
                               row=row_no, hint="Use ShareGPT turns like {\"from\": \"human\", \"value\": \"...\"}")
        tag = str(turn["from"]).lower()
        if tag not in SHAREGPT_ROLES:
            raise DatasetError(f"conversation turn {k}: unknown role tag {turn['from']!r} "
                               f"(known: {', '.join(sorted(SHAREGPT_ROLES))})", file=file, row=row_no,
                               hint="Fix the row or set skip_bad_samples: true")
        messages.append({"role": SHAREGPT_ROLES[tag], "content": _text(turn["value"], "value", file, row_no)})
    return messages


def _openai_messages(msgs: Any, file: str, row_no: int) -> list[dict]:
    if not isinstance(msgs, list):
        raise DatasetError("`messages` must be a list of {role, content} objects", file=file, row=row_no,
                           hint="Fix the row or set skip_bad_samples: true")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DatasetError(f"message {k} needs `role` and `content` keys, got {m!r:.80}", file=file, row=row_no,
                               hint="Use messages like {\"role\": \"user\", \"content\": \"...\"}")
        msg = {"role": str(m["role"]), "content": _text(m["content"], "content", file, row_no)}
        if m.get("reasoning_content"):
            msg["reasoning_content"] = _text(m["reasoning_content"], "reasoning_content", file, row_no)
        out.append(msg)
    return out


def _as_conversation(value: Any, prompt: list[dict], file: str, row_no: int, what: str) -> list[dict]:
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        msgs = _openai_messages(value, file, row_no)
        if msgs and msgs[0]["role"] != "assistant":
            return msgs  # a full conversation
        return prompt + msgs
    raise DatasetError(f"`{what}` must be a string or a list of messages", file=file, row=row_no,
                       hint="Fix the row or set skip_bad_samples: true")


def _preference(row: Mapping, file: str, row_no: int) -> PreferenceSample:
    chosen = _need(row, "chosen", file, row_no, "preference")
    rejected = _need(row, "rejected", file, row_no, "preference")
    prompt: list[dict] = []
    if row.get("system"):
        prompt.append({"role": "system", "content": _text(row["system"], "system", file, row_no)})
    p = row.get("prompt")
    if isinstance(p, list):
        prompt += _openai_messages(p, file, row_no)
    elif p is not None:
        prompt.append({"role": "user", "content": _text(p, "prompt", file, row_no)})
    elif isinstance(chosen, str):
        _need(row, "prompt", file, row_no, "preference")
    c = validate_conversation(_as_conversation(chosen, prompt, file, row_no, "chosen"), file, row_no)
    r = validate_conversation(_as_conversation(rejected, prompt, file, row_no, "rejected"), file, row_no)
    if c[:-1] != r[:-1]:
        raise DatasetError("chosen and rejected conversations must share everything but the last answer",
                           file=file, row=row_no, hint="Fix the row or set skip_bad_samples: true")
    return PreferenceSample(c, r)


def row_to_sample(row: Mapping, style: str, file: str, row_no: int) -> ChatSample | TextSample | PreferenceSample:
    """Converts one (column-mapped) row into a sample of the given style.

    Raises:
        DatasetError: for missing columns, empty answers or roles out of order.
    """
    if style == "auto":
        style = detect_style(row)
        if style == "unknown":
            raise DatasetError(f"cannot tell the sample style from the columns {sorted(row)}", file=file,
                               row=row_no, hint="Set `style` (alpaca, sharegpt, messages, text, preference) and "
                                                "`column_map` in the dataset config")
    if style == "alpaca":
        return _alpaca(row, file, row_no)
    if style == "sharegpt":
        msgs = _sharegpt_messages(_need(row, "conversations", file, row_no, style), row, file, row_no)
        return ChatSample(validate_conversation(msgs, file, row_no))
    if style == "messages":
        msgs = _openai_messages(_need(row, "messages", file, row_no, style), file, row_no)
        return ChatSample(validate_conversation(msgs, file, row_no))
    if style == "text":
        text = _text(_need(row, "text", file, row_no, style), "text", file, row_no)
        if not text.strip():
            raise DatasetError("empty text", file=file, row=row_no, hint="Fix the row or set skip_bad_samples: true")
        return TextSample(text)
    if style == "preference":
        return _preference(row, file, row_no)
    raise DatasetError(f"unknown style {style!r} (choose from {', '.join(STYLES)})",
                       hint="Fix `style` in the dataset config")
